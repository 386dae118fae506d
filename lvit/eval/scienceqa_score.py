"""ScienceQA scoring: the answer letter in a reply, per-category accuracy as LLaVA reports it, the split's problems."""

from __future__ import annotations

import re
from pathlib import Path

from lvit.data.scienceqa import OPTIONS, to_record
from lvit.errors import LvitError
from lvit.textfiles import read_json

FAILED = "FAILED"
# LLaVA's pattern, unescaped dot included: "The answer is B," matches as well.
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
CATEGORIES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")


def question_records(problems: dict, pids: list[str], answer_format: str = "lecture-solution") -> list[dict]:
    """LLaVA-format records for `pids` (`lvit.data.scienceqa.to_record`: image path `<pid>/<image>`
    relative to `images/<split>`, the reference answer in the gpt turn)."""
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
    problems = read_json(problems_path, "problems.json", dict, "problems.json: problem id -> problem")
    splits = read_json(splits_path, "pid_splits.json", dict, "pid_splits.json: split -> problem ids")
    if split not in splits:
        raise LvitError(f"{splits_path}: no split {split!r}; it has {', '.join(sorted(splits))}.")
    pids = [str(p) for p in splits[split]]
    unknown = [p for p in pids if p not in problems]
    if unknown:
        raise LvitError(f"{splits_path}: {len(unknown)} {split} id(s) not in {problems_path}, e.g. {unknown[0]!r}.")
    return problems, pids
