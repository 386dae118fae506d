"""Surviving kills and preemption: which checkpoint to resume from, and stopping cleanly on a signal.

- A checkpoint is complete when its `trainer_state.json` (the Trainer writes it after the weights,
  optimizer, scheduler and RNG states) parses and its weights are there. A checkpoint cut off
  mid-write is renamed aside (`incomplete-checkpoint-N`, nothing deleted) with a message, and the
  newest complete one is used. Renaming it also keeps it out of `save_total_limit`'s rotation, so
  rotation can never delete the newest complete checkpoint in its favour.
- SIGTERM (a preempted cloud machine) and Ctrl-C make the run save a checkpoint at the end of the
  current step and stop; running the same command again resumes from it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
from pathlib import Path

from transformers import TrainerCallback

from lvit.errors import LvitError

log = logging.getLogger("lvit")

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin")
FINISHED_MARKER = "lvit_run.json"


def checkpoints(out: Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first."""
    found = [p for p in out.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)] if out.is_dir() else []
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))


def incomplete_reason(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None if it is complete."""
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (cut off while saving)"
    try:
        json.loads(state.read_text())["global_step"]
    except (ValueError, KeyError):
        return "trainer_state.json is truncated"
    if not any((folder / name).is_file() for name in _WEIGHTS):
        return "no model or adapter weights"
    return None


def set_aside_incomplete(out: Path) -> None:
    """Rename every incomplete checkpoint to `incomplete-checkpoint-N` (main process only)."""
    for folder in checkpoints(out):
        reason = incomplete_reason(folder)
        if reason:
            target = folder.with_name(f"incomplete-{folder.name}")
            n = 1
            while target.exists():
                target, n = folder.with_name(f"incomplete-{folder.name}.{n}"), n + 1
            folder.rename(target)
            log.warning("%s is incomplete (%s); skipped and kept as %s", folder, reason, target.name)


def resume_checkpoint(out: Path, resume: bool | None, source: str) -> Path | None:
    """Decide what to do with an existing output folder; returns the checkpoint to resume from.

    `resume=None` (the default) resumes when the folder holds a complete checkpoint; `True`
    requires one; `False` refuses any non-empty folder. A folder holding a finished run, or files
    but no checkpoint, is never written into.
    """
    if not out.exists() or not any(out.iterdir()):
        if resume:
            raise LvitError(f"--resume: {out} holds no checkpoint to resume from (training.output_dir in {source}).")
        return None
    complete = [c for c in checkpoints(out) if incomplete_reason(c) is None]
    if (out / FINISHED_MARKER).is_file():
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


class GracefulStop(TrainerCallback):
    """On SIGTERM or SIGINT: finish the current step, save a checkpoint, stop.

    A second Ctrl-C stops at once. Under several processes the stop is agreed at the end of each
    step (an all-reduce of one flag), so every rank saves the same step.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self.stopped_at: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        log.warning(
            "%s received: saving a checkpoint at the end of this step, then stopping (Ctrl-C again to stop at once)",
            self.signal_name,
        )

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed_stop():
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def _agreed_stop(self) -> bool:
        import torch
        import torch.distributed as dist

        flag = self.signal_name is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor(
                [1.0 if flag else 0.0],
                device="cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu",
            )
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
            if flag and self.signal_name is None:
                self.signal_name = "a signal on another process"
        return flag
