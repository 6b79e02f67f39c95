"""Entry point of ``python -m gateway.client``."""

import sys

from gateway.client.cli import main

if __name__ == "__main__":
    sys.exit(main())
