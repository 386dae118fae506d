"""The one error type lvit raises for user mistakes.

The CLI prints an `LvitError` as a short message (what is wrong, where, how to fix it) instead
of a stack trace. Anything else that escapes is a bug in lvit and keeps its traceback.
"""


class LvitError(Exception):
    """A problem in the user's recipe, data or environment, with a message that says how to fix it."""


class Interrupted(LvitError):
    """A command stopped by Ctrl-C that kept its work: the CLI prints `interrupted: <message>` and exits 130."""

    label = "interrupted"
    exit_code = 130
