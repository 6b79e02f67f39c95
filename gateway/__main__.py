"""Entry point of ``python -m gateway``."""

from gateway.worker import main

if __name__ == "__main__":  # not when an image worker process (spawn) imports this module as __mp_main__
    main()
