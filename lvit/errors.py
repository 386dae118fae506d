"""The one error type lvit raises for user mistakes, and the one stop that is not an error.

The CLI prints an `LvitError` as a short message (what is wrong, where, how to fix it) instead
of a stack trace. Anything else that escapes is a bug in lvit and keeps its traceback, except
`Preempted` (a run stopped by SIGTERM / Ctrl-C after saving a checkpoint; see `lvit.train.preemption`),
which the CLI turns into its own exit status. Both live here, so the CLI needs no heavy import.
"""

import signal


class LvitError(Exception):
    """A problem in the user's recipe, data or environment, with a message that says how to fix it."""


class Interrupted(LvitError):
    """A command stopped by Ctrl-C that kept its work: the CLI prints `interrupted: <message>` and exits 130."""

    label = "interrupted"
    exit_code = 130


def exit_status(signal_name: str | None) -> int:
    """128 + the signal's number (143 for SIGTERM, 130 for SIGINT); 143 when another process got the signal."""
    try:
        return 128 + int(signal.Signals[signal_name])
    except (KeyError, TypeError):
        return 128 + int(signal.SIGTERM)


class Preempted(Exception):  # noqa: N818 (a stop, not an error)
    """Training stopped on a signal after saving a checkpoint; the same command resumes it."""

    def __init__(self, signal_name: str, step: int, checkpoint):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        self.exit_status = exit_status(signal_name)
        super().__init__(
            f"stopped by {signal_name} at step {step}; checkpoint saved in {checkpoint}; "
            "run the same command to resume from it"
        )
