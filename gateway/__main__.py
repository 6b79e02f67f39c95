"""Entry point of ``python -m gateway``."""

if __name__ == "__main__":  # not when an image worker process (spawn) imports this module as __mp_main__
    from gateway.allocator import restart_with_one_arena

    restart_with_one_arena()  # before anything starts a thread

    from gateway.worker import main

    main()
