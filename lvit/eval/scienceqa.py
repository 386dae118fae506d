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

import json
import re
from pathlib import Path

from lvit.data.scienceqa import OPTIONS
from lvit.errors import LvitError

FAILED = "FAILED"
# LLaVA's pattern, unescaped dot included: "The answer is B," matches as well.
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
CATEGORIES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")


def question_records(problems: dict, pids: list[str], answer_format: str = "lecture-solution") -> list[dict]:
    """LLaVA-format records for `pids` (`lvit.data.scienceqa.to_record`: image path `<pid>/<image>`
    relative to `images/<split>`, the reference answer in the gpt turn)."""
    from lvit.data.scienceqa import to_record

    return [to_record(pid, problems[pid], answer_format) for pid in pids]


def parse_answer(text: str) -> str:
    """The option letter an output gives, or "FAILED" (LLaVA's rules; surrounding whitespace ignored)."""
    text = text.strip()
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else FAILED


def predicted_index(letter: str, n_choices: int) -> int:
    """The choice index of `letter`, or -1 for a failure or a letter beyond the choices."""
    return OPTIONS.index(letter) if letter in OPTIONS[:n_choices] else -1


def categories(problem: dict) -> list[str]:
    """The paper's categories a problem counts in (ScienceQA's official definitions)."""
    out = []
    if problem.get("subject") in SUBJECTS:
        out.append(SUBJECTS[problem["subject"]])
    has_text, has_image = bool(problem.get("hint")), bool(problem.get("image"))
    if has_text:
        out.append("TXT")
    if has_image:
        out.append("IMG")
    if not has_text and not has_image:
        out.append("NO")
    grade = str(problem.get("grade", ""))
    number = int(grade[5:]) if grade.startswith("grade") and grade[5:].isdigit() else None
    if number is not None:
        out.append("G1-6" if number <= 6 else "G7-12")
    return out


def _bucket(correct: int, total: int) -> dict:
    return {"accuracy": correct / total if total else None, "correct": correct, "total": total}


def score(problems: dict, pids: list[str], predictions: dict[str, str]) -> dict:
    """Accuracy over `pids`, overall and per category; a missing prediction counts as a failure."""
    counts = {c: [0, 0] for c in CATEGORIES}
    correct = failed = 0
    missing = [pid for pid in pids if pid not in predictions]
    results = {}
    for pid in pids:
        problem = problems[pid]
        letter = parse_answer(predictions[pid]) if pid in predictions else FAILED
        index = predicted_index(letter, len(problem["choices"]))
        right = index == problem["answer"]
        results[pid] = index
        correct += right
        failed += index == -1
        for cat in categories(problem):
            counts[cat][0] += right
            counts[cat][1] += 1
    return {
        **_bucket(correct, len(pids)),
        "failed": failed,
        "missing": len(missing),
        "categories": {cat: _bucket(*counts[cat]) for cat in CATEGORIES},
        "results": results,
    }


def score_against_references(rows: list[dict]) -> dict:
    """Accuracy of answer rows whose reference is "The answer is X." (a recipe's `eval.metric: scienceqa`).

    The number of choices is not known here, so any parsed letter counts; categories need
    `problems.json` (use `lvit eval scienceqa`).
    """
    correct = failed = 0
    for row in rows:
        letter = parse_answer(row["answer"])
        failed += letter == FAILED
        correct += letter != FAILED and letter == parse_answer(row["reference"])
    return {**_bucket(correct, len(rows)), "failed": failed}


def format_table(scores: dict, title: str = "ScienceQA") -> str:
    def pct(bucket):
        return "-" if bucket["accuracy"] is None else f"{100 * bucket['accuracy']:.2f}"

    lines = [title, f"{'category':<10}{'accuracy':>10}{'correct':>10}{'total':>8}"]
    for cat, bucket in scores["categories"].items():
        lines.append(f"{cat:<10}{pct(bucket):>10}{bucket['correct']:>10}{bucket['total']:>8}")
    lines.append(f"{'all':<10}{pct(scores):>10}{scores['correct']:>10}{scores['total']:>8}")
    lines.append(f"unparsed outputs (counted wrong): {scores['failed']}; missing predictions: {scores['missing']}")
    return "\n".join(lines)


def load_split(problems_path: str | Path, splits_path: str | Path, split: str) -> tuple[dict, list[str]]:
    """`(problems, pids of split)`, with errors that name the file."""
    problems = _read_json(problems_path, dict, "problems.json: problem id -> problem")
    splits = _read_json(splits_path, dict, "pid_splits.json: split -> problem ids")
    if split not in splits:
        raise LvitError(f"{splits_path}: no split {split!r}; it has {', '.join(sorted(splits))}.")
    pids = [str(p) for p in splits[split]]
    unknown = [p for p in pids if p not in problems]
    if unknown:
        raise LvitError(f"{splits_path}: {len(unknown)} {split} id(s) not in {problems_path}, e.g. {unknown[0]!r}.")
    return problems, pids


def _read_json(path, kind, what: str):
    path = Path(path)
    if not path.is_file():
        raise LvitError(f"file not found: {path} (expected {what})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LvitError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, kind):
        raise LvitError(f"{path}: expected {what}")
    return data


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

    `generation`: `lvit.eval.answer_records`'s options (settings, batch_size, load_4bit, ...). `arbiter`:
    `lvit.eval.arbiter.arbitrate`'s options (endpoint, prompt, concurrency), to add the arbiter's scores.
    """
    from lvit.eval import answer_records, write_results

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
        from lvit.eval.arbiter import arbitrate

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

    Results go to `out` (default: `<predictions stem>_results.json` beside the predictions, or
    `MODEL/eval/scienceqa-<split>/` with the answers). `options`: `evaluate`'s (image_folder, limit,
    answer_format, settings, batch_size, ...), used when generating. `arbiter`: the text LLM's endpoint and
    options (`lvit.eval.arbiter.arbitrate`): its answers, and its call where it and the model disagree, are
    scored beside the model's (`scores["arbiter"]`). Returns a `BenchmarkResult`.
    """
    from lvit.eval import (
        BenchmarkResult,
        check_model_or_predictions,
        read_predictions,
        scored_predictions,
    )

    check_model_or_predictions(model, predictions)
    if predictions is not None:
        problems, pids = load_split(problems_path, splits_path, split)
        outputs = read_predictions(predictions)
        scores = score(problems, pids, outputs)
        if arbiter is not None:
            from lvit.eval.arbiter import arbitrate

            where = Path(out).parent if out is not None else Path(predictions).parent
            scores["arbiter"] = arbitrate(
                problems, pids, outputs, where / f"{Path(predictions).stem}_arbiter", **arbiter
            )
        return scored_predictions("scienceqa", scores, predictions, out, split=split)
    folder = Path(out) if out is not None else Path(model) / "eval" / f"scienceqa-{split}"
    scores = evaluate(model, problems_path, splits_path, folder, split=split, arbiter=arbiter, **options)
    return BenchmarkResult(scores, folder / "results.json")
