"""Runpod gateway: request validation, image fetch/decode, Triton gRPC inference, CPU post-processing."""
