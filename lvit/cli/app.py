"""The `lvit` command line. Heavy libraries are imported inside the commands so `--help` is fast.

User mistakes are raised as `LvitError` anywhere below a command; `LvitGroup.invoke` turns them into
`error: <message>` on stderr and exit status 2, for every command and sub-command, whether the app
runs from `main()` (the `lvit` script, `python -m lvit`) or is invoked directly (`typer.testing.CliRunner`).
A training run stopped after saving a checkpoint (`lvit.errors.Stopped`: by SIGTERM / Ctrl-C, or at a record it
cannot read, exit status 3) becomes
`stopped by SIGTERM at step N; ...` and its own exit status (143 for SIGTERM, 130 for Ctrl-C).
"""

from __future__ import annotations

import logging
import os
import sys

import typer
from typer.core import TyperGroup

from lvit.cli import export, infer, train
from lvit.cli.data import data_app
from lvit.cli.eval import eval_app
from lvit.cli.recipes import recipes_app
from lvit.errors import LvitError, Stopped


class LvitGroup(TyperGroup):
    """The top-level group: an `LvitError` from any command below it becomes a message and exit status 2; a
    run stopped after saving a checkpoint (`Stopped`) its message and its own status (143 SIGTERM, 130 Ctrl-C, 3 a
    record it cannot read)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LvitError as exc:  # an `Interrupted` says so, and exits 130 as a shell does on Ctrl-C
            typer.secho(f"{getattr(exc, 'label', 'error')}: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(getattr(exc, "exit_code", 2)) from None
        except Stopped as exc:
            typer.secho(str(exc), fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(exc.exit_status) from None


app = typer.Typer(
    cls=LvitGroup,
    help="LLaVA-style visual instruction tuning: stage-1 alignment and stage-2 instruction tuning on TRL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")


class _StderrHandler(logging.StreamHandler):
    """A handler on the current `sys.stderr` (which `CliRunner` replaces for each invocation)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _ShortFormatter(logging.Formatter):
    """lvit's progress as `12:00:00 message`; anything else with its level and logger name."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        self._progress = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO and record.name.split(".")[0] == "lvit":
            return self._progress.format(record)
        return super().format(record)


def setup_logging() -> None:
    """lvit's messages (progress at INFO, warnings) on stderr in a short format; results go to stdout.

    The handler sits on the "lvit" logger, added once per process (`CliRunner` invokes the app many
    times in one process), so an application's or pytest's root handlers are left as they are.
    `lvit.train` lowers lvit's level to WARNING on all but the main training process.
    """
    logger = logging.getLogger("lvit")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_ShortFormatter())
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


# OpenMP settings lvit uses unless the user set the variable (docs/stack-notes.md#omp-threads-shared-cpu)
OMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def set_thread_defaults() -> None:
    """Set `OMP_DEFAULTS` in `os.environ` where the user has not set the variable.

    With the default (active) policy, torch's OpenMP threads spin waiting for each other; on a shared
    CPU each then waits for its core at every operator, and a run slows down far more than its share of
    the CPU. PASSIVE threads sleep instead. libgomp reads the variable when torch is imported, so this
    runs in the app callback, before any command imports torch (`import lvit.cli` imports no torch).
    """
    for name, value in OMP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("lvit")
        except PackageNotFoundError:  # run from a checkout that was never installed
            from lvit import __version__ as number
        typer.echo(f"lvit {number}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print lvit's version and exit."
    ),
) -> None:
    set_thread_defaults()  # before a command imports torch
    setup_logging()


app.command(context_settings={"allow_extra_args": False})(train.finetune)
app.command()(train.demo)
app.add_typer(recipes_app, name="recipes")
app.command()(export.export)
app.command()(infer.chat)
app.command()(infer.generate)
app.add_typer(eval_app, name="eval")


def main() -> None:
    app()  # LvitGroup.invoke turns an LvitError into its message and exit status 2


if __name__ == "__main__":
    main()
