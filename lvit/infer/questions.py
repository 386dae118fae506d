"""Question files: any data file lvit reads, whose records end with the user turn to answer.

The last user turn of each record is the question and the earlier turns its history; a trailing
assistant turn, if present, is the reference answer (what `lvit generate` and evaluation score
against).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lvit.data.images import describe_image, image_exists, probe_image
from lvit.data.normalise import normalise
from lvit.data.reader import first_json_rows, read_records
from lvit.data.records import Record, RecordError
from lvit.data.sources import is_hf_path, read_json_rows
from lvit.errors import LvitError
from lvit.templates.conversation import IMAGE_PLACEHOLDER, Conversation


@dataclass
class Question:
    id: str
    conversation: Conversation
    """Ends with the user turn to answer; earlier turns are the history."""
    image: str | list[str] | None
    """The image (a path), a list of paths (several images, in the order of their placeholders) or None."""
    reference: str | None = None
    """The record's trailing assistant turn, when it had one."""

    @property
    def prompt(self) -> str:
        return self.conversation.turns[-1][1]


def read_questions(path: str | Path) -> list[Question]:
    """Read a question file in any format `lvit.data.reader.read_records` reads.

    Raises `LvitError` naming the records that cannot be used, and for an id that appears twice.
    """
    if _is_llava_question_file(path):
        raws, _, _ = read_json_rows(Path(path))
        return questions_from_rows([_llava_question(raw) for raw in raws], path)
    records, problems, _ = read_records(path, require_answer=False)
    return _questions(records, problems, path)


def _is_llava_question_file(path) -> bool:
    """LLaVA's own question files (its `model_vqa*.py` inputs, LLaVA-Bench's `questions.jsonl`): one
    `{"question_id", "image", "text"}` per line, no conversation."""
    path = Path(path)
    if not path.is_file() or is_hf_path(path):
        return False
    first = next((r for r in first_json_rows(path, 1)[0] if isinstance(r, dict)), None)
    return bool(first) and {"question_id", "text"} <= first.keys() and not {"conversations", "messages"} & first.keys()


def _llava_question(raw):
    """One row of a LLaVA question file as a LLaVA record: the image (when it names one) opens the question."""
    if not isinstance(raw, dict):
        return raw  # the record check names it
    text, image = str(raw.get("text", "")), raw.get("image")
    value = f"{IMAGE_PLACEHOLDER}\n{text}" if image and IMAGE_PLACEHOLDER not in text else text
    record = {"id": str(raw.get("question_id")), "conversations": [{"from": "human", "value": value}]}
    return {**record, "image": image} if image else record


def questions_from_rows(rows: list[dict], where: str | Path) -> list[Question]:
    """Questions from LLaVA-format rows already in memory (a benchmark's question records), checked as
    `read_questions` checks a file; `where` names them in errors."""
    records, problems = [], []
    for index, raw in enumerate(rows):
        try:
            records.append(normalise(raw, index, require_answer=False))
        except RecordError as exc:
            problems.append(exc)
    return _questions(records, problems, where)


def _questions(records: list[Record], problems: list[RecordError], path) -> list[Question]:
    if problems:
        listed = "\n".join(f"  {p}" for p in problems[:5])
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise LvitError(f"{path}: {len(problems)} record(s) cannot be used as questions:\n{listed}{more}")
    questions, seen = [], set()
    for record in records:
        turns = list(record.conversation.turns)
        reference = turns.pop()[1] if turns[-1][0] == "assistant" else None
        if record.id in seen:
            raise LvitError(f"{path}: id {record.id!r} appears more than once; answers are matched to questions by id.")
        seen.add(record.id)
        conv = Conversation(turns=turns, has_image=record.image is not None, system=record.conversation.system)
        questions.append(Question(record.id, conv, record.image, reference))
    if not questions:
        raise LvitError(f"{path}: no questions in the file.")
    return questions


def images_of(image) -> list:
    """A question's (or generation input's) images as a list: [] for None, a list as it is, else [image]."""
    return [] if image is None else list(image) if isinstance(image, list) else [image]


def check_images(questions: list[Question], image_folder: str | Path | None) -> None:
    """Fail before generating when an image is missing or is not an image (not after hours of generation).

    Each distinct image's header is read (`lvit.data.images.read_header`: no full decode), as `lvit data check`
    does by default."""
    missing = [(q, i) for q in questions for i in images_of(q.image) if not image_exists(i, image_folder)]
    if missing:
        raise LvitError(
            f"{len(missing)} question image(s) not found, e.g. {missing[0][0].id!r}: "
            f"{describe_image(missing[0][1], image_folder)}. "
            "Pass --image-folder, the folder the data's image paths are relative to."
        )
    found: dict = {}
    for q in questions:
        for i in images_of(q.image):
            if i not in found:
                found[i] = probe_image(i, image_folder, decode=False)
    bad = [(q, found[i]) for q in questions for i in images_of(q.image) if found[i] is not None]
    bad = [(q, problem) for q, problem in bad if problem[1] == "error"]
    if bad:
        listed = "\n".join(f"  question {q.id!r}: {problem[2]}" for q, problem in bad[:5])
        more = f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise LvitError(
            f"{len(bad)} question image(s) cannot be read:\n{listed}{more}\nReplace or remove those questions."
        )
