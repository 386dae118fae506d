"""The `lvit` command line. Heavy libraries are imported inside the commands so `--help` is fast."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from lvit.errors import LvitError

app = typer.Typer(
    help="LLaVA-style visual instruction tuning: stage-1 alignment and stage-2 instruction tuning on TRL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command(context_settings={"allow_extra_args": False})
def finetune(
    recipe: Path = typer.Argument(..., help="A YAML recipe, e.g. recipes/llava_stage2.yaml."),
    overrides: list[str] = typer.Argument(None, help="Recipe overrides: dotted.key=value (value read as YAML)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the recipe and its inputs; train nothing."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in the output folder."),
) -> None:
    """Train one stage as described by RECIPE."""
    from lvit.recipe import load_recipe

    rec = load_recipe(recipe, overrides or [])
    if dry_run:
        from lvit.validate import dry_run as do_dry_run

        ok = do_dry_run(rec)
        raise typer.Exit(0 if ok else 1)
    from lvit.train import run

    out = run(rec, resume=resume)
    typer.echo(f"done: run saved in {out}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the tiny model, data and runs."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete --out first if it exists."),
) -> None:
    """Train a tiny LLaVA end to end on synthetic data (stage 1, then stage 2). Downloads nothing."""
    from lvit.demo import run_demo

    run_demo(out, overwrite=overwrite)


def main() -> None:
    try:
        app()
    except LvitError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
