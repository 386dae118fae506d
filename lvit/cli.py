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


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="An lvit run folder (training.output_dir) or one of its checkpoint-N."),
    out: Path = typer.Option(..., "--out", help="Folder to write the export to (created; must not hold files)."),
    dtype: str = typer.Option(
        None, "--dtype", help="bf16 (default), fp16 or fp32. --projector-only keeps the trained dtype by default."
    ),
    projector_only: bool = typer.Option(
        False, "--projector-only", help="Write only the projector, for a stage-2 recipe's model.projector_from."
    ),
    tolerance: float = typer.Option(
        None, "--tolerance", help="Largest logit difference the self-check accepts (default: per kind and dtype)."
    ),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors file, e.g. 5GB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it is not empty (after the check)."),
    device: str = typer.Option(None, "--device", help="Where the self-check runs (default: cuda if available)."),
) -> None:
    """Export a run (any stage / method, or a checkpoint) as a stock, self-checked LLaVA folder."""
    from lvit.export import export as do_export

    try:
        do_export(
            run_dir,
            out,
            dtype=dtype,
            projector_only=projector_only,
            tolerance=tolerance,
            overwrite=overwrite,
            max_shard_size=max_shard_size,
            device=device,
        )
    except LvitError as exc:  # printed as by main(), also when the app is invoked directly (CliRunner)
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def main() -> None:
    try:
        app()
    except LvitError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
