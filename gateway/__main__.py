"""Entry point of ``python -m gateway``."""

from gateway.worker import main

main()
