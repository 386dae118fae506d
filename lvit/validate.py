"""`lvit finetune RECIPE --dry-run`: check a recipe and its inputs without training.

The structure (keys, types, the `SFTConfig` it builds, the batch arithmetic) is checked first;
then the inputs a real run needs (data files, model sources). Each check prints one line; the
exit status is non-zero if any failed.
"""

from __future__ import annotations

import typer

from lvit.errors import LvitError
from lvit.recipe import Recipe, gradient_accumulation


def dry_run(recipe: Recipe) -> bool:
    from lvit.hub import resolve_source
    from lvit.train import build_sft_config, check_inputs

    ok = True

    def report(passed: bool, what: str, detail: str = "") -> None:
        nonlocal ok
        ok &= passed
        mark = typer.style("ok  ", fg=typer.colors.GREEN) if passed else typer.style("FAIL", fg=typer.colors.RED)
        line = f"  {mark} {what}"
        if detail:
            line += "\n         " + detail.replace("\n", "\n         ")
        typer.echo(line)

    typer.echo(
        f"recipe {recipe.source}: stage {recipe.stage}, projector {recipe.model.projector}, "
        f"template {recipe.data.template}"
    )
    report(True, "structure: every key known and well typed")
    try:
        args = build_sft_config(recipe, num_processes=1)
        report(True, f"training section builds an SFTConfig (output_dir {args.output_dir})")
    except LvitError as exc:
        try:
            args = build_sft_config(recipe, num_processes=1, check_device=False)
            report(True, f"training section builds an SFTConfig (output_dir {args.output_dir})")
            why = str(exc).split("not valid: ", 1)[-1]
            typer.echo(
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
                typer.echo(
                    f"        {n} process(es): {per_device} per device x {acc} accumulation x {n} = "
                    f"{recipe.global_batch_size} global batch"
                )
            except LvitError:
                typer.echo(
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
    typer.echo("dry run passed: ready to train" if ok else "dry run found problems (above)")
    return ok
