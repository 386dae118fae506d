"""Append-only JSON Lines files that survive a crash: the output of every resumable LLM-driven command.

A row is written whole, flushed and fsynced before the next (`append`), so a crash loses at most the row being
written; `read_rows` reads the rows by `id` and removes a cut-off last line (`lvit.answers.read_answer_file`),
so a rerun knows exactly what is done and writes nothing twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_rows(path: str | Path) -> dict[str, dict]:
    """Rows by id; a cut-off last line is dropped from the file (it is produced again)."""
    from lvit.answers import read_answer_file

    return read_answer_file(path, repair=True)


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
