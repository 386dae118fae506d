"""`lvit eval pope`: POPE yes/no object-hallucination evaluation, scored as LLaVA scores it.

Annotation files (one per split: `coco_pope_adversarial.json`, `coco_pope_popular.json`,
`coco_pope_random.json`) are JSON Lines of `{"question_id", "image", "text", "label": "yes"|"no"}`.

Answer extraction (LLaVA `llava/eval/eval_pope.py`): keep the first sentence (up to the first
"."), remove commas, split on spaces; the answer is "no" when a word is "No", "not" or "no",
else "yes". Reported per split: accuracy, precision, recall and F1 of "yes" as the positive
class, and the yes-ratio (share of "yes" answers).
"""

from __future__ import annotations

import json
from pathlib import Path

from lvit.errors import LvitError
from lvit.eval.predictions import (
    BenchmarkResult,
    answer_records,
    check_model_or_predictions,
    read_predictions,
    scored_predictions,
    write_results,
)


def category_of(path: str | Path) -> str:
    """The split an annotation file holds: `coco_pope_adversarial.json` -> "adversarial"."""
    stem = Path(path).stem
    return stem[len("coco_pope_") :] if stem.startswith("coco_pope_") else stem


def read_annotations(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise LvitError(f"POPE annotation file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        rows = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(s) for s in text.splitlines() if s.strip()]
        )
    except json.JSONDecodeError as exc:
        raise LvitError(f"{path}: not JSON Lines ({exc.msg}, line {exc.lineno})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not {"question_id", "image", "text", "label"} <= row.keys():
            raise LvitError(f"{path}: row {i + 1} needs 'question_id', 'image', 'text' and 'label'")
        if row["label"] not in ("yes", "no"):
            raise LvitError(f"{path}: row {i + 1} has label {row['label']!r}; POPE labels are 'yes' or 'no'")
    return rows


def read_splits(paths: list[str | Path]) -> dict[str, list[dict]]:
    """Annotation rows by split name; two files with the same split name are an error."""
    out: dict[str, list[dict]] = {}
    for path in paths:
        name = category_of(path)
        if name in out:
            raise LvitError(f"two annotation files for split {name!r} ({path}); pass one file per split")
        out[name] = read_annotations(path)
    return out


def question_id(split: str, row: dict) -> str:
    """Ids repeat across POPE's split files, so lvit's answer ids carry the split."""
    return f"{split}-{row['question_id']}"


def question_records(splits: dict[str, list[dict]], prompt_suffix: str = "") -> list[dict]:
    return [
        {
            "id": question_id(split, row),
            "image": row["image"],
            "conversations": [
                {"from": "human", "value": f"<image>\n{row['text']}{prompt_suffix}"},
                {"from": "gpt", "value": row["label"]},
            ],
        }
        for split, rows in splits.items()
        for row in rows
    ]


def yes_no(text: str) -> str:
    """LLaVA's answer extraction: "no" if the first sentence has the word No / not / no, else "yes"."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(answers: list[str], labels: list[str]) -> dict:
    """Confusion counts and metrics with "yes" as the positive class (a label other than "no" is yes).

    Where a ratio has no denominator (no "yes" predicted, no "yes" label) it is 0.0 (LLaVA divides by zero).
    """
    preds = [yes_no(a) == "yes" for a in answers]
    truth = [label != "no" for label in labels]
    tp = sum(p and t for p, t in zip(preds, truth, strict=True))
    fp = sum(p and not t for p, t in zip(preds, truth, strict=True))
    tn = sum(not p and not t for p, t in zip(preds, truth, strict=True))
    fn = sum(not p and t for p, t in zip(preds, truth, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / len(preds) if preds else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(preds) / len(preds) if preds else 0.0,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "total": len(preds),
    }


def score(splits: dict[str, list[dict]], predictions: dict[str, str]) -> dict:
    """Metrics per split, and over all splits pooled.

    Predictions are looked up as "<split>-<question_id>" (lvit's answer ids), or by the bare
    question_id when only one split is scored (LLaVA's answer files).
    """
    out: dict = {"splits": {}}
    pooled_answers, pooled_labels = [], []
    for split, rows in splits.items():
        answers, missing = [], []
        for row in rows:
            key = question_id(split, row)
            if key not in predictions and len(splits) == 1:
                key = str(row["question_id"])
            if key not in predictions:
                missing.append(key)
                continue
            answers.append(predictions[key])
        if missing:
            raise LvitError(
                f"no prediction for {len(missing)} of {len(rows)} {split!r} questions, e.g. {missing[0]!r} "
                "(ids are '<split>-<question_id>', e.g. 'adversarial-1')"
            )
        labels = [row["label"] for row in rows]
        out["splits"][split] = pope_metrics(answers, labels)
        pooled_answers += answers
        pooled_labels += labels
    out["all"] = pope_metrics(pooled_answers, pooled_labels)
    return out


def format_table(scores: dict, title: str = "POPE") -> str:
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    lines = [title, f"{'split':<12}" + "".join(f"{k:>11}" for k in keys) + f"{'total':>8}"]
    for name, m in [*scores["splits"].items(), ("all", scores["all"])]:
        lines.append(f"{name:<12}" + "".join(f"{100 * m[k]:>11.2f}" for k in keys) + f"{m['total']:>8}")
    return "\n".join(lines)


def evaluate(model_path, annotation_paths, out_dir, limit: int | None = None, prompt_suffix: str = "", **generation):
    """Answer every split's questions into `out_dir/answers.jsonl`; score into `out_dir/results.json`.

    `generation`: `lvit.eval.predictions.answer_records`'s options (image_folder, settings, batch_size, ...).
    """
    splits = read_splits(annotation_paths)
    if limit is not None:
        splits = {name: rows[:limit] for name, rows in splits.items()}
    rows = answer_records(model_path, question_records(splits, prompt_suffix), out_dir, **generation).rows
    scores = score(splits, {key: row["answer"] for key, row in rows.items()})
    write_results("pope", scores, Path(out_dir) / "results.json", model=str(model_path))
    return scores


def annotation_files(paths: list[str | Path]) -> list[Path]:
    """The annotation files named: files as they are, folders as their `coco_pope_*.json`."""
    paths = [Path(p) for p in paths]
    files = [f for a in paths for f in (sorted(a.glob("coco_pope_*.json")) if a.is_dir() else [a])]
    if not files:
        raise LvitError(f"no annotation files in {', '.join(map(str, paths))}")
    return files


def run_eval(model, annotations: list[str | Path], predictions=None, out=None, **options):
    """`lvit eval pope`: score `predictions` (existing outputs), or generate with `model` and score.

    `annotations`: split files or folders holding them. Results go to the folder `out` (default:
    `<predictions stem>_results.json` beside the predictions, or `MODEL/eval/pope/` with the
    answers). `options`: `evaluate`'s (image_folder, limit, prompt_suffix, settings, batch_size, ...),
    used when generating. Returns a `BenchmarkResult`.
    """
    check_model_or_predictions(model, predictions, out)
    files = annotation_files(annotations)
    if predictions is not None:
        return scored_predictions("pope", score(read_splits(files), read_predictions(predictions)), predictions, out)
    folder = Path(out) if out is not None else Path(model) / "eval" / "pope"
    scores = evaluate(model, files, folder, **options)
    return BenchmarkResult(scores, folder / "results.json")
