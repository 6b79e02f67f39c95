"""Serving: Triton (client, embedded process, supervisor), the image worker processes and Runpod's job loop."""
