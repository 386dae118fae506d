"""`lvit finetune` and `lvit demo`: training a recipe (or checking it with --dry-run), and the offline demo."""

from __future__ import annotations

from pathlib import Path

import typer


def finetune(
    recipe: Path = typer.Argument(
        ...,
        help="A YAML recipe, e.g. recipes/llava_stage2.yaml, or the name of a shipped recipe (e.g. llava_stage2; "
        "`lvit recipes ls` lists them), used when no file of that path exists.",
    ),
    overrides: list[str] = typer.Argument(None, help="Recipe overrides: dotted.key=value (value read as YAML)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the recipe and its inputs; train nothing."),
    resume: bool = typer.Option(
        None,
        "--resume/--no-resume",
        help="Continue from the newest complete checkpoint in the output folder (default: when there is one).",
    ),
    allow_changed: list[str] = typer.Option(
        None,
        "--allow-changed",
        metavar="KEY",
        help="Resume although the recipe's KEY (e.g. training.learning_rate) differs from the checkpoint's; "
        "repeat for several. Without it such a resume is refused with the list of changes.",
    ),
) -> None:
    """Train one stage as described by RECIPE.

    The run folder (training.output_dir) gets the weights, the recipe (model and data paths made absolute),
    lvit_log.jsonl (one line per logging step) and lvit_loss.png (the loss curve).

    Exit status: 0 trained; 1 --dry-run found problems; 2 an error (the message says what to fix); 143 stopped
    by SIGTERM (130: Ctrl-C) after saving a checkpoint at the end of the current step: run the same command to
    resume from it (a scheduler may requeue on 143); 3 stopped at a record it cannot read, the steps done saved:
    fix the record or set data.on_bad_record=skip, and run the same command. A resume keeps the settings the run
    trained with: a changed learning rate, batch size, data or model is refused unless --allow-changed names it.
    """
    from lvit.console import quiet_libraries
    from lvit.recipe.load import load_recipe

    quiet_libraries()  # before the libraries load: their notices a user cannot act on stay off the console

    rec = load_recipe(recipe, overrides or [])
    if dry_run:
        from lvit.train.dry_run import dry_run as do_dry_run

        result = do_dry_run(rec, resume=resume, allow_changed=tuple(allow_changed or ()))
        _print_dry_run(result)
        raise typer.Exit(0 if result.ok else 1)
    import shlex

    from lvit.train.run import run

    said = ["lvit", "finetune", str(recipe), *(overrides or [])]
    said += [f"--allow-changed={key}" for key in allow_changed or ()]
    said += [] if resume is None else ["--resume" if resume else "--no-resume"]
    out = run(rec, resume=resume, allow_changed=tuple(allow_changed or ()), command=shlex.join(said))
    typer.echo(f"done: run saved in {out}")


def _print_dry_run(result) -> None:
    """One line per check (`ok  ` green / `FAIL` red, the failure's detail indented below), notes as they are."""
    from lvit.train.dry_run import Check

    rec = result.recipe
    anyres = ", architecture llava_next (AnyRes)" if rec.model.architecture == "llava_next" else ""
    typer.echo(
        f"recipe {rec.source}: stage {rec.stage}, projector {rec.model.projector}, template {rec.data.template}{anyres}"
    )
    for item in result.items:
        if not isinstance(item, Check):
            typer.echo(item)
            continue
        mark = typer.style("ok  ", fg=typer.colors.GREEN) if item.passed else typer.style("FAIL", fg=typer.colors.RED)
        line = f"  {mark} {item.what}"
        if item.detail:
            line += "\n         " + item.detail.replace("\n", "\n         ")
        typer.echo(line)
    typer.echo("dry run passed: ready to train" if result.ok else "dry run found problems (above)")


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the tiny model, data and runs."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete --out first if it exists."),
    ablation: bool = typer.Option(
        False, "--ablation", help="Also train stage 2 without stage 1 (fresh projector, same budget) and compare."
    ),
    quick: bool = typer.Option(
        False, "--quick", help="A few records and training steps: seconds, to see it run (it does not learn the task)."
    ),
) -> None:
    """Train a tiny LLaVA end to end on synthetic data (stage 1, then stage 2). Downloads nothing."""
    from lvit.console import quiet_libraries
    from lvit.demo.run import format_summary, run_demo

    quiet_libraries()  # as for finetune: library notices a user cannot act on stay off the console
    typer.echo(format_summary(run_demo(out, overwrite=overwrite, ablation=ablation, quick=quick)))
