"""`lvit finetune RECIPE --dry-run`: check a recipe and its inputs without training.

The structure (keys, types, the `SFTConfig` it builds, the batch arithmetic) is checked first;
then what a real run checks before its first step: the data files, the model sources, every record
(the same inspection as training, `lvit.data.dataset.inspect_for_training`, with the recipe's
tokenizer and vision config, no weights), the output folder (`lvit.runs.resume.resume_checkpoint`'s rules,
nothing renamed) and `training.report_to`'s packages. `dry_run` returns the checks and notes in
order (`DryRun`); the CLI prints one line per check and exits non-zero if any failed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lvit.data.check import encoder_from_recipe
from lvit.data.dataset import inspect_for_training
from lvit.data.mixture import sources_of
from lvit.data.stream.check import checked_samples
from lvit.data.stream.dataset import streamed_sources
from lvit.data.stream.source_stream import Problem
from lvit.errors import LvitError
from lvit.model.hub import resolve_source
from lvit.recipe.load import gradient_accumulation
from lvit.recipe.report_to import check_report_to
from lvit.recipe.schema import Recipe
from lvit.runs.resume import resume_checkpoint
from lvit.train.checks import check_data_inputs
from lvit.train.config import build_sft_config
from lvit.train.segments import check_resume


@dataclass(frozen=True)
class Check:
    """One check of a dry run: passed or not, what was checked, and why it failed (or more detail)."""

    passed: bool
    what: str
    detail: str = ""


@dataclass
class DryRun:
    """The outcome of `dry_run`: `items` are `Check`s and notes (a `str`: one line as printed) in order."""

    recipe: Recipe
    items: list[Check | str] = field(default_factory=list)

    @property
    def checks(self) -> list[Check]:
        return [item for item in self.items if isinstance(item, Check)]

    @property
    def ok(self) -> bool:
        return all(check.passed for check in self.checks)


def dry_run(recipe: Recipe, resume: bool | None = None, allow_changed: tuple[str, ...] = ()) -> DryRun:
    """Check `recipe` (structure, training section, batch arithmetic, data, model sources, records, output
    folder and what a resume would change, reporting integrations); loads no model. `resume`, `allow_changed` as
    for `lvit.train.run.run`."""

    result = DryRun(recipe)

    def report(passed: bool, what: str, detail: str = "") -> None:
        result.items.append(Check(passed, what, detail))

    report(True, "structure: every key known and well typed")
    try:
        args = build_sft_config(recipe, num_processes=1)
        report(True, f"training section builds an SFTConfig (output_dir {args.output_dir})")
    except LvitError as exc:
        try:
            args = build_sft_config(recipe, num_processes=1, check_device=False)
            report(True, f"training section builds an SFTConfig (output_dir {args.output_dir})")
            why = str(exc).split("not valid: ", 1)[-1]
            result.items.append(
                f"  note this machine cannot run the recipe's precision settings ({why}); "
                "checked with bf16/fp16/tf32 off"
            )
        except LvitError as exc2:
            report(False, "training section", str(exc2))
            args = None
    if recipe.global_batch_size is not None:
        per_device = recipe.training.get("per_device_train_batch_size", 8)
        for n in (1, 2, 4, 8):
            try:
                acc = gradient_accumulation(recipe, n)
                result.items.append(
                    f"        {n} process(es): {per_device} per device x {acc} accumulation x {n} = "
                    f"{recipe.global_batch_size} global batch"
                )
            except LvitError:
                result.items.append(
                    f"        {n} process(es): global batch {recipe.global_batch_size} not reachable "
                    f"with {per_device} per device"
                )
    try:
        check_data_inputs(recipe)
        data_found = True
        sources = sources_of(recipe.data, recipe.source)
        names = ", ".join(f"{s.name} ({s.amount})" for s in sources)
        one = len(sources) == 1 and recipe.data.sources is None
        report(True, f"data: {recipe.data.path}" if one else f"data: {names}")
    except LvitError as exc:
        data_found = False
        text = str(exc)
        report(False, next((k for k in ("model.projector_from", "eval.data") if k in text), "data"), text)
    models_found = True
    for key in ("vision_tower", "language_model"):
        try:
            resolve_source(getattr(recipe.model, key), f"model.{key}", recipe.source)
            report(True, f"model.{key}: {getattr(recipe.model, key)}")
        except LvitError as exc:
            models_found = False
            report(False, f"model.{key}", str(exc))
    if data_found and models_found:
        _check_records(recipe, report, result.items)
    else:
        result.items.append("  note the records were not checked (the data or a model source is missing)")
    _check_output_folder(recipe, args, resume, report, allow_changed)
    try:
        check_report_to(recipe)
        report(True, f"training.report_to: {recipe.training.get('report_to', 'none')}")
    except LvitError as exc:
        report(False, "training.report_to", str(exc))
    return result


def _check_records(recipe: Recipe, report, notes: list) -> None:
    """Every record, as training checks them before its first step (data.on_bad_record, data.overlong)."""

    if recipe.data.streaming:
        _check_streamed(recipe, report)
        return
    sources = sources_of(recipe.data, recipe.source)
    header_only = False
    for source in sources:
        label = "records" if len(sources) == 1 and recipe.data.sources is None else f"records of {source.name}"
        try:
            encoder = encoder_from_recipe(recipe, source.template)
            insp, _, bad = inspect_for_training(source, encoder, recipe.source)
        except LvitError as exc:
            report(False, label, str(exc))
            return
        left_out = len({p.index for p in bad}) + len(insp.dropped)
        report(
            True,
            f"{label}: {insp.total - left_out} of {insp.total} trainable"
            + (f" ({left_out} left out, listed in the run's skipped_records.jsonl)" if left_out else ""),
        )
        header_only |= not insp.decoded and any(r.image is not None for r in insp.usable)
    if header_only:
        notes.append(
            "  note images were checked by their header, as the run checks them: a file cut off after it stops the "
            "run where it is met, the steps done saved (exit 3); `lvit data check --decode` finds such files now"
        )


def _check_streamed(recipe: Recipe, report, limit: int = 1000) -> None:
    """data.streaming: each source's shards, and its first `limit` samples checked as the run checks them."""
    try:
        sources = streamed_sources(recipe.data, recipe.source)
        for source, kind, shards in sources:
            encoder = encoder_from_recipe(recipe, source.template)
            results = [r for _, r in checked_samples(source, kind, shards, encoder, limit=limit)]
            bad = [r for r in results if isinstance(r, Problem)]
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(Counter(p.kind for p in bad).items()))
            report(
                True,
                f"records of {source.name} (streamed, {len(shards)} {kind} shard(s); the first {len(results)} "
                f"checked): {len(results) - len(bad)} trainable" + (f", {len(bad)} left out ({kinds})" if bad else ""),
            )
    except LvitError as exc:
        report(False, "records", str(exc))


def _check_output_folder(recipe: Recipe, args, resume: bool | None, report, allow_changed=()) -> None:
    """The output folder, by `resume_checkpoint`'s rules (which only read it), and a resume's settings
    (`check_resume`), as the run checks them."""
    out = Path(args.output_dir if args is not None else recipe.training.get("output_dir", ""))
    if args is None and not str(out):
        return
    try:
        checkpoint = resume_checkpoint(out, resume, recipe.source)
        if checkpoint is not None:
            check_resume(recipe, checkpoint, allow_changed)
    except LvitError as exc:
        report(False, "output folder", str(exc))
        return
    report(True, f"output folder {out}: " + (f"resumes from {checkpoint.name}" if checkpoint else "a new run"))
