"""The one exception type that means "the user's input is wrong".

The CLI prints a `UserError` as a single line and exits with status 2; anything else is a bug and
keeps its traceback. Raise it with the offending path or field in the message and what was expected.
"""

import reprlib

QUOTE_LIMIT = 200  # characters of a value quoted in an error message


class UserError(Exception):
    """Bad input (a path, a config field, a file's content) described in one line for the user."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, shortened to `limit` characters, to quote inside a UserError."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`repr(value)` for an error message, at most `limit` characters.

    Built by `reprlib`, which stops early in long strings, wide lists and deep nesting: a small YAML of nested
    aliases expands to a value whose full repr would take tens of millions of characters (and seconds) to build.
    """
    shortener = reprlib.Repr()
    shortener.maxlevel = 3
    shortener.maxtuple = shortener.maxlist = shortener.maxarray = shortener.maxdict = 8
    shortener.maxset = shortener.maxfrozenset = shortener.maxdeque = 8
    shortener.maxstring = shortener.maxlong = shortener.maxother = limit
    text = " ".join(shortener.repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_failure(err: BaseException) -> str:
    """The cause of a failed write in a few words: the OS's ("No space left on device", "File too large",
    "Permission denied", "Read-only file system"), also where safetensors wraps it in its own message."""
    import re

    cause = getattr(err, "strerror", None)
    if not cause:
        found = re.search(r"I/O error: (.+?)(?: \(os error \d+\))?$", str(err))
        cause = found.group(1) if found else one_line(err, 120)
    return cause
