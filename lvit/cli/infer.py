"""`lvit chat` and `lvit generate`: a trained model answering, interactively or over a question file."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from lvit.cli.common import BASE_HELP, FOUR_BIT_HELP, MODEL_HELP, quiet_model_libraries, write_out


def chat(
    model: Path = typer.Argument(..., help=MODEL_HELP),
    image: list[Path] = typer.Option(
        None,
        "--image",
        help="An image the conversation is about (optional). Repeat for several: all go in the first user turn, "
        "in the order given.",
    ),
    prompt: str = typer.Option(
        None, "--prompt", help="Ask this one question and exit. Without it: one question per line, 'exit' or EOF ends."
    ),
    load_4bit: bool = typer.Option(False, "--load-4bit", help=FOUR_BIT_HELP),
    temperature: float = typer.Option(0.0, "--temperature", help="0 (the default) decodes greedily."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling (with --temperature > 0)."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    device: str = typer.Option(None, "--device", help="Default: cuda if available, else cpu."),
    base_model: list[str] = typer.Option(None, "--base-model", help=BASE_HELP),
) -> None:
    """Talk to a trained model about an image (or several); answers stream as they are generated."""
    quiet_model_libraries()
    from lvit.infer.chat import ChatSession, check_image, check_placeholders, interactive
    from lvit.infer.generation import GenerationSettings
    from lvit.infer.load import load_model
    from lvit.runs.files import parse_base_model

    settings = GenerationSettings(max_new_tokens, temperature, top_p)
    settings.kwargs()  # check the values before the model loads
    images = list(image or [])
    check_image(images)  # and every image
    if prompt is not None:
        check_placeholders([prompt], len(images))
    loaded = load_model(model, load_4bit=load_4bit, device=device, base_model=parse_base_model(base_model))
    session = ChatSession(loaded, images, settings)
    if prompt is not None:
        session.ask(prompt, write_out)
    else:
        interactive(session, sys.stdin, write_out)


def generate(
    model: Path = typer.Argument(..., help=MODEL_HELP),
    data: Path = typer.Option(
        ..., "--data", help="Questions in any data format lvit reads; the last user turn of each record is answered."
    ),
    out: Path = typer.Option(..., "--out", help="JSONL answer file; ids already in it are skipped (resume)."),
    image_folder: Path = typer.Option(None, "--image-folder", help="Folder the data's image paths are relative to."),
    batch_size: int = typer.Option(16, "--batch-size"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 (the default) decodes greedily."),
    top_p: float = typer.Option(1.0, "--top-p"),
    load_4bit: bool = typer.Option(False, "--load-4bit", help=FOUR_BIT_HELP),
    device: str = typer.Option(None, "--device", help="Default: cuda if available, else cpu."),
    base_model: list[str] = typer.Option(None, "--base-model", help=BASE_HELP),
) -> None:
    """Answer a question file into a JSONL file (batched, resumable)."""
    quiet_model_libraries()
    from lvit.infer.answers import answer_question_file
    from lvit.infer.generation import GenerationSettings
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
