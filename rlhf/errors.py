"""The one exception type that means "the user's input is wrong".

The CLI prints a `UserError` as a single line and exits with status 2; anything else is a bug and
keeps its traceback. Raise it with the offending path or field in the message and what was expected.
"""


class UserError(Exception):
    """Bad input (a path, a config field, a file's content) described in one line for the user."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, shortened to `limit` characters, to quote inside a UserError."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
