"""The `lvit` command line. Heavy libraries are imported inside the commands so `--help` is fast.

User mistakes are raised as `LvitError` anywhere below a command; `LvitGroup.invoke` turns them into
`error: <message>` on stderr and exit status 2, for every command and sub-command, whether the app
runs from `main()` (the `lvit` script, `python -m lvit`) or is invoked directly (`typer.testing.CliRunner`).
A training run stopped by SIGTERM / Ctrl-C after saving a checkpoint (`lvit.preemption.Preempted`) becomes
`stopped by SIGTERM at step N; ...` and its own exit status (143 for SIGTERM, 130 for Ctrl-C).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer
from typer.core import TyperGroup

from lvit import endpoint_cli
from lvit.data.cli import data_app
from lvit.errors import LvitError, Preempted


class LvitGroup(TyperGroup):
    """The top-level group: an `LvitError` from any command below it becomes a message and exit status 2; a
    preempted run (`Preempted`) its message and its own status (143 SIGTERM, 130 Ctrl-C)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LvitError as exc:  # an `Interrupted` says so, and exits 130 as a shell does on Ctrl-C
            typer.secho(f"{getattr(exc, 'label', 'error')}: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(getattr(exc, "exit_code", 2)) from None
        except Preempted as exc:
            typer.secho(str(exc), fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(exc.exit_status) from None


app = typer.Typer(
    cls=LvitGroup,
    help="LLaVA-style visual instruction tuning: stage-1 alignment and stage-2 instruction tuning on TRL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")


class _StderrHandler(logging.StreamHandler):
    """A handler on the current `sys.stderr` (which `CliRunner` replaces for each invocation)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _ShortFormatter(logging.Formatter):
    """lvit's progress as `12:00:00 message`; anything else with its level and logger name."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        self._progress = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO and record.name.split(".")[0] == "lvit":
            return self._progress.format(record)
        return super().format(record)


def setup_logging() -> None:
    """lvit's messages (progress at INFO, warnings) on stderr in a short format; results go to stdout.

    The handler sits on the "lvit" logger, added once per process (`CliRunner` invokes the app many
    times in one process), so an application's or pytest's root handlers are left as they are.
    `lvit.train` lowers lvit's level to WARNING on all but the main training process.
    """
    logger = logging.getLogger("lvit")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_ShortFormatter())
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


# OpenMP settings lvit uses unless the user set the variable (docs/stack-notes.md#omp-threads-shared-cpu)
OMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def set_thread_defaults() -> None:
    """Set `OMP_DEFAULTS` in `os.environ` where the user has not set the variable.

    With the default (active) policy, torch's OpenMP threads spin waiting for each other; on a shared
    CPU each then waits for its core at every operator, and a run slows down far more than its share of
    the CPU. PASSIVE threads sleep instead. libgomp reads the variable when torch is imported, so this
    runs in the app callback, before any command imports torch (`import lvit.cli` imports no torch).
    """
    for name, value in OMP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("lvit")
        except PackageNotFoundError:  # run from a checkout that was never installed
            from lvit import __version__ as number
        typer.echo(f"lvit {number}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print lvit's version and exit."
    ),
) -> None:
    set_thread_defaults()  # before a command imports torch
    setup_logging()


@app.command(context_settings={"allow_extra_args": False})
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
) -> None:
    """Train one stage as described by RECIPE.

    The run folder (training.output_dir) gets the weights, the recipe (model and data paths made absolute),
    lvit_log.jsonl (one line per logging step) and lvit_loss.png (the loss curve).

    Exit status: 0 trained; 1 --dry-run found problems; 2 an error (the message says what to fix); 143 stopped
    by SIGTERM (130: Ctrl-C) after saving a checkpoint at the end of the current step: run the same command to
    resume from it (a scheduler may requeue on 143).
    """
    from lvit.console import quiet_libraries
    from lvit.recipe import load_recipe

    quiet_libraries()  # before the libraries load: their notices a user cannot act on stay off the console

    rec = load_recipe(recipe, overrides or [])
    if dry_run:
        from lvit.validate import dry_run as do_dry_run

        result = do_dry_run(rec, resume=resume)
        _print_dry_run(result)
        raise typer.Exit(0 if result.ok else 1)
    from lvit.train import run

    out = run(rec, resume=resume)
    typer.echo(f"done: run saved in {out}")


def _print_dry_run(result) -> None:
    """One line per check (`ok  ` green / `FAIL` red, the failure's detail indented below), notes as they are."""
    from lvit.validate import Check

    rec = result.recipe
    typer.echo(f"recipe {rec.source}: stage {rec.stage}, projector {rec.model.projector}, template {rec.data.template}")
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


@app.command()
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
    from lvit.demo import format_summary, run_demo

    typer.echo(format_summary(run_demo(out, overwrite=overwrite, ablation=ablation, quick=quick)))


# --- the shipped recipes ----------------------------------------------------------------------------------------------

recipes_app = typer.Typer(
    help="The recipes that ship with lvit: list them, copy one to edit it. `lvit finetune NAME` runs one as it is.",
    no_args_is_help=True,
)
app.add_typer(recipes_app, name="recipes")


