"""Runpod Hub entry point: the same worker as ``python -m gateway`` (see Dockerfile)."""

from gateway.worker import main

if __name__ == "__main__":
    main()
