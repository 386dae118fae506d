"""What a training run shows on its console: lvit's log lines, a progress bar on a terminal only, and none of
the libraries' notices a user cannot act on.

- `quiet_libraries(tty)`: filters the library notices that say nothing a user can change (below), and turns the
  libraries' own progress bars (weights loading, shards writing, dataset maps) off when stderr is not a terminal,
  so a log file or a scheduler's output holds no cursor-escape clutter. Warnings a user can act on stay.
- `show_progress_bar(recipe)`: tqdm's bar only on a terminal, unless the recipe sets `training.disable_tqdm`.
"""

from __future__ import annotations

import logging
import sys
import warnings

UNACTIONABLE = (
    # transformers: no torchvision (lvit's CPU setup; the PIL image processor is used instead, on purpose)
    ("transformers", "requires torchvision (not installed); falling back to"),
    ("transformers", "backend is not available. Falling back to"),
    # transformers: SFTConfig turns `gradient_checkpointing` on by default; the recipe's key is activation_checkpointing
    ("transformers", "use_cache=True` is incompatible with gradient checkpointing"),
    # bitsandbytes on CPU: an optional faster kernel package is missing; the built-in one runs
    ("bitsandbytes", "Failed to load CPU gemm_4bit_forward"),
)
"""(logger prefix, message fragment): log records dropped by `quiet_libraries`."""

UNACTIONABLE_WARNINGS = (
    # raised inside TRL's SFTConfig, whose default sets the old name; lvit's recipes use activation_checkpointing
    r"`gradient_checkpointing` is deprecated",
    r"`is_gradient_checkpointing` is deprecated",  # asked by peft / the Trainer, not by the user
)


class _DropUnactionable(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(record.name.startswith(name) and text in message for name, text in UNACTIONABLE)


_FILTER = _DropUnactionable()


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def quiet_libraries(tty: bool | None = None) -> None:
    """Drop the notices in `UNACTIONABLE` (idempotent) and, off a terminal, the libraries' progress bars."""
    tty = stderr_is_tty() if tty is None else tty
    names = {name for name, _ in UNACTIONABLE} | {
        "transformers.utils.import_utils",
        "transformers.models.auto.image_processing_auto",
        "transformers.modeling_utils",
        "transformers.modeling_layers",
        "bitsandbytes.backends.cpu.ops",
    }
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    # A filter on a logger does not cover its children's records: also on the handlers transformers installs.
    for handler in logging.getLogger("transformers").handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
    for pattern in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if not tty:
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()


def show_progress_bar(recipe, args) -> bool:
    """tqdm's bar: as the recipe says when it sets `training.disable_tqdm`, else only when stderr is a terminal."""
    if "disable_tqdm" in recipe.training:
        return not args.disable_tqdm
    return stderr_is_tty()
