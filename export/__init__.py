"""Offline exporter: Depth-Anything-V2 / DPT checkpoints to FP16 ONNX models in a Triton repository."""
