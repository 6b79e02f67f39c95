"""Loopback stand-ins for running the worker locally, in tests and benchmarks: the gateway with Runpod's
local API (``local``) and Runpod's job API for the production job loop (``jobapi``). Never imported by
the worker itself, and not in its image."""
