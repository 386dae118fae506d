"""A benchmark's inputs and outputs: answering its questions with a model, reading existing predictions, writing the
scores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lvit.errors import LvitError
from lvit.infer.answers import answer_questions
from lvit.infer.questions import questions_from_rows

if TYPE_CHECKING:
    from lvit.infer.answers import AnswerFile


def read_predictions(path) -> dict[str, str]:
    """Raw model outputs by question id, from any of:

    - a JSON object `{id: text}` (or `{id: {"text"|"answer": text}}`);
    - a JSON list or JSON Lines of rows with `id` or `question_id` and `answer` or `text`
      (lvit's answer files; LLaVA's `model_vqa*.py` answer files).
    """
    import json

    path = Path(path)
    if not path.is_file():
        raise LvitError(f"predictions file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        rows = data if isinstance(data, list) else None
    except json.JSONDecodeError:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise LvitError(f"{path}: neither JSON nor JSON Lines ({exc.msg}, line {exc.lineno})") from None
        data = None
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out[str(key)] = _prediction_text(value, path, key)
        return out
    if rows is None:
        raise LvitError(f"{path}: expected a JSON object {{id: text}} or rows with an id and a text")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise LvitError(f"{path}: row {i + 1} is not an object")
        key = row.get("id", row.get("question_id"))
        if key is None:
            raise LvitError(f"{path}: row {i + 1} has no 'id' (or 'question_id')")
        out[str(key)] = _prediction_text(row, path, key)
    return out


def _prediction_text(value, path, key) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for name in ("answer", "text"):
            if isinstance(value.get(name), str):
                return value[name]
    raise LvitError(f"{path}: the prediction for {key!r} has no text (a string, or an object with 'answer'/'text')")


def write_results(benchmark: str, scores: dict, path, **extra):
    """Write a benchmark's scores (and what produced them) as JSON; returns the path."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": benchmark, **extra, **scores}, indent=2))
    return path


@dataclass
class BenchmarkResult:
    """A benchmark's scores and the results file they were written to."""

    scores: dict
    path: Path


def check_model_or_predictions(model, predictions, out=None) -> None:
    """A benchmark runs on a model (generate, then score) or on existing outputs, not both, not neither; `--out`,
    where given, is a folder (what each benchmark writes goes in it), never an existing file."""
    if (model is None) == (predictions is None):
        raise LvitError("pass either MODEL (generate, then score) or --predictions FILE (score existing outputs)")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise LvitError(
            f"--out {out} is a file; --out names the folder the results (results.json and the files beside it) "
            "are written to: give a folder, e.g. --out " + str(Path(out).with_suffix("")) + "_eval"
        )


def scored_predictions(benchmark: str, scores: dict, predictions, out=None, **extra) -> BenchmarkResult:
    """Write the scores of an existing predictions file to `out/results.json` (default: `<stem>_results.json`
    beside the predictions)."""
    predictions = Path(predictions)
    beside = predictions.with_name(f"{predictions.stem}_results.json")
    target = Path(out) / "results.json" if out is not None else beside
    write_results(benchmark, scores, target, predictions=str(predictions), **extra)
    return BenchmarkResult(scores, target)


def answer_records(
    model_path,
    records: list[dict],
    out_dir,
    image_folder=None,
    settings=None,
    batch_size: int = 16,
    load_4bit: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> AnswerFile:
    """Answer benchmark `records` (LLaVA format) into `out_dir/answers.jsonl` (resumable;
    `lvit.infer.answers.answer_questions`), with the questions asked beside it in `out_dir/questions.jsonl`.
    Returns the `AnswerFile`."""
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    questions_path = out_dir / "questions.jsonl"
    questions_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return answer_questions(
        model_path,
        questions_from_rows(records, questions_path),
        out_dir / "answers.jsonl",
        image_folder,
        settings,
        batch_size,
        load_4bit=load_4bit,
        device=device,
        progress=progress,
    )
