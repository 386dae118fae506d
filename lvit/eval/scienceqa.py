"""`lvit eval scienceqa`: ScienceQA answers in LLaVA's prompt format, scored as LLaVA scores them.

Data: ScienceQA's official `problems.json` (problem id -> question, choices, answer index, hint,
image, subject, grade, ...), `pid_splits.json` (split -> problem ids) and the images at
`images/<split>/<pid>/image.png`.

Prompts and reference answers: `lvit.data.scienceqa` (LLaVA's `convert_sqa_to_llava.py`: question
format QCM; answers "lecture-solution", LLaVA's "QCM-LEA" as in the paper's ScienceQA fine-tune, or
"letter", LLaVA-1.5's single-letter instruction).

Scoring (LLaVA `llava/eval/eval_science_qa.py`): an output counts as answer X when it is
exactly a letter "X", starts with "X. ", or contains exactly one match of `The answer is ([A-Z]).`;
anything else (or a letter beyond the problem's choices) is a failure and counts as wrong.
Categories are the official ScienceQA ones (`utils_evaluate.py` of the ScienceQA repository):
subject NAT / SOC / LAN; context TXT (has a text hint), IMG (has an image), NO (neither; TXT and
IMG overlap); grade G1-6 / G7-12.
"""

from __future__ import annotations

from pathlib import Path

from lvit.eval.arbiter import arbitrate
from lvit.eval.predictions import (
    BenchmarkResult,
    answer_records,
    check_model_or_predictions,
    read_predictions,
    scored_predictions,
    write_results,
)
from lvit.eval.scienceqa_score import load_split, question_records, score
from lvit.llm.context import probe


def evaluate(
    model_path,
    problems_path,
    splits_path,
    out_dir,
    split: str = "test",
    image_folder=None,
    limit: int | None = None,
    answer_format: str = "lecture-solution",
    arbiter: dict | None = None,
    **generation,
) -> dict:
    """Generate answers for a split into `out_dir/answers.jsonl`, score them into `out_dir/results.json`.

    `generation`: `lvit.eval.predictions.answer_records`'s options (settings, batch_size, load_4bit, ...). `arbiter`:
    `lvit.eval.arbiter.arbitrate`'s options (endpoint, prompt, concurrency), to add the arbiter's scores.
    """
    problems, pids = load_split(problems_path, splits_path, split)
    if limit is not None:
        pids = pids[:limit]
    if image_folder is None:
        image_folder = Path(problems_path).parent / "images" / split
    records = question_records(problems, pids, answer_format)
    rows = answer_records(model_path, records, out_dir, image_folder, **generation).rows
    outputs = {pid: rows[pid]["answer"] for pid in pids if pid in rows}
    scores = score(problems, pids, outputs)
    if arbiter is not None:
        scores["arbiter"] = arbitrate(problems, pids, outputs, out_dir, **arbiter)
    extra = {"model": str(model_path), "split": split, "answer_format": answer_format}
    write_results("scienceqa", scores, Path(out_dir) / "results.json", **extra)
    return scores


def run_eval(
    model,
    problems_path,
    splits_path,
    predictions=None,
    split: str = "test",
    out=None,
    arbiter: dict | None = None,
    **options,
):
    """`lvit eval scienceqa`: score `predictions` (existing outputs), or generate with `model` and score.

    Results go to the folder `out` (`results.json`, and the arbiter's files; default: `<predictions
    stem>_results.json` and `<stem>_arbiter/` beside the predictions, or `MODEL/eval/scienceqa-<split>/` with
    the answers). `options`: `evaluate`'s (image_folder, limit,
    answer_format, settings, batch_size, ...), used when generating. `arbiter`: the text LLM's endpoint and
    options (`lvit.eval.arbiter.arbitrate`): its answers, and its call where it and the model disagree, are
    scored beside the model's (`scores["arbiter"]`). Returns a `BenchmarkResult`.
    """
    check_model_or_predictions(model, predictions, out)
    if arbiter is not None:
        probe(arbiter["endpoint"])  # nothing listening is said now, not after the answers are generated
    if predictions is not None:
        problems, pids = load_split(problems_path, splits_path, split)
        outputs = read_predictions(predictions)
        scores = score(problems, pids, outputs)
        if arbiter is not None:
            where = Path(out) if out is not None else Path(predictions).with_name(f"{Path(predictions).stem}_arbiter")
            scores["arbiter"] = arbitrate(problems, pids, outputs, where, **arbiter)
        return scored_predictions("scienceqa", scores, predictions, out, split=split)
    folder = Path(out) if out is not None else Path(model) / "eval" / f"scienceqa-{split}"
    scores = evaluate(model, problems_path, splits_path, folder, split=split, arbiter=arbiter, **options)
    return BenchmarkResult(scores, folder / "results.json")
