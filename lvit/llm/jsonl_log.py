"""Append-only JSON Lines files that survive a crash: the output of every resumable LLM-driven command.

A row is written whole, flushed and fsynced before the next (`append`), so a crash loses at most the row being
written; `read_rows` reads the rows by `id` and removes a cut-off last line,
so a rerun knows exactly what is done and writes nothing twice. `lvit generate`'s answer files are such files too
(`lvit.infer.answers.read_answer_file`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from lvit.errors import LvitError

log = logging.getLogger(__name__)


def read_rows(path: str | Path, repair: bool = True, what: str = "JSON row") -> dict[str, dict]:
    """Rows by their `id`. A cut-off last line (a crash mid-write) is left out, and with `repair` removed
    from the file: its work is done again. A bad line anywhere else is an error naming the line."""
    path = Path(path)
    rows: dict[str, dict] = {}
    if not path.is_file():
        return rows
    lines = path.read_bytes().split(b"\n")
    good_end = 0
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if line.strip():
            try:
                row = json.loads(line)
                rows[str(row["id"])] = row
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                if not last:
                    raise LvitError(
                        f"{path}:{i + 1}: not a {what} with an 'id'; fix or remove the line to resume."
                    ) from None
                log.warning("%s: ignoring a cut-off last line (an interrupted run); it is done again", path)
                if repair:
                    with path.open("r+b") as f:  # an interrupted write: no newline after it
                        f.truncate(good_end)
                break
        good_end += len(line) + (0 if last else 1)
    return rows


def open_append(path: str | Path):
    """`path` opened for appending (folders created), after ending a last line that lacks its newline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        with path.open("ab") as f:
            f.write(b"\n")
    return path.open("a", encoding="utf-8")


def append(f, row: dict) -> None:
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())
