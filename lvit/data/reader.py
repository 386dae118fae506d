"""Reading a data source into `Record`s: every row normalised, every problem a `RecordError` that names the record."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lvit.data.normalise import is_image, normalise, normalise_chat
from lvit.data.records import FORMATS, Record, RecordError, where_of
from lvit.data.sources import EmbeddedImage, HFSource, detect_format, is_hf_path, load_rows
from lvit.errors import LvitError

# ---------------------------------------------------------------------------------------------
# reading a source


@dataclass
class ReadResult:
    """Everything one pass over a data source gives: see `read_all`."""

    format: str
    """`llava` or `chat` (JSON / JSON Lines), `hf/llava` or `hf/chat` (a Hugging Face dataset)."""
    records: list[Record]
    """Records whose conversation is valid (images not checked)."""
    problems: list[RecordError]
    total: int
    bad_images: dict[int, tuple]
    """index -> (image, id, line) of invalid records that still name an image, to check it too."""


def read_all(path: str | Path, fmt: str = "auto", require_answer: bool = True) -> ReadResult:
    """Read a data source and normalise every record (no image checks)."""
    if fmt not in FORMATS:
        raise LvitError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")
    rows = load_rows(Path(path), fmt)
    schema, raws, lines = rows.schema, rows.raws, rows.lines
    problems = [
        RecordError(
            where_of(index, None, line),
            message
            if "not UTF-8" in message
            else f"not valid JSON ({message}); each line of a .jsonl file is one complete record",
            "invalid_json",
            index=index,
            line=line,
        )
        for index, line, message in rows.broken
    ]
    norm = normalise_chat if schema == "chat" else normalise
    records: list[Record] = []
    bad_images: dict[int, tuple] = {}
    for index, raw in enumerate(raws):
        if raw is None:  # a broken JSON line, already a problem
            continue
        line = lines[index]
        try:
            records.append(norm(raw, index, line, require_answer))
        except RecordError as exc:
            problems.append(exc)
            image = _image_field(raw, schema)
            if image is not None:
                bad_images[index] = (image, exc.id, line)
    name = f"hf/{schema}" if rows.container == "hf" else schema
    return ReadResult(name, records, problems, len(raws), bad_images)


def read_records(
    path: str | Path, fmt: str = "auto", require_answer: bool = True
) -> tuple[list[Record], list[RecordError], int]:
    """Read a data file (or dataset) in any supported format and validate every record's conversation.

    Returns `(records, problems, total)`: the valid records, one or more `RecordError` per invalid
    record (with its index, id and reason, in record order), and the number of records read.
    `fmt` is `auto` (detected), `llava`, `chat` or `hf` (a Hugging Face dataset whose rows use
    either schema). Images are not opened here: `lvit.data.check.check_record_images` checks them. With
    `require_answer=False` a conversation may end with a user turn (a question file), which training data
    may not.
    """
    read = read_all(Path(path), fmt, require_answer)
    problems = sorted(read.problems, key=lambda p: -1 if p.index is None else p.index)
    return read.records, problems, read.total


def _image_field(raw: object, schema: str) -> str | EmbeddedImage | None:
    """The one image of a raw record, if it names one clearly (for checks on invalid records)."""
    if not isinstance(raw, dict):
        return None
    image = raw.get("image") if schema == "llava" else raw.get("images", raw.get("image"))
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
    return image if is_image(image) else None


def first_records(path: str | Path, fmt: str = "auto", limit: int = 200, require_answer: bool = True) -> list[Record]:
    """The valid records among the first `limit` rows of a data source, read no further than those rows need: the
    first lines of a JSON Lines file, the first objects of a JSON list (the rest of the list is never parsed), a
    dataset's first rows. Invalid rows are left out without a word: for a look at the data (export's self-check),
    not for training, which reads every record (`read_all`)."""
    path = Path(path)
    if fmt == "hf" or is_hf_path(path):
        source = HFSource(path, None if fmt in ("auto", "hf") else fmt)
        source.dataset = source.dataset.select(range(min(limit, len(source.dataset))))
        raws, lines, schema = source.read_rows(), [None] * limit, source.schema
    else:
        raws, lines = first_json_rows(path, limit)
        schema = fmt if fmt in ("llava", "chat") else detect_format(path, raws)
    norm = normalise_chat if schema == "chat" else normalise
    records = []
    for index, (raw, line) in enumerate(zip(raws, lines, strict=False)):
        if raw is None:
            continue
        try:
            records.append(norm(raw, index, line, require_answer))
        except RecordError:
            continue
    return records


def first_json_rows(path: Path, limit: int) -> tuple[list, list[int | None]]:
    """The first `limit` rows of a JSON list or JSON Lines file (a row that does not parse is None), and their line
    numbers (None in a JSON list)."""
    raws: list = []
    with path.open(encoding="utf-8-sig", errors="replace") as f:  # a look at the data: a bad byte is a bad row
        text = f.read(4096)
        if text.lstrip().startswith("["):
            text += f.read()
            decoder, at = json.JSONDecoder(), text.index("[") + 1
            while len(raws) < limit:
                while at < len(text) and text[at] in " \t\r\n,":
                    at += 1
                if at >= len(text) or text[at] == "]":
                    break
                try:
                    raw, at = decoder.raw_decode(text, at)
                except json.JSONDecodeError:
                    break
                raws.append(raw)
            return raws, [None] * len(raws)
        f.seek(0)
        lines: list[int | None] = []
        for number, line in enumerate(f, 1):
            if len(raws) >= limit:
                break
            if not line.strip():
                continue
            try:
                raws.append(json.loads(line))
            except json.JSONDecodeError:
                raws.append(None)
            lines.append(number)
        return raws, lines
