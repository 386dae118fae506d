"""The loss history of a run: one log line per logging step, the run folder's `lvit_log.jsonl`, and its plot.

`TrainingLog` is the Trainer callback that replaces the Trainer's own printing (`PrinterCallback` prints each
log as a Python dict of strings, `ProgressCallback` writes the same through tqdm): each logging step becomes
one lvit log line (`step 10/40  loss 2.31  lr 2.0e-05  grad_norm 1.2`) and one JSON line in
`lvit_log.jsonl` (`LOG_FILE`), written as training goes, so a run killed at any point keeps what it logged.
A resumed run keeps the lines up to its checkpoint's step and appends, so the file covers the whole run.

`plot_history` draws the training loss (and eval loss and learning rate where present) as `lvit_loss.png`
(`PLOT_FILE`), with matplotlib's Agg backend, imported when called.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from lvit.runs.files import PLOT_FILE

log = logging.getLogger(__name__)

# The Trainer's last log of a run (train_runtime, train_loss, ...): the summary's, not a step's.
_END_KEYS = ("train_runtime", "train_loss", "train_samples_per_second", "train_steps_per_second", "total_flos")
_COUNT_PREFIXES = ("samples/", "tokens/")
_LINE_KEYS = (("loss", "loss", "{:.4g}"), ("learning_rate", "lr", "{:.1e}"), ("grad_norm", "grad_norm", "{:.3g}"))


def read_log(path: str | Path) -> list[dict]:
    """The entries of an `lvit_log.jsonl` (a cut-off last line is ignored); [] when there is none."""
    path = Path(path)
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def format_entry(entry: dict, max_steps: int | None = None) -> str:
    """`step 10/40  loss 2.31  lr 2.0e-05  grad_norm 1.2` (and eval metrics): one logging step as a log line."""
    step = f"step {entry['step']}" + (f"/{max_steps}" if max_steps else "")
    parts = [step]
    for key, label, fmt in _LINE_KEYS:
        if isinstance(entry.get(key), (int, float)):
            parts.append(f"{label} {fmt.format(entry[key])}")
    by_source = [f"{k[5:]} {v:.4g}" for k, v in entry.items() if k.startswith("loss/") and isinstance(v, (int, float))]
    if by_source:
        parts.append(f"({', '.join(by_source)})")
    for key, value in entry.items():
        timing = key.endswith(("_runtime", "_per_second"))
        if key.startswith("eval_") and isinstance(value, (int, float)) and not timing:
            parts.append(f"{key} {value:.4g}")
    return "  ".join(parts)


class TrainingLog(TrainerCallback):
    """Each Trainer log: one lvit log line and one line of `lvit_log.jsonl` (main process)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.end: dict = {}
        """The Trainer's last log (train_runtime, train_loss, ...), for the summary."""

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        # A resumed run starts at its checkpoint's step: keep what the first part logged up to there.
        kept = [e for e in read_log(self.path) if e.get("step", 0) <= state.global_step] if state.global_step else []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(e) + "\n" for e in kept), encoding="utf-8")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if any(key in logs for key in _END_KEYS):
            self.end = dict(logs)
            # a mixture's samples and tokens per source since the last log: kept, so the file's sums cover the run
            counts = {k: v for k, v in logs.items() if k.startswith(_COUNT_PREFIXES) and v}
            if counts:
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **counts}) + "\n")
            return
        entry = {"step": state.global_step, "epoch": state.epoch}
        entry.update({k: v for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)})
        entry.update({k: None for k, v in logs.items() if isinstance(v, float) and not math.isfinite(v)})
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        log.info("%s", format_entry(entry, state.max_steps))


class ProgressBar(ProgressCallback):
    """tqdm's training bar without its printing of each log (`TrainingLog` logs them as lines)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return


def install(trainer, path: str | Path, progress_bar: bool) -> TrainingLog:
    """Replace the Trainer's printing callbacks with `TrainingLog` (and `ProgressBar` when `progress_bar`)."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress_bar:
        trainer.add_callback(ProgressBar)
    history = TrainingLog(path)
    trainer.add_callback(history)
    return history


def source_names(entries: list[dict]) -> list[str]:
    """The sources a mixture's log entries name (`loss/<name>`), in the order first met."""
    return list(dict.fromkeys(k[5:] for e in entries for k in e if k.startswith("loss/")))


def plot_history(
    entries: list[dict], out: str | Path, title: str = "", resumed_at: tuple[int, ...] = ()
) -> Path | None:
    """Training loss per step (eval loss on the same axes, learning rate on a second axis) as a PNG; None when
    there is nothing to draw. Steps are whole numbers, the last one is marked, and so is each step a resumed run
    continued from (`resumed_at`)."""
    train = [(e["step"], e["loss"]) for e in entries if isinstance(e.get("loss"), (int, float))]
    evals = [(e["step"], e["eval_loss"]) for e in entries if isinstance(e.get("eval_loss"), (int, float))]
    lrs = [(e["step"], e["learning_rate"]) for e in entries if isinstance(e.get("learning_rate"), (int, float))]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if train:
        marker = "." if len(train) < 50 else None
        ax.plot(*zip(*train, strict=True), label="training loss", color="tab:blue", marker=marker)
    if evals:
        ax.plot(*zip(*evals, strict=True), label="eval loss", color="tab:orange", marker="o")
    for name in source_names(entries):  # a mixture: the training loss of each source
        points = [(e["step"], e[f"loss/{name}"]) for e in entries if isinstance(e.get(f"loss/{name}"), (int, float))]
        ax.plot(*zip(*points, strict=True), label=f"loss: {name}", linewidth=1, alpha=0.8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for k, step in enumerate(resumed_at):
        ax.axvline(step, color="tab:red", linestyle=":", linewidth=1, label="resumed" if k == 0 else None)
    if train:
        last_step, last_loss = train[-1]
        ax.annotate(f"step {last_step}: {last_loss:.4g}", (last_step, last_loss), textcoords="offset points",
                    xytext=(-8, 10), ha="right", fontsize=8)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lrs, strict=True), label="learning rate", color="tab:gray", linestyle="--", linewidth=1)
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        more_handles, more_labels = ax2.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="upper right")
    if title:
        ax.set_title(title)
    path = Path(out) / PLOT_FILE
    fig.savefig(path)
    return path
