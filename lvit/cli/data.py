"""`lvit data ...`: check, convert and generate training data. Heavy libraries are imported inside the commands."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lvit.cli import llm_options
from lvit.errors import LvitError

data_app = typer.Typer(
    help="Check, convert and generate training data (LLaVA JSON/JSONL, chat format, Hugging Face datasets).",
    no_args_is_help=True,
)


@data_app.command("check")
def check(
    args: list[str] = typer.Argument(
        None,
        metavar="[DATA] [KEY=VALUE]...",
        help="A JSON/JSONL file or a Hugging Face dataset (folder, .parquet, .arrow); default: the recipe's. "
        "With --recipe, dotted.key=value overrides of it follow (as for `lvit finetune`).",
    ),
    image_folder: Path = typer.Option(None, "--image-folder", help="Folder relative image paths are resolved against."),
    recipe: Path = typer.Option(
        None,
        "--recipe",
        help="A recipe file or a shipped recipe's name: measure samples with its tokenizer, template and vision "
        "tower (configs only, no weights) and check them against data.max_length / data.overlong.",
    ),
    overrides: list[str] = typer.Option(
        None, "--override", "-o", help="Recipe override key=value (as for `lvit finetune`); repeat for several."
    ),
    fmt: str = typer.Option(None, "--format", help="auto (default), llava, chat or hf."),
    decode: bool = typer.Option(
        False,
        "--decode",
        help="Decode every image as training would (slower); without it each image's header is read, which "
        "misses a file cut off after its header.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable JSON report."),
) -> None:
    """Check every record of DATA; list each problem with the record's id, then a summary.

    Exit status: 0 without errors (warnings allowed), 1 with errors, 2 when the data or recipe cannot be read.
    """
    from lvit.data.check import check_data

    data, positional = _data_and_overrides(args or [])
    overrides = [*positional, *(overrides or [])]
    rec = None
    if recipe is not None:
        from lvit.recipe.load import load_recipe

        rec = load_recipe(recipe, overrides, check_training=False)
    elif overrides:
        raise LvitError(f"{overrides[0]!r} overrides a key of the recipe given with --recipe; there is none")
    from lvit.data.mixture import is_mixture

    if rec is not None and data is None and rec.data.streaming:  # shard by shard, nothing held
        from lvit.data.check import encoder_from_recipe
        from lvit.data.mixture import sources_of
        from lvit.data.stream.check import check_streamed

        templates = {s.template for s in sources_of(rec.data, rec.source)}
        report = check_streamed(rec, {t: encoder_from_recipe(rec, t) for t in templates})
    elif rec is not None and data is None and is_mixture(rec.data):  # each source of the mixture, then its plan
        from lvit.data.mixture_report import check_mixture

        report = check_mixture(rec, decode=decode)
    else:
        report = check_data(data, fmt, image_folder, recipe=rec, decode=decode)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=1))
    else:
        typer.echo(report.format_text())
    raise typer.Exit(0 if report.ok else 1)


def _data_and_overrides(args: list[str]) -> tuple[str | None, list[str]]:
    """`[DATA] [KEY=VALUE]...`: an argument with `=` that is not an existing path is an override."""
    data = [a for a in args if "=" not in a or Path(a).exists()]
    if len(data) > 1:
        raise LvitError(f"one DATA at a time, got {len(data)}: {', '.join(data)}")
    return (data[0] if data else None), [a for a in args if a not in data]


@data_app.command("preview")
def preview(
    recipe: Path = typer.Argument(..., help="A recipe file or a shipped recipe's name."),
    n: int = typer.Option(3, "-n", help="How many records, from the first."),
    overrides: list[str] = typer.Option(
        None, "--override", "-o", help="Recipe override key=value (as for `lvit finetune`); repeat for several."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print each sample's id, input_ids and labels as JSON."),
) -> None:
    """Print the first N samples of the recipe's data as the model sees them: ids, tokens and labels.

    The text shows the trained spans (the answers and their end-of-turn token) in [brackets] and the image
    as <image>×N; the table has one row per token (the image tokens in one row) and marks the trained ones.
    """
    from lvit.data.preview import format_sample
    from lvit.data.preview import preview as build_preview
    from lvit.recipe.load import load_recipe

    if n < 1:
        raise LvitError(f"-n must be at least 1, got {n}")
    rec = load_recipe(recipe, overrides or [], check_training=False)
    samples = build_preview(rec, n)
    if as_json:
        typer.echo(json.dumps([s.to_json() for s in samples]))
        return
    what = rec.data.path if rec.data.sources is None else f"{len(rec.data.sources)} sources"
    typer.echo(f"{len(samples)} sample(s) of {what} (template {rec.data.template}):")
    for sample in samples:
        typer.echo(format_sample(sample, rec.data.max_length))


@data_app.command("convert")
def convert(
    src: str = typer.Argument(
        ..., metavar="IN", help="Data in any format lvit reads, or the word 'scienceqa' (with --problems ...)."
    ),
    out: Path = typer.Argument(None, metavar="OUT", help="The file to write (.json or .jsonl)."),
    to: str = typer.Option(
        None, "--to", help="llava (JSON list), llava-jsonl or chat. Default: from OUT's suffix (.jsonl: llava-jsonl)."
    ),
    image_folder: Path = typer.Option(None, "--image-folder", help="Folder IN's relative image paths are relative to."),
    fmt: str = typer.Option("auto", "--format", help="IN's format: auto, llava, chat or hf."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Convert the readable records, list the others."),
    problems: Path = typer.Option(None, "--problems", help="scienceqa: the release's problems.json."),
    splits: Path = typer.Option(None, "--splits", help="scienceqa: the release's pid_splits.json."),
    split: str = typer.Option("train", "--split", help="scienceqa: which split to convert."),
    image_root: Path = typer.Option(None, "--image-root", help="scienceqa: the images folder (<split>/<pid>/...)."),
    out_option: Path = typer.Option(None, "--out", help="scienceqa: the file to write (same as OUT)."),
    answer_format: str = typer.Option(
        "lecture-solution",
        "--answer-format",
        help="scienceqa: lecture-solution (LLaVA's QCM-LEA, for training) or letter (the option letter alone).",
    ),
) -> None:
    """Convert IN to OUT, or ScienceQA to LLaVA format (`lvit data convert scienceqa --problems ...`)."""
    if src == "scienceqa" and not Path(src).exists():
        from lvit.data.scienceqa import convert_scienceqa

        target = out_option or out
        if problems is None or splits is None or target is None:
            raise LvitError("scienceqa needs --problems problems.json --splits pid_splits.json and --out FILE")
        result = convert_scienceqa(problems, splits, split, target, image_root, answer_format)
        typer.echo(f"{result['records']} ScienceQA {split} records ({result['images']} with an image) -> {target}")
        if result["image_folder"]:
            typer.echo(f"image folder for the recipe (data.image_folder): {result['image_folder']}")
        if result["missing_images"]:
            typer.secho(
                f"warning: {len(result['missing_images'])} image(s) not found under {result['image_folder']}, "
                f"e.g. {result['missing_images'][0]}",
                fg=typer.colors.YELLOW,
                err=True,
            )
        return
    target = out if out is not None else out_option
    if target is None:
        raise LvitError("pass OUT, the file to write")
    from lvit.data.convert import convert as do_convert

    result = do_convert(src, target, to, fmt, image_folder, skip_bad)
    typer.echo(f"{result['written']} of {result['read']} records -> {result['out']} ({result['format']})")
    for line in result["skipped"]:
        typer.secho(f"  skipped {line}", fg=typer.colors.YELLOW, err=True)
    if result["images_written"]:
        typer.echo(f"{result['images_written']} embedded images written to {result['image_folder']}")
    if result["image_folder"]:
        typer.echo(f"image folder for the recipe (data.image_folder / --image-folder): {result['image_folder']}")


@data_app.command("generate")
def generate(
    input_file: Path = typer.Argument(
        None,
        metavar="INPUT",
        help="JSON Lines, one image per line: {image, captions, boxes: [{label, bbox}], id?}. Or use --coco-captions.",
    ),
    out: Path = typer.Option(..., "--out", help="The LLaVA JSON Lines file to write (appended to; rerun to resume)."),
    image_folder: Path = typer.Option(None, "--image-folder", help="Folder the image paths are relative to."),
    coco_captions: Path = typer.Option(None, "--coco-captions", help="COCO captions_*.json (instead of INPUT)."),
    coco_instances: Path = typer.Option(None, "--coco-instances", help="COCO instances_*.json: the object boxes."),
    base_url: str = llm_options.base_url(),
    model: str = llm_options.model(),
    api_key_env: str = llm_options.api_key_env(),
    mix: str = typer.Option(
        None,
        "--mix",
        help="Kind weights, e.g. conversation=58,detail=23,complex=77 (the default: the LLaVA paper's 58K/23K/77K).",
    ),
    records: int = typer.Option(None, "--records", help="How many records (default: one per image; more cycle)."),
    prompts: Path = typer.Option(
        None, "--prompts", help="A folder with your own conversation.yaml / detail.yaml / complex.yaml."
    ),
    prompt: list[str] = typer.Option(None, "--prompt", help="KIND=FILE: your own prompt file for one kind."),
    max_boxes: int = typer.Option(
        None, "--max-boxes", help="Send at most this many boxes per image (the largest): shorter prompts."
    ),
    concurrency: int = llm_options.concurrency(),
    timeout: float = llm_options.timeout(),
    retries: int = llm_options.retries(),
    max_tokens: int = typer.Option(1024, "--max-tokens", help="Longest reply; a reply cut off is rejected."),
    temperature: float = typer.Option(None, "--temperature", help="Default: the endpoint's."),
    rejects: Path = typer.Option(None, "--rejects", help="Where rejected replies go (default: OUT.rejects.jsonl)."),
    retry_rejects: bool = typer.Option(False, "--retry-rejects", help="Ask again for the records rejected earlier."),
    price_input: float = typer.Option(None, "--price-input", help="Price per 1M prompt tokens, for the cost."),
    price_output: float = typer.Option(None, "--price-output", help="Price per 1M completion tokens."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the first request and send nothing."),
) -> None:
    """Write instruction-following data (conversation, detail, complex) from captions and boxes with a text LLM.

    The LLaVA paper's data engine (Sec. 3): the LLM never sees the images. Rerunning the same command resumes:
    records and rejects already written are skipped. Exit status: 0 done; 2 an error; 130 Ctrl-C (kept work).
    """
    from lvit.data.generate import generate as run_generate
    from lvit.data.generate import load_prompts, parse_mix, plan, read_coco, read_jsonl
    from lvit.data.generate.contexts import check_images
    from lvit.data.generate.prompts import parse_prompt_options

    if (input_file is None) == (coco_captions is None):
        raise LvitError("pass either INPUT (JSON Lines) or --coco-captions FILE (with --coco-instances FILE)")
    if coco_instances is not None and coco_captions is None:
        raise LvitError("--coco-instances goes with --coco-captions")
    llm_options.check_concurrency(concurrency)
    if max_boxes is not None and max_boxes < 0:
        raise LvitError(f"--max-boxes must be 0 or more, got {max_boxes}")
    for flag, path in (("--out", out), ("--rejects", rejects)):
        if path is not None and path.is_dir():
            example = path / "instruct.jsonl"
            raise LvitError(f"{flag} {path} is a folder; give the JSON Lines file to write, e.g. {example}")
    endpoint = llm_options.make_endpoint(
        base_url, model, api_key_env, timeout, retries, max_tokens=max_tokens, temperature=temperature
    )
    prompt_sets = load_prompts(prompts, parse_prompt_options(prompt))
    weights = parse_mix(mix)
    contexts = read_coco(coco_captions, coco_instances) if coco_captions else read_jsonl(input_file, image_folder)
    check_images(contexts, image_folder)
    tasks = plan(contexts, weights, records)
    summary = run_generate(
        tasks,
        out,
        endpoint,
        prompt_sets,
        concurrency=concurrency,
        rejects=rejects,
        retry_rejects=retry_rejects,
        dry_run=dry_run,
        price_input=price_input,
        price_output=price_output,
        max_boxes=max_boxes,
        echo=typer.echo,
    )
    if not dry_run:
        typer.echo(summary.format_text())
