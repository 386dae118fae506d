"""The one error type lvit raises for user mistakes, and the one stop that is not an error.

The CLI prints an `LvitError` as a short message (what is wrong, where, how to fix it) instead
of a stack trace. Anything else that escapes is a bug in lvit and keeps its traceback, except a `Stopped` run
(stopped after saving a checkpoint the same command resumes from: `Preempted` by SIGTERM / Ctrl-C, see
`lvit.train.preemption`, or `BadRecordStop` at a record it cannot read), which the CLI turns into its own exit
status. They live here, so the CLI needs no heavy import.
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


class UnreadableRecord(LvitError):
    """A record whose image cannot be read, found mid-run under `data.on_bad_record: error`. One message argument,
    so a data loader worker can raise it again in the main process (torch rebuilds it from its text, which then
    ends with this message: `problem` is that last line)."""

    @property
    def problem(self) -> str:
        return str(self).strip().splitlines()[-1].removeprefix(f"{__name__}.{type(self).__name__}: ")


class Stopped(Exception):  # noqa: N818 (a stop, not an error)
    """Training stopped after saving a checkpoint that the same command resumes from; the CLI prints the message
    and exits with `exit_status`."""

    exit_status = 1


class Preempted(Stopped):
    """Training stopped on a signal after saving a checkpoint; the same command resumes it."""

    def __init__(self, signal_name: str, step: int, checkpoint):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        self.exit_status = exit_status(signal_name)
        super().__init__(
            f"stopped by {signal_name} at step {step}; checkpoint saved in {checkpoint}; "
            "run the same command to resume from it"
        )


BAD_RECORD_STATUS = 3
"""The exit status of a run stopped by a record it cannot read (`BadRecordStop`): not 2 (nothing was lost)."""

BAD_RECORD_FIXES = (
    "fix or remove that record and run the same command, or run it with data.on_bad_record=skip to leave such "
    "records out (each is listed in skipped_records.jsonl); `lvit data check --decode` finds every such image "
    "before a run"
)


class BadRecordStop(Stopped):
    """Training stopped at a record it cannot read, after saving a checkpoint at the last complete step."""

    exit_status = BAD_RECORD_STATUS

    def __init__(self, problem: str, step: int, checkpoint):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(
            f"stopped at step {step}: {problem}. The {step} complete step(s) are saved in {checkpoint}; "
            f"{BAD_RECORD_FIXES}; the run resumes from the checkpoint."
        )
