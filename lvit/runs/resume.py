"""Which checkpoint a run resumes from.

A checkpoint is complete when its `trainer_state.json` (the Trainer writes it after the weights,
optimizer, scheduler and RNG states) parses and its weights are there. A checkpoint cut off
mid-write is renamed aside (`incomplete-checkpoint-N`, nothing deleted) with a message, and the
newest complete one is used. Renaming it also keeps it out of `save_total_limit`'s rotation, so
rotation can never delete the newest complete checkpoint in its favour.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from lvit.errors import LvitError
from lvit.runs.files import (
    CHECKPOINT_NAME,
    OWN_LOG_FILES,
    TRAINER_STATE_FILE,
    WEIGHT_FILES,
    is_finished_run,
    read_trainer_state,
)

log = logging.getLogger(__name__)

INCOMPLETE_PREFIX = "incomplete-"
INCOMPLETE_NAME = re.compile(r"^incomplete-checkpoint-\d+(\.\d+)?$")
"""A checkpoint cut off while saving, set aside by `set_aside_incomplete`."""


def checkpoints(out: Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first."""
    found = [p for p in out.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)] if out.is_dir() else []
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))


def incomplete_reason(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None if it is complete."""
    if not (folder / TRAINER_STATE_FILE).is_file():
        return f"no {TRAINER_STATE_FILE} (cut off while saving)"
    state = read_trainer_state(folder)
    if not isinstance(state, dict) or "global_step" not in state:
        return f"{TRAINER_STATE_FILE} is truncated"
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        return "no model or adapter weights"
    return None


def set_aside_incomplete(out: Path) -> None:
    """Rename every incomplete checkpoint to `incomplete-checkpoint-N` (main process only)."""
    for folder in checkpoints(out):
        reason = incomplete_reason(folder)
        if reason:
            target = folder.with_name(f"{INCOMPLETE_PREFIX}{folder.name}")
            n = 1
            while target.exists():
                target, n = folder.with_name(f"{INCOMPLETE_PREFIX}{folder.name}.{n}"), n + 1
            folder.rename(target)
            log.warning("%s is incomplete (%s); skipped and kept as %s", folder, reason, target.name)


def resume_checkpoint(out: Path, resume: bool | None, source: str) -> Path | None:
    """Decide what to do with an existing output folder; returns the checkpoint to resume from.

    `resume=None` (the default) resumes when the folder holds a complete checkpoint; `True`
    requires one; `False` refuses any non-empty folder. A folder holding a finished run, or files
    but no checkpoint, is never written into.
    """
    # lvit's own logs and checkpoints set aside, nothing else: a run stopped before its first complete checkpoint
    # (a kill, or a second Ctrl-C while the first was saving); it starts afresh, the set-aside ones kept
    if not out.exists() or all(p.name in OWN_LOG_FILES or INCOMPLETE_NAME.match(p.name) for p in out.iterdir()):
        if resume:
            raise LvitError(f"--resume: {out} holds no checkpoint to resume from (training.output_dir in {source}).")
        return None
    complete = [c for c in checkpoints(out) if incomplete_reason(c) is None]
    if is_finished_run(out):
        raise LvitError(
            f"{out} holds a finished run (training.output_dir in {source}); lvit never overwrites a run. "
            "Choose another folder with `training.output_dir=...`."
        )
    if complete and resume is not False:
        return complete[-1]
    hint = " Pass --resume to continue from its newest checkpoint." if complete else ""
    raise LvitError(
        f"output folder {out} exists and is not empty (training.output_dir in {source}); lvit never overwrites "
        f"a run. Choose another folder (`training.output_dir=...`) or remove it yourself.{hint}"
    )
