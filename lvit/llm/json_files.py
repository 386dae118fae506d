"""Reading the JSON, JSON Lines (and YAML) files a user hands lvit, with errors that name the file.

- `read_text(path, what)`: the file's text; a missing file is `{what} not found: {path}`.
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


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of `path`; an `LvitError` `{what} not found: {path}` when it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise LvitError(f"{what} not found: {path}")
    return path.read_text(encoding="utf-8")


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


def json_lines(text: str) -> Iterator[tuple[int, Any, str | None]]:
    """`(line number, value, None)` for each non-blank line of JSON Lines `text`, or `(line number, None, why)`
    for a line that is not valid JSON (`why`: the parser's message)."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value, why = json.loads(line), None
        except json.JSONDecodeError as exc:
            value, why = None, exc.msg
        yield number, value, why
