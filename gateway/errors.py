"""The one exception type whose message reaches a client as a per-image error, and safe quoting."""

QUOTE_LIMIT = 40


class ImageError(Exception):
    """This image failed; the message is short, human and safe to show (no hosts, ports or tracebacks)."""


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr`` of at most ``limit`` characters of user input, valid UTF-8 (lone surrogates escaped)."""
    text = value if isinstance(value, str) else repr(value)
    shown = text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")
    return repr(shown) + ("..." if len(text) > limit else "")


def safe_text(text: str) -> str:
    """``text`` unchanged when it is valid UTF-8 text, else with its lone surrogates escaped."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