@recipes_app.command("ls")
def recipes_ls() -> None:
    """One line per shipped recipe: its name and what it is (training recipes, then accelerate launch configs)."""
    from lvit.catalog import shipped_recipes

    recipes = shipped_recipes()
    width = max(len(r.name) for r in recipes)
    for r in recipes:
        typer.echo(f"{r.name:<{width}}  {r.description}".rstrip())


@recipes_app.command("cp")
def recipes_cp(
    name: str = typer.Argument(..., help="A shipped recipe, with or without .yaml (see `lvit recipes ls`)."),
    dest: Path = typer.Argument(
        ..., help="A file to create (.yaml added when it has no suffix) or an existing folder. Never overwritten."
    ),
) -> None:
    """Copy the shipped recipe NAME to DEST, to edit it and run it with `lvit finetune DEST`."""
    from lvit.catalog import copy_recipe

    target = copy_recipe(name, dest)
    typer.echo(f"copied {name} to {target}")


_BASE_HELP = (
    "KEY=PATH, KEY vision_tower or language_model: where a run's base part is now, if it moved since training "
    "(stage-1, LoRA and QLoRA runs are rebuilt from it). The run's lvit_recipe.yaml holds the absolute paths it "
    "trained from. Repeatable."
)


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
    base_model: list[str] = typer.Option(None, "--base-model", help=_BASE_HELP),
) -> None:
    """Export a run (any stage / method, or a checkpoint) as a stock, self-checked LLaVA folder."""
    _quiet_libraries()
    from lvit.export import export as do_export
    from lvit.runs.files import parse_base_model

    do_export(
        run_dir,
        out,
        dtype=dtype,
        projector_only=projector_only,
        tolerance=tolerance,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        device=device,
        base_model=parse_base_model(base_model),
    )


# --- using and measuring a trained model ----------------------------------------------------------------------------

_MODEL_HELP = "An lvit run folder or checkpoint-N (any stage / method), or an exported / stock LLaVA folder."
_4BIT_HELP = "Load the language model in 4-bit NF4 (full runs and exported folders; QLoRA runs are 4-bit already)."


def _quiet_libraries() -> None:
    """The library notices a user cannot act on stay off the console (`lvit.console`), for commands that load models."""
    from lvit.console import quiet_libraries

    quiet_libraries()


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@app.command()
def chat(
    model: Path = typer.Argument(..., help=_MODEL_HELP),
    image: list[Path] = typer.Option(
        None,
        "--image",
        help="An image the conversation is about (optional). Repeat for several: all go in the first user turn, "
        "in the order given.",
    ),
    prompt: str = typer.Option(
        None, "--prompt", help="Ask this one question and exit. Without it: one question per line, 'exit' or EOF ends."
    ),
    load_4bit: bool = typer.Option(False, "--load-4bit", help=_4BIT_HELP),
    temperature: float = typer.Option(0.0, "--temperature", help="0 (the default) decodes greedily."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling (with --temperature > 0)."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    device: str = typer.Option(None, "--device", help="Default: cuda if available, else cpu."),
    base_model: list[str] = typer.Option(None, "--base-model", help=_BASE_HELP),
) -> None:
    """Talk to a trained model about an image (or several); answers stream as they are generated."""
    _quiet_libraries()
    from lvit.chat import ChatSession, check_image, interactive
    from lvit.generation import GenerationSettings
    from lvit.runs import load_model
    from lvit.runs.files import parse_base_model

    settings = GenerationSettings(max_new_tokens, temperature, top_p)
    settings.kwargs()  # check the values before the model loads
    images = list(image or [])
    check_image(images)  # and every image
    loaded = load_model(model, load_4bit=load_4bit, device=device, base_model=parse_base_model(base_model))
    session = ChatSession(loaded, images, settings)
    if prompt is not None:
        session.ask(prompt, _write)
    else:
        interactive(session, sys.stdin, _write)


@app.command()
def generate(
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
    base_model: list[str] = typer.Option(None, "--base-model", help=_BASE_HELP),
) -> None:
    """Answer a question file into a JSONL file (batched, resumable)."""
    _quiet_libraries()
    from lvit.answers import answer_question_file
    from lvit.generation import GenerationSettings
    from lvit.runs.files import parse_base_model

    answers = answer_question_file(
        model,
        data,
        out,
        image_folder,
        GenerationSettings(max_new_tokens, temperature, top_p),
        batch_size,
        load_4bit=load_4bit,
        device=device,
        base_model=parse_base_model(base_model),
    )
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
    arbiter_base_url: str = endpoint_cli.base_url("arbiter", required=False),
    arbiter_model: str = endpoint_cli.model("arbiter", required=False),
    arbiter_api_key_env: str = endpoint_cli.api_key_env("arbiter"),
    arbiter_timeout: float = endpoint_cli.timeout("arbiter"),
    arbiter_retries: int = endpoint_cli.retries("arbiter"),
    arbiter_prompt: Path = typer.Option(None, "--arbiter-prompt", help="Your own arbiter prompt file (YAML)."),
    concurrency: int = endpoint_cli.concurrency(),
) -> None:
    """ScienceQA accuracy, overall and by subject (NAT/SOC/LAN), context (TXT/IMG/NO) and grade.

    With --arbiter-base-url and --arbiter-model, a text-only LLM answers too and, where it and the model
    disagree, makes the final call (the LLaVA paper's Sec. 5.2): the model, the LLM and the two combined are
    reported side by side.
    """
    _quiet_libraries()
    from lvit.eval import scienceqa as sqa
    from lvit.generation import GenerationSettings

    arbiter = None
    if arbiter_base_url or arbiter_model:
        if not (arbiter_base_url and arbiter_model):
            raise LvitError("the arbiter needs both --arbiter-base-url and --arbiter-model")
        from lvit.eval.arbiter import load_arbiter_prompt

        endpoint = endpoint_cli.make_endpoint(
            arbiter_base_url, arbiter_model, arbiter_api_key_env, arbiter_timeout, arbiter_retries
        )
        arbiter = {"endpoint": endpoint, "prompt": load_arbiter_prompt(arbiter_prompt), "concurrency": concurrency}

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
        arbiter=arbiter,
    )
    typer.echo(sqa.format_table(result.scores, f"ScienceQA {split} ({result.scores['total']} problems)"))
    if "arbiter" in result.scores:
        from lvit.eval.arbiter import format_table

        typer.echo(format_table(result.scores["arbiter"]))
    typer.echo(f"results: {result.path}")


