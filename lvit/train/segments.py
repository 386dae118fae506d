"""A run in segments: what a resume may change, what each segment trained with, and the whole run's headline figures.

A resumed run continues the optimizer, the schedule and the data order of its checkpoint, so a recipe that changed
since (another learning rate, batch size, data or model) would train something that is neither run while the run
folder reported the new values as the run's. `check_resume` compares the recipe with the checkpoint's before any
model loads: a change to what the run is stops it with the list of changes and the ways on; a change to how it is
watched or saved (`RESUME_MAY_CHANGE`) passes with a note; a local path whose old place is gone (the data or a
model moved) passes as a move. Each segment is recorded in `lvit_run.json` (`segments`), and the headline metrics
(`train_loss`, `train_runtime`) cover every step of the run, not only the last segment's.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from pathlib import Path

import yaml

from lvit.errors import LvitError
from lvit.recipe.schema import Recipe
from lvit.runs.files import PATH_KEYS, RECIPE_FILE, read_run_info, recipe_with_absolute_paths

log = logging.getLogger(__name__)

RESUME_MAY_CHANGE = (
    "training.output_dir",
    "training.logging_*",
    "training.save_*",
    "training.report_to",
    "training.run_name",
    "training.disable_tqdm",
    "training.dataloader_*",
    "training.push_to_hub",
    "training.hub_*",
    "data.on_bad_record",  # the fix a run stopped by an unreadable record names
    "eval.*",  # evaluation during training reads the model; it restores the RNG it uses
)
"""Keys a resumed run may change: how it is watched, saved or evaluated, not what it trains (glob patterns)."""


def flat(raw: dict, prefix: str = "") -> dict[str, object]:
    """A nested recipe mapping as dotted keys (`training.learning_rate`)."""
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume(recipe: Recipe, checkpoint: Path, allow_changed: tuple[str, ...] = ()) -> dict:
    """Compare `recipe` with the recipe `checkpoint` was saved with; returns this segment's record for
    `lvit_run.json`. Raises `LvitError` listing the changes that alter the run, with the ways on."""
    saved_file = Path(checkpoint) / RECIPE_FILE
    step = int(Path(checkpoint).name.split("-")[-1])
    segment = {"from_step": step, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changed": {}}
    if not saved_file.is_file():  # a checkpoint without lvit's files: nothing to compare with
        return segment
    before = flat(yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {})
    now = flat(recipe_with_absolute_paths(recipe))
    paths = {f"{section}.{key}" for section, key in PATH_KEYS}
    # a key lvit added since the checkpoint was written holds its default there: compared only where it was saved;
    # `training:` holds what the user set, so a key set or removed there counts
    keys = sorted(k for k in before.keys() | now.keys() if k in before or k.startswith("training."))
    changed = {k: (before.get(k), now.get(k)) for k in keys if before.get(k) != now.get(k)}
    refused, noted = {}, {}
    for key, (old, new) in changed.items():
        moved = key in paths and isinstance(old, str) and old.startswith("/") and not Path(old).exists()
        if moved or key in allow_changed or any(fnmatch.fnmatchcase(key, p) for p in RESUME_MAY_CHANGE):
            noted[key] = [old, new]
        else:
            refused[key] = (old, new)
    if refused:
        listed = "; ".join(f"{k}: {_show(old)} -> {_show(new)}" for k, (old, new) in refused.items())
        raise LvitError(
            f"{recipe.source}: the run in {checkpoint.parent} resumes from {checkpoint.name} with other settings "
            f"than it trained with ({listed}). A resume continues that run's optimizer, schedule and data order, so "
            f"these would train neither run. Run the same command with the checkpoint's settings "
            f"({checkpoint / RECIPE_FILE}), or start a new run in another folder (training.output_dir=...); for a "
            f"change you know is safe, pass --allow-changed KEY (e.g. --allow-changed {next(iter(refused))})."
        )
    for key, (old, new) in noted.items():
        log.info("resuming with %s changed: %s -> %s", key, _show(old), _show(new))
    segment["changed"] = noted
    return segment


def earlier_segments(checkpoint: Path) -> list[dict]:
    """The segments the checkpoint's run info records (a run's first checkpoint: one, from step 0)."""
    info = read_run_info(checkpoint) or {}
    return list(info.get("segments") or [{"from_step": 0, "changed": {}}])


def whole_run_metrics(metrics: dict, entries: list[dict], segments: list[dict], resumed_at: int, steps: int) -> dict:
    """The Trainer's metrics (this segment's) made the whole run's: `train_loss` the mean step loss over every
    logged step (the steps before `resumed_at` from `lvit_log.jsonl`, this segment's from the Trainer), and
    `train_runtime` with the earlier segments' time up to their last checkpoint. Unchanged without a resume."""
    if not resumed_at:
        return metrics
    out = dict(metrics)
    covered, total, previous = 0, 0.0, 0
    for e in entries:
        if e.get("step", 0) > resumed_at:
            break
        if isinstance(e.get("loss"), (int, float)):
            span = e["step"] - previous
            covered, total, previous = covered + span, total + e["loss"] * span, e["step"]
    mine = steps - resumed_at
    if isinstance(metrics.get("train_loss"), (int, float)) and covered + mine:
        out["train_loss"] = (total + metrics["train_loss"] * mine) / (covered + mine)
    earlier = sum(float(s.get("runtime_s") or 0.0) for s in segments[:-1])
    runtime = metrics.get("train_runtime")
    if isinstance(runtime, (int, float)):
        out["train_runtime"] = earlier + runtime
        if out["train_runtime"] > 0:
            out["train_steps_per_second"] = steps / out["train_runtime"]
            rate = metrics.get("train_samples_per_second")
            if isinstance(rate, (int, float)) and mine > 0:  # this segment's samples a step, over the whole run
                out["train_samples_per_second"] = rate * runtime / mine * steps / out["train_runtime"]
    return out


def _show(value) -> str:
    return "(not set)" if value is None else repr(value)
