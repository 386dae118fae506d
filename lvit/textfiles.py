"""Reading the text files a user hands lvit (JSON, JSON Lines, YAML), with errors that name the file and the line.

- `read_text(path, what)`: the file's text as UTF-8, a leading byte-order mark (Windows / Excel exports) dropped;
  a missing file is `{what} not found: {path}`, text in another encoding an error naming its line.
- `parse_json(text, path, top, expected)` / `read_json(path, what, top, expected)`: one JSON document; text that
  does not parse names the file, line and column, and a top level that is not a `top` says what was expected.
- `json_lines(text)`: the lines of a JSON Lines file, each parsed or with the reason it does not parse, so the
  caller decides whether a bad line stops the read or is reported with the others.

Crash-safe append-only output files are `lvit.llm.jsonl_log`'s; these readers are for input files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lvit.errors import LvitError

BOM = "\ufeff"


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of `path`, a byte-order mark dropped; an `LvitError` `{what} not found: {path}` when it is
    not a file, and one naming the line when it is not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise LvitError(f"{what} not found: {path}")
    return decode(path.read_bytes(), path)


def decode(data: bytes, path: str | Path, first_line: int = 1) -> str:
    """`data` (the bytes of `path` from line `first_line`) as UTF-8 text, a leading byte-order mark dropped."""
    try:
        return data.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as exc:
        raise LvitError(not_utf8(data, exc, path, first_line)) from None


def not_utf8(data: bytes, exc: UnicodeDecodeError, path, first_line: int = 1) -> str:
    """What to say about bytes that are not UTF-8: the file, line and column, the byte, how to convert the file."""
    line = first_line + data.count(b"\n", 0, exc.start)
    return f"{path}: line {line}, {_not_utf8(data, exc, path)}"


def _not_utf8(data: bytes, exc: UnicodeDecodeError, path) -> str:
    column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
    return (
        f"column {column}: not UTF-8 text (byte 0x{data[exc.start]:02x}); lvit reads UTF-8: convert the file, "
        f"e.g. `iconv -f latin1 -t utf-8 {Path(path).name} > fixed{Path(path).suffix}` for Latin-1 text"
    )


def parse_json(text: str, path: str | Path, top: type | None = None, expected: str = "", hint: str = "") -> Any:
    """`text` (the content of `path`) as JSON. `LvitError`s: `{path}: not valid JSON (line L, column C): {why}`
    followed by `hint`, and, when `top` is given and the document is not one, `{path}: expected {expected}`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LvitError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}{hint}") from None
    if top is not None and not isinstance(data, top):
        raise LvitError(f"{path}: expected {expected}")
    return data


def read_json(path: str | Path, what: str, top: type | None = None, expected: str = "", hint: str = "") -> Any:
    """The JSON document in the file `path`: `read_text` then `parse_json` (their errors name the file)."""
    return parse_json(read_text(path, what), path, top, expected, hint)


def json_lines(text: str | bytes, path: str | Path = "") -> Iterator[tuple[int, Any, str | None]]:
    """`(line number, value, None)` for each non-blank line of JSON Lines `text`, or `(line number, None, why)`
    for a line that is not valid JSON (`why`: the parser's message). Given the file's bytes, each line is decoded on
    its own: a line that is not UTF-8 is one bad line (its `why` says so), not a file that cannot be read."""
    raw = text.split(b"\n") if isinstance(text, bytes) else text.splitlines()
    for number, line in enumerate(raw, start=1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, None, _not_utf8(line, exc, path)
                continue
        if number == 1:
            line = line.removeprefix(BOM)
        if not line.strip():
            continue
        try:
            value, why = json.loads(line), None
        except json.JSONDecodeError as exc:
            value, why = None, exc.msg
        yield number, value, why
