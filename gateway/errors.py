"""The one exception type whose message reaches a client as a per-image error."""


class ImageError(Exception):
    """This image failed; the message is short, human and safe to show (no hosts, ports or tracebacks)."""
