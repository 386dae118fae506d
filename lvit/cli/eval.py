"""`lvit eval`: benchmarks (ScienceQA, LLaVA-Bench with an LLM judge, POPE) on a model or on existing predictions."""

from __future__ import annotations

from pathlib import Path

import typer

from lvit.cli import llm_options
from lvit.cli.common import FOUR_BIT_HELP, MODEL_HELP, quiet_model_libraries, unescape
from lvit.errors import LvitError

eval_app = typer.Typer(
    help="Benchmarks: generate answers with a model and score them as LLaVA does (or score existing outputs).",
    no_args_is_help=True,
)


@eval_app.command("scienceqa")
def eval_scienceqa(
    model: Path = typer.Argument(None, help=MODEL_HELP + " Omit with --predictions."),
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
    load_4bit: bool = typer.Option(False, "--load-4bit", help=FOUR_BIT_HELP),
    device: str = typer.Option(None, "--device"),
    arbiter_base_url: str = llm_options.base_url("arbiter", required=False),
    arbiter_model: str = llm_options.model("arbiter", required=False),
    arbiter_api_key_env: str = llm_options.api_key_env("arbiter"),
    arbiter_timeout: float = llm_options.timeout("arbiter"),
    arbiter_retries: int = llm_options.retries("arbiter"),
    arbiter_prompt: Path = typer.Option(None, "--arbiter-prompt", help="Your own arbiter prompt file (YAML)."),
    concurrency: int = llm_options.concurrency(),
) -> None:
    """ScienceQA accuracy, overall and by subject (NAT/SOC/LAN), context (TXT/IMG/NO) and grade.

    With --arbiter-base-url and --arbiter-model, a text-only LLM answers too and, where it and the model
    disagree, makes the final call (the LLaVA paper's Sec. 5.2): the model, the LLM and the two combined are
    reported side by side.
    """
    quiet_model_libraries()
    from lvit.eval import scienceqa as sqa
    from lvit.eval.scienceqa_score import format_table
    from lvit.infer.generation import GenerationSettings

    arbiter = None
    if arbiter_base_url or arbiter_model:
        if not (arbiter_base_url and arbiter_model):
            raise LvitError("the arbiter needs both --arbiter-base-url and --arbiter-model")
        llm_options.check_concurrency(concurrency)
        from lvit.eval.arbiter import load_arbiter_prompt

        endpoint = llm_options.make_endpoint(
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
    typer.echo(format_table(result.scores, f"ScienceQA {split} ({result.scores['total']} problems)"))
    if "arbiter" in result.scores:
        from lvit.eval.arbiter import format_table

        typer.echo(format_table(result.scores["arbiter"]))
    typer.echo(f"results: {result.path}")


@eval_app.command("llava-bench")
def eval_llava_bench(
    model: Path = typer.Argument(None, help=MODEL_HELP + " Omit with --predictions."),
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
    base_url: str = llm_options.base_url(),
    judge_model: str = llm_options.model(),
    api_key_env: str = llm_options.api_key_env(),
    timeout: float = llm_options.timeout(),
    retries: int = llm_options.retries(),
    concurrency: int = llm_options.concurrency(),
    judge_prompt: Path = typer.Option(None, "--judge-prompt", help="Your own judge prompt file (YAML)."),
    retry_failures: bool = typer.Option(False, "--retry-failures", help="Ask again where the judge failed before."),
    limit: int = typer.Option(None, "--limit", help="Only the first N questions (a quick look)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens", help="LLaVA's model_vqa default."),
    load_4bit: bool = typer.Option(False, "--load-4bit", help=FOUR_BIT_HELP),
    device: str = typer.Option(None, "--device"),
) -> None:
    """LLaVA-Bench: a text-only judge scores the model's answers against reference answers (the paper's Sec. 5.1).

    Reports the model's score relative to the reference (x100) per category (conversation, detail, complex) and
    overall; the judge's reviews are saved, and a rerun judges only what is missing.
    """
    quiet_model_libraries()
    from lvit.eval import llava_bench
    from lvit.infer.generation import GenerationSettings

    llm_options.check_concurrency(concurrency)
    # temperature 0.2: LLaVA's judge requests (github.com/haotian-liu/LLaVA, llava/eval/eval_gpt_review_bench.py)
    endpoint = llm_options.make_endpoint(base_url, judge_model, api_key_env, timeout, retries, temperature=0.2)
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
    model: Path = typer.Argument(None, help=MODEL_HELP + " Omit with --predictions."),
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
    load_4bit: bool = typer.Option(False, "--load-4bit", help=FOUR_BIT_HELP),
    device: str = typer.Option(None, "--device"),
) -> None:
    """POPE: accuracy, precision, recall, F1 and yes-ratio per split (adversarial / popular / random)."""
    quiet_model_libraries()
    from lvit.eval import pope
    from lvit.infer.generation import GenerationSettings

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
        prompt_suffix=unescape(prompt_suffix),
    )
    typer.echo(pope.format_table(result.scores))
    typer.echo(f"results: {result.path}")
