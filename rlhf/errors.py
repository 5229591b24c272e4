"""The one exception type that means "the user's input is wrong".

The CLI prints a `UserError` as a single line and exits with status 2; anything else is a bug and
keeps its traceback. Raise it with the offending path or field in the message and what was expected.
"""


class UserError(Exception):
    """Bad input (a path, a config field, a file's content) described in one line for the user."""
