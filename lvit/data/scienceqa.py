"""ScienceQA in LLaVA's format: the prompt and answer builders, and the conversion to LLaVA JSON.

Source: LLaVA `scripts/convert_sqa_to_llava.py` and `scripts/convert_sqa_to_llava_base_prompt.py`
(github.com/haotian-liu/LLaVA), with the prompt format of `docs/ScienceQA.md`, "QCM-LEA":

- question (QCM): "Question: {question}\\nContext: {hint or 'N/A'}\\nOptions: (A) ... (B) ...", with
  double spaces collapsed (one `replace("  ", " ")` pass), stripped, and then every "Question: "
  removed (LLaVA's `input.replace('Question: ', '')`, kept as is);
- answer (LEA): "Answer: {lecture} {solution} The answer is {letter}.", processed the same way with
  "Answer: " removed. LLaVA keeps a leading space when lecture and solution are both empty; lvit
  strips it (the only difference);
- the image (when the problem has one) at `<pid>/<image>` relative to `images/<split>`, its
  `<image>` placeholder at the end of the question ("{question}\\n<image>").

`answer_format="letter"` answers with the option letter alone and appends LLaVA-1.5's
single-letter instruction to the question (`llava/eval/model_vqa_science.py`,
`--single-pred-prompt`: "Answer with the option's letter from the given choices directly.").
"""

from __future__ import annotations

import json
from pathlib import Path

from lvit.errors import LvitError
from lvit.textfiles import read_json

OPTIONS = ("A", "B", "C", "D", "E")  # LLaVA's `options` default
ANSWER_FORMATS = ("lecture-solution", "letter")
SINGLE_LETTER_PROMPT = "Answer with the option's letter from the given choices directly."


def _context(problem: dict) -> str:
    # get_context_text(problem, use_caption=False): the hint and an empty caption joined, else "N/A"
    return " ".join([problem.get("hint") or "", ""]).strip() or "N/A"


def _choices(problem: dict) -> str:
    return " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(problem["choices"]))


def _multiline(text: str | None) -> str:
    # get_lecture_text / get_solution_text escape "\n", build_prompt_chatbot turns "\\n" back into newlines
    return (text or "").replace("\n", "\\n").replace("\\n", "\n")


def answer_letter(problem: dict) -> str:
    return OPTIONS[problem["answer"]]


def build_prompt(problem: dict) -> str:
    """The question text LLaVA builds for a ScienceQA problem (format QCM, no caption, no placeholder)."""
    text = f"Question: {problem['question']}\nContext: {_context(problem)}\nOptions: {_choices(problem)}\n"
    text = text.replace("  ", " ").strip()
    if text.startswith("Question: "):
        text = text.replace("Question: ", "")
    return text


def build_question(problem: dict, fmt: str = "lecture-solution") -> str:
    """The human turn's text for `fmt`: `build_prompt`, plus the single-letter instruction for `letter`."""
    _check_format(fmt)
    text = build_prompt(problem)
    return f"{text}\n{SINGLE_LETTER_PROMPT}" if fmt == "letter" else text


def build_answer(problem: dict, fmt: str = "lecture-solution") -> str:
    """The answer: LLaVA's LEA ("{lecture} {solution} The answer is X.") or the letter alone."""
    _check_format(fmt)
    letter = answer_letter(problem)
    if fmt == "letter":
        return letter
    text = f"Answer: {_multiline(problem.get('lecture'))} {_multiline(problem.get('solution'))} The answer is {letter}."
    text = text.replace("  ", " ").strip()
    if text.startswith("Answer: "):
        text = text.replace("Answer: ", "")
    return text.strip()


def _check_format(fmt: str) -> None:
    if fmt not in ANSWER_FORMATS:
        raise LvitError(f"unknown ScienceQA answer format {fmt!r}; use one of {', '.join(ANSWER_FORMATS)}")


def to_record(pid: str, problem: dict, fmt: str = "lecture-solution") -> dict:
    """One LLaVA-format record, as LLaVA's `convert_to_llava` writes it."""
    question, answer = build_question(problem, fmt), build_answer(problem, fmt)
    if problem.get("image"):
        return {
            "id": pid,
            "image": f"{pid}/{problem['image']}",
            "conversations": [{"from": "human", "value": f"{question}\n<image>"}, {"from": "gpt", "value": answer}],
        }
    return {"id": pid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def convert_scienceqa(
    problems_path: str | Path,
    splits_path: str | Path,
    split: str,
    out: str | Path,
    image_root: str | Path | None = None,
    answer_format: str = "lecture-solution",
) -> dict:
    """Write one ScienceQA split as LLaVA JSON (or JSON Lines when `out` ends in .jsonl).

    `image_root` is the release's `images` folder (holding `<split>/<pid>/image.png`) or the split's
    folder itself; images are checked to exist. Returns a summary: records, images, missing images
    and the image folder a recipe should use.
    """
    _check_format(answer_format)
    problems = read_json(problems_path, "problems.json", hint="; is it ScienceQA's problems.json?")
    splits = read_json(splits_path, "pid_splits.json", hint="; is it ScienceQA's pid_splits.json?")
    if split not in splits:
        raise LvitError(f"{splits_path}: no split {split!r}; it has {', '.join(sorted(splits))}")
    missing_pids = [pid for pid in splits[split] if pid not in problems]
    if missing_pids:
        raise LvitError(
            f"{problems_path}: {len(missing_pids)} problem id(s) of split {split!r} are missing, "
            f"e.g. {missing_pids[0]!r}; are problems.json and pid_splits.json from the same release?"
        )
    records = [to_record(pid, problems[pid], answer_format) for pid in splits[split]]

    image_folder = None
    missing: list[str] = []
    if image_root is not None:
        root = Path(image_root)
        image_folder = root / split if (root / split).is_dir() else root
        missing = [r["image"] for r in records if "image" in r and not (image_folder / r["image"]).is_file()]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".jsonl":
        out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        out.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return {
        "records": len(records),
        "images": sum("image" in r for r in records),
        "missing_images": missing,
        "image_folder": None if image_folder is None else str(image_folder),
        "out": str(out),
    }
