"""`lvit finetune RECIPE --dry-run`: check a recipe and its inputs without training.

The structure (keys, types, the `SFTConfig` it builds, the batch arithmetic) is checked first;
then the inputs a real run needs (data files, model sources). `dry_run` returns the checks and
notes in order (`DryRun`); the CLI prints one line per check and exits non-zero if any failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lvit.errors import LvitError
from lvit.recipe import Recipe, gradient_accumulation


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


def dry_run(recipe: Recipe) -> DryRun:
    """Check `recipe` (structure, training section, batch arithmetic, data, model sources); loads no model."""
    from lvit.hub import resolve_source
    from lvit.train import build_sft_config, check_inputs

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
        check_inputs(recipe)
        report(True, f"data: {recipe.data.path}")
    except LvitError as exc:
        report(False, "data", str(exc))
    for key in ("vision_tower", "language_model"):
        try:
            resolve_source(getattr(recipe.model, key), f"model.{key}", recipe.source)
            report(True, f"model.{key}: {getattr(recipe.model, key)}")
        except LvitError as exc:
            report(False, f"model.{key}", str(exc))
    return result
