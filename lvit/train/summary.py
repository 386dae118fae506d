"""What a finished run says at its end: what it trained on, how long it took, where its loss ended, and the
commands that come next with this run's paths filled in (`RunSummary.format()`, logged by `TrainingRun.save`)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from lvit.data.images import resolve_image_path


@dataclass
class RunSummary:
    out: Path
    stage: str
    steps: int
    samples: int
    tokens: int | None
    """Tokens the model read (TRL's `num_tokens`, or the Trainer's `num_input_tokens_seen`), all processes."""
    wall_s: float
    resumed_from_step: int
    final_loss: float | None
    skipped: int
    total_records: int | None
    """None: streamed data (`data.streaming`), whose size is not known."""
    image: str | None
    """An image of the training data, for the example `lvit chat` command."""
    by_source: list[dict] | None = None
    """A mixture: per source, its samples, trained tokens and last logged loss (`by_source`)."""

    def format(self) -> str:
        wall = _duration(self.wall_s)
        if self.resumed_from_step:
            wall += f" (the whole run; resumed at step {self.resumed_from_step})"
        parts = [f"{self.steps} steps", f"{self.samples:,} samples"]
        if self.tokens:
            parts.append(f"{self.tokens:,} tokens")
        lines = [f"trained {', '.join(parts)} in {wall}"]
        if self.final_loss is not None:
            lines.append(f"final loss {self.final_loss:.4g} (history: lvit_log.jsonl, plot: lvit_loss.png)")
        for entry in self.by_source or []:
            loss = f", last loss {entry['loss']:.4g}" if entry.get("loss") is not None else ""
            lines.append(
                f"  {entry['name']}: {entry['samples']:,} samples ({entry['share']:.1%}), {entry['tokens']:,} trained "
                f"tokens{loss}"
            )
        if self.skipped:
            of = "" if self.total_records is None else f" of {self.total_records}"
            lines.append(f"{self.skipped}{of} record(s) left out of training (skipped_records.jsonl)")
        else:
            lines.append("no record was left out of training")
        out = shlex.quote(str(self.out))
        lines.append("next:")
        if self.stage == "align":
            lines.append(f"  stage 2 from this projector: lvit finetune STAGE2_RECIPE model.projector_from={out}")
            lines.append(f"  lvit export {out} --projector-only --out {shlex.quote(str(self.out) + '-projector')}")
        else:
            lines.append(f"  lvit export {out} --out {shlex.quote(str(self.out) + '-export')}")
        image = shlex.quote(self.image) if self.image else "IMAGE"
        lines.append(f'  lvit chat {out} --image {image} --prompt "Describe the image."')
        return "\n".join(lines)


def summarize(training, wall_s: float, skipped: int) -> RunSummary:
    """The summary of a `TrainingRun` after `train()`."""
    trainer, recipe = training.trainer, training.recipe
    state, args = trainer.state, trainer.args
    entries = [e for e in training.history_entries() if isinstance(e.get("loss"), (int, float))]
    tokens = getattr(state, "num_input_tokens_seen", 0) or None
    if not tokens:
        counted = [e["num_tokens"] for e in training.history_entries() if isinstance(e.get("num_tokens"), (int, float))]
        tokens = int(counted[-1]) if counted else None
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    dataset, mixture, streamed = training.prepared.dataset, training.prepared.plan, recipe.data.streaming
    first = None if streamed else next((i for i, p in enumerate(dataset["image_path"]) if p is not None), None)
    image = None
    if first is not None:
        row = dataset[first]
        folder = recipe.data.image_folder if mixture is None else mixture.sources[row["source"]].image_folder
        image = str(resolve_image_path(row["image_path"], folder).resolve())
    per_epoch = len(dataset) if mixture is None and not streamed else None
    if per_epoch is None:
        per_epoch = max(1, state.global_step * batch) if streamed else mixture.samples_per_epoch
    names = [s.name for s in mixture.sources] if mixture else dataset.names if streamed and dataset.mixture else None
    return RunSummary(
        out=Path(training.out).resolve(),
        stage=recipe.stage,
        steps=state.global_step,
        samples=_samples(state.global_step, batch, per_epoch)
        if getattr(trainer, "token_budget", None) is None
        else trainer.token_budget.samples_drawn(state.global_step, args.gradient_accumulation_steps),
        tokens=int(tokens) if tokens else None,
        wall_s=wall_s,
        resumed_from_step=training.resumed_step,
        final_loss=entries[-1]["loss"] if entries else None,
        skipped=skipped,
        total_records=None if streamed else training.prepared.total,
        image=image,
        by_source=by_source(training.history_entries(), names) if names else None,
    )


def by_source(entries: list[dict], names: list[str]) -> list[dict]:
    """Per source of a mixture, from `lvit_log.jsonl` (the whole run): samples and trained tokens (summed over the
    logs), their share of the samples, and the last logged loss."""
    out = []
    for name in names:
        samples = sum(int(e.get(f"samples/{name}", 0)) for e in entries)
        tokens = sum(int(e.get(f"tokens/{name}", 0)) for e in entries)
        losses = [e[f"loss/{name}"] for e in entries if isinstance(e.get(f"loss/{name}"), (int, float))]
        out.append({"name": name, "samples": samples, "tokens": tokens, "loss": losses[-1] if losses else None})
    total = sum(e["samples"] for e in out) or 1
    for e in out:
        e["share"] = e["samples"] / total
    return out


def _samples(steps: int, batch: int, n_records: int) -> int:
    """Samples the steps drew: whole epochs of `n_records` (the last batch of an epoch may be short), then full
    batches."""
    per_epoch = -(-n_records // batch)
    epochs, rest = divmod(steps, per_epoch)
    return epochs * n_records + rest * batch


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
