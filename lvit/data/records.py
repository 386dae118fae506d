"""Reading LLaVA-format data and normalising each record into a `Conversation`.

LLaVA's format (LLaVA-CC3M-595K, LLaVA-Instruct-158K, llava_v1_5_mix665k) is a JSON list, or
JSON Lines, of records `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}]}`.
A record without `image` is text-only. The `<image>` placeholder may stand at the start or at the
end of the first human turn; it is removed here and the template puts the image back in its place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lvit.errors import LvitError
from lvit.templates import IMAGE_PLACEHOLDER, Conversation

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class RecordError(ValueError):
    """A record that cannot be trained on; the message says why and how to fix it."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where
        self.reason = message


@dataclass
class Record:
    id: str
    index: int
    image: str | None
    conversation: Conversation

    def to_row(self) -> dict:
        """The columns lvit keeps in its `datasets.Dataset` (images stay paths until batching)."""
        conv = self.conversation
        return {
            "id": self.id,
            "image_path": self.image,
            "roles": [role for role, _ in conv.turns],
            "texts": [text for _, text in conv.turns],
            "system": conv.system,
        }


def conversation_from_row(row: dict) -> Conversation:
    return Conversation(
        turns=list(zip(row["roles"], row["texts"], strict=True)),
        has_image=row["image_path"] is not None,
        system=row["system"],
    )


def read_raw_records(path: str | Path) -> list[dict]:
    """Read a LLaVA JSON list or a JSON Lines file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise LvitError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LvitError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None
        if not isinstance(data, list):
            raise LvitError(f"{path}: expected a JSON list of records")
        return data
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise LvitError(
                f"{path}:{lineno}: not valid JSON ({exc.msg}); each line of a .jsonl file is one record"
            ) from None
    return records


def normalise(raw: object, index: int) -> Record:
    """Validate one raw LLaVA record and turn it into a `Record`, or raise `RecordError`."""
    if not isinstance(raw, dict):
        raise RecordError(f"record #{index}", f"a record is a JSON object, got {type(raw).__name__}")
    rid = str(raw.get("id", index))
    where = f"record #{index} (id {rid!r})"
    convs = raw.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise RecordError(where, "'conversations' is missing or empty; add a list of {from, value} turns")
    image = raw.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise RecordError(where, f"'image' must be a file path, got {image!r}")

    turns: list[tuple[str, str]] = []
    system = None
    placeholders = 0
    for t, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise RecordError(where, f"turn {t} is not an object with 'from' and 'value'")
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise RecordError(where, f"turn {t} has unknown role {turn.get('from')!r}; use 'human' or 'gpt'")
        value = turn.get("value")
        if not isinstance(value, str) or not value.strip():
            raise RecordError(where, f"turn {t} ('{turn.get('from')}') has an empty or non-string 'value'")
        if role == "system":
            if t != 0:
                raise RecordError(where, f"turn {t}: a system turn may only come first")
            system = value
            continue
        count = value.count(IMAGE_PLACEHOLDER)
        placeholders += count
        if count:
            if role != "user" or turns:
                raise RecordError(where, f"turn {t}: '<image>' may only appear in the first human turn")
            value = _strip_placeholder(value)
            if not value:
                value = ""
        turns.append((role, value))

    if not turns or turns[0][0] != "user":
        raise RecordError(where, "the conversation must start with a human turn")
    for t in range(1, len(turns)):
        if turns[t][0] == turns[t - 1][0]:
            raise RecordError(
                where, f"turns must alternate human/gpt, but turns {t - 1} and {t} are both '{turns[t][0]}'"
            )
    if turns[-1][0] != "assistant":
        raise RecordError(where, "the conversation must end with a gpt (assistant) turn, which is what trains")
    expected = 1 if image is not None else 0
    if placeholders != expected:
        if image is None:
            raise RecordError(
                where, "'<image>' appears in the text but the record has no 'image'; add one or remove it"
            )
        raise RecordError(
            where,
            f"the record has an image but {placeholders} '<image>' placeholders; put exactly one "
            "at the start or end of the first human turn",
        )
    return Record(rid, index, image, Conversation(turns=turns, has_image=image is not None, system=system))


def _strip_placeholder(value: str) -> str:
    """Remove the `<image>` placeholder and the newline that joins it to the text."""
    text = value.strip()
    if text.startswith(IMAGE_PLACEHOLDER):
        text = text[len(IMAGE_PLACEHOLDER) :]
    elif text.endswith(IMAGE_PLACEHOLDER):
        text = text[: -len(IMAGE_PLACEHOLDER)]
    else:
        text = text.replace(IMAGE_PLACEHOLDER, "")
    return text.strip()


def read_records(path: str | Path) -> tuple[list[Record], list[RecordError], int]:
    """Read a data file and validate every record.

    Returns `(records, problems, total)`: the valid records, one `RecordError` per invalid record
    (with its id and reason), and the number of records in the file. The one entry point for
    reading training or question data; new input formats plug in here.
    """
    raws = read_raw_records(path)
    records, problems = [], []
    for index, raw in enumerate(raws):
        try:
            records.append(normalise(raw, index))
        except RecordError as exc:
            problems.append(exc)
    return records, problems, len(raws)
