"""The `lvit` command line. Heavy libraries are imported inside the commands so `--help` is fast."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from lvit.data.cli import data_app
from lvit.errors import LvitError

app = typer.Typer(
    help="LLaVA-style visual instruction tuning: stage-1 alignment and stage-2 instruction tuning on TRL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")


@app.command(context_settings={"allow_extra_args": False})
def finetune(
    recipe: Path = typer.Argument(..., help="A YAML recipe, e.g. recipes/llava_stage2.yaml."),
    overrides: list[str] = typer.Argument(None, help="Recipe overrides: dotted.key=value (value read as YAML)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the recipe and its inputs; train nothing."),
    resume: bool = typer.Option(
        None,
        "--resume/--no-resume",
        help="Continue from the newest complete checkpoint in the output folder (default: when there is one).",
    ),
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
    ablation: bool = typer.Option(
        False, "--ablation", help="Also train stage 2 without stage 1 (fresh projector, same budget) and compare."
    ),
) -> None:
    """Train a tiny LLaVA end to end on synthetic data (stage 1, then stage 2). Downloads nothing."""
    from lvit.demo import run_demo

    run_demo(out, overwrite=overwrite, ablation=ablation)


@app.command()
def export(
    ctx: typer.Context,
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

    _show_progress(ctx)
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


# --- using and measuring a trained model ----------------------------------------------------------------------------

_MODEL_HELP = "An lvit run folder or checkpoint-N (any stage / method), or an exported / stock LLaVA folder."
_4BIT_HELP = "Load the language model in 4-bit NF4 (full runs and exported folders; QLoRA runs are 4-bit already)."


def _fail(exc: LvitError):
    """Print a user error as main() does, also when the app is invoked directly (CliRunner)."""
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class _Terminal(logging.Handler):
    """Progress messages on stdout, warnings on stderr (through typer, so a test runner's streams are used)."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(self.format(record), err=record.levelno >= logging.WARNING)


def _show_progress(ctx: typer.Context) -> None:
    """Show the library's messages (the "lvit" logger, INFO and up) while this command runs."""
    logger = logging.getLogger("lvit")
    handler, level = _Terminal(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(level)

    ctx.call_on_close(restore)


@app.command()
def chat(
    model: Path = typer.Argument(..., help=_MODEL_HELP),
    image: Path = typer.Option(None, "--image", help="The image the conversation is about (optional)."),
    prompt: str = typer.Option(
        None, "--prompt", help="Ask this one question and exit. Without it: one question per line, 'exit' or EOF ends."
    ),
    load_4bit: bool = typer.Option(False, "--load-4bit", help=_4BIT_HELP),
    temperature: float = typer.Option(0.0, "--temperature", help="0 (the default) decodes greedily."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling (with --temperature > 0)."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    device: str = typer.Option(None, "--device", help="Default: cuda if available, else cpu."),
) -> None:
    """Talk to a trained model about an image; answers stream as they are generated."""
    from lvit.chat import ChatSession, interactive
    from lvit.generation import GenerationSettings
    from lvit.runs import load_model

    try:
        settings = GenerationSettings(max_new_tokens, temperature, top_p)
        settings.kwargs()  # check the values before the model loads
        session = ChatSession(load_model(model, load_4bit=load_4bit, device=device), image, settings)
        if prompt is not None:
            session.ask(prompt, _write)
        else:
            interactive(session, sys.stdin, _write)
    except LvitError as exc:
        raise _fail(exc) from None


@app.command()
def generate(
    ctx: typer.Context,
    model: Path = typer.Argument(..., help=_MODEL_HELP),
    data: Path = typer.Option(
        ..., "--data", help="Questions in any data format lvit reads; the last user turn of each record is answered."
    ),
    out: Path = typer.Option(..., "--out", help="JSONL answer file; ids already in it are skipped (resume)."),
    image_folder: Path = typer.Option(None, "--image-folder", help="Folder the data's image paths are relative to."),
    batch_size: int = typer.Option(16, "--batch-size"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 (the default) decodes greedily."),
    top_p: float = typer.Option(1.0, "--top-p"),
    load_4bit: bool = typer.Option(False, "--load-4bit", help=_4BIT_HELP),
    device: str = typer.Option(None, "--device", help="Default: cuda if available, else cpu."),
) -> None:
    """Answer a question file into a JSONL file (batched, resumable)."""
    from lvit.answers import answer_question_file
    from lvit.generation import GenerationSettings

    _show_progress(ctx)
    try:
        answers = answer_question_file(
            model,
            data,
            out,
            image_folder,
            GenerationSettings(max_new_tokens, temperature, top_p),
            batch_size,
            load_4bit=load_4bit,
            device=device,
        )
    except LvitError as exc:
        raise _fail(exc) from None
    typer.echo(f"{len(answers.answered)} answers in {out}")
    scores = answers.exact_match()
    if scores is not None:
        typer.echo(f"exact match against the references: {scores['accuracy']:.1%} of {scores['total']}")


eval_app = typer.Typer(
    help="Benchmarks: generate answers with a model and score them as LLaVA does (or score existing outputs).",
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")


@eval_app.command("scienceqa")
def eval_scienceqa(
    ctx: typer.Context,
    model: Path = typer.Argument(None, help=_MODEL_HELP + " Omit with --predictions."),
    problems: Path = typer.Option(..., "--problems", help="ScienceQA's problems.json."),
    splits: Path = typer.Option(..., "--splits", help="ScienceQA's pid_splits.json."),
    predictions: Path = typer.Option(
        None, "--predictions", help="Score these outputs only: JSON {problem id: output} or an answers JSONL."
    ),
    split: str = typer.Option("test", "--split"),
    image_folder: Path = typer.Option(None, "--image-folder", help="Default: images/<split> beside problems.json."),
    out: Path = typer.Option(
        None, "--out", help="Folder for answers.jsonl and results.json (default: MODEL/eval/scienceqa-<split>)."
    ),
    batch_size: int = typer.Option(16, "--batch-size"),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens", help="LLaVA's model_vqa_science default."),
    answer_format: str = typer.Option(
        "lecture-solution",
        "--answer-format",
        help="The prompt the model was trained on: lecture-solution (LLaVA's QCM-LEA, the paper's ScienceQA "
        "fine-tune) or letter (LLaVA-1.5's single-letter instruction).",
    ),
    limit: int = typer.Option(None, "--limit", help="Only the first N problems of the split (a quick look)."),
    load_4bit: bool = typer.Option(False, "--load-4bit", help=_4BIT_HELP),
    device: str = typer.Option(None, "--device"),
) -> None:
    """ScienceQA accuracy, overall and by subject (NAT/SOC/LAN), context (TXT/IMG/NO) and grade."""
    from lvit.eval import scienceqa as sqa
    from lvit.generation import GenerationSettings

    _show_progress(ctx)
    try:
        result = sqa.run_eval(
            model,
            problems,
            splits,
            predictions=predictions,
            split=split,
            out=out,
            image_folder=image_folder,
            settings=GenerationSettings(max_new_tokens),
            batch_size=batch_size,
            load_4bit=load_4bit,
            device=device,
            limit=limit,
            answer_format=answer_format,
        )
    except LvitError as exc:
        raise _fail(exc) from None
    typer.echo(sqa.format_table(result.scores, f"ScienceQA {split} ({result.scores['total']} problems)"))
    typer.echo(f"results: {result.path}")


@eval_app.command("pope")
def eval_pope(
    ctx: typer.Context,
    model: Path = typer.Argument(None, help=_MODEL_HELP + " Omit with --predictions."),
    annotations: list[Path] = typer.Option(
        ..., "--annotations", help="A POPE split file (coco_pope_<split>.json) or a folder holding them; repeatable."
    ),
    predictions: Path = typer.Option(
        None, "--predictions", help="Score these outputs only: an answers JSONL (ids '<split>-<question_id>')."
    ),
    image_folder: Path = typer.Option(None, "--image-folder", help="Folder of the COCO images the files name."),
    out: Path = typer.Option(
        None, "--out", help="Folder for answers.jsonl and results.json (default: MODEL/eval/pope)."
    ),
    batch_size: int = typer.Option(16, "--batch-size"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="LLaVA's model_vqa_loader default."),
    prompt_suffix: str = typer.Option(
        "", "--prompt-suffix", help="Appended to each question, e.g. LLaVA-1.5's single-word instruction."
    ),
    limit: int = typer.Option(None, "--limit", help="Only the first N questions of each split (a quick look)."),
    load_4bit: bool = typer.Option(False, "--load-4bit", help=_4BIT_HELP),
    device: str = typer.Option(None, "--device"),
) -> None:
    """POPE: accuracy, precision, recall, F1 and yes-ratio per split (adversarial / popular / random)."""
    from lvit.eval import pope
    from lvit.generation import GenerationSettings

    _show_progress(ctx)
    try:
        result = pope.run_eval(
            model,
            annotations,
            predictions=predictions,
            out=out,
            image_folder=image_folder,
            settings=GenerationSettings(max_new_tokens),
            batch_size=batch_size,
            load_4bit=load_4bit,
            device=device,
            limit=limit,
            prompt_suffix=_unescape(prompt_suffix),
        )
    except LvitError as exc:
        raise _fail(exc) from None
    typer.echo(pope.format_table(result.scores))
    typer.echo(f"results: {result.path}")


def _unescape(text: str) -> str:
    """`--prompt-suffix '\\nAnswer ...'` as typed in a shell: a literal backslash-n is a newline."""
    return text.replace("\\n", "\n")


def main() -> None:
    try:
        app()
    except LvitError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