@eval_app.command("llava-bench")
def eval_llava_bench(
    model: Path = typer.Argument(None, help=_MODEL_HELP + " Omit with --predictions."),
    questions: Path = typer.Option(..., "--questions", help="LLaVA-Bench's questions.jsonl (qa90_questions.jsonl)."),
    context: Path = typer.Option(
        ...,
        "--context",
        help="LLaVA-Bench's context.jsonl (COCO: caps_boxes_coco2014_val_80.jsonl): what the judge reads.",
    ),
    references: Path = typer.Option(
        ..., "--references", help="The reference answers: answers_gpt4.jsonl (qa90_gpt4_answer.jsonl)."
    ),
    predictions: Path = typer.Option(
        None, "--predictions", help="Judge these answers: an `lvit generate` file, or LLaVA's (question_id, text)."
    ),
    image_folder: Path = typer.Option(None, "--image-folder", help="LLaVA-Bench's images (when generating)."),
    out: Path = typer.Option(None, "--out", help="Folder for answers, reviews.jsonl and results.json."),
    base_url: str = endpoint_cli.base_url(),
    judge_model: str = endpoint_cli.model(),
    api_key_env: str = endpoint_cli.api_key_env(),
    timeout: float = endpoint_cli.timeout(),
    retries: int = endpoint_cli.retries(),
    concurrency: int = endpoint_cli.concurrency(),
    judge_prompt: Path = typer.Option(None, "--judge-prompt", help="Your own judge prompt file (YAML)."),
    retry_failures: bool = typer.Option(False, "--retry-failures", help="Ask again where the judge failed before."),
    limit: int = typer.Option(None, "--limit", help="Only the first N questions (a quick look)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens", help="LLaVA's model_vqa default."),
    load_4bit: bool = typer.Option(False, "--load-4bit", help=_4BIT_HELP),
    device: str = typer.Option(None, "--device"),
) -> None:
    """LLaVA-Bench: a text-only judge scores the model's answers against reference answers (the paper's Sec. 5.1).

    Reports the model's score relative to the reference (x100) per category (conversation, detail, complex) and
    overall; the judge's reviews are saved, and a rerun judges only what is missing.
    """
    _quiet_libraries()
    from lvit.eval import llava_bench
    from lvit.generation import GenerationSettings

    # temperature 0.2: LLaVA's judge requests (github.com/haotian-liu/LLaVA, llava/eval/eval_gpt_review_bench.py)
    endpoint = endpoint_cli.make_endpoint(base_url, judge_model, api_key_env, timeout, retries, temperature=0.2)
    result = llava_bench.run_eval(
        model,
        questions,
        context,
        references,
        endpoint,
        predictions=predictions,
        out=out,
        judge_prompt=judge_prompt,
        concurrency=concurrency,
        retry_failures=retry_failures,
        limit=limit,
        image_folder=image_folder,
        settings=GenerationSettings(max_new_tokens),
        batch_size=batch_size,
        load_4bit=load_4bit,
        device=device,
    )
    typer.echo(llava_bench.format_table(result.scores))
    typer.echo(f"results: {result.path}")


@eval_app.command("pope")
def eval_pope(
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
    _quiet_libraries()
    from lvit.eval import pope
    from lvit.generation import GenerationSettings

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
    typer.echo(pope.format_table(result.scores))
    typer.echo(f"results: {result.path}")


def _unescape(text: str) -> str:
    """`--prompt-suffix '\\nAnswer ...'` as typed in a shell: a literal backslash-n is a newline."""
    return text.replace("\\n", "\n")


def main() -> None:
    app()  # LvitGroup.invoke turns an LvitError into its message and exit status 2


if __name__ == "__main__":
    main()
