"""examples/custom_dataset: the CSV converter, and the whole example run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "custom_dataset"


def test_make_jsonl_converts_rows_and_reports_empty_ones(tmp_path):
    csv_path = tmp_path / "q.csv"
    csv_path.write_text(
        "\ufeffimage,question,answer\n"  # a BOM, as spreadsheet exports write
        "cat.png,What is this?,A cat.\n"
        ',"Text only, with a comma?",Yes.\n'
        "dog.png,,missing question\n"
    )
    out = tmp_path / "data.jsonl"
    result = subprocess.run(
        [sys.executable, EXAMPLE / "make_jsonl.py", csv_path, out], capture_output=True, text=True, check=True
    )
    assert "2 records" in result.stdout and f"{csv_path}:4: empty question or answer" in result.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {
            "id": "row-2",
            "image": "cat.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}],
        },
        {
            "id": "row-3",
            "conversations": [{"from": "human", "value": "Text only, with a comma?"}, {"from": "gpt", "value": "Yes."}],
        },
    ]
    from lvit.data.reader import read_records

    records, problems, _ = read_records(out)
    assert problems == [] and [r.image for r in records] == ["cat.png", None]


def test_make_jsonl_names_missing_columns(tmp_path):
    csv_path = tmp_path / "q.csv"
    csv_path.write_text("picture,question,answer\ncat.png,Q,A\n")
    result = subprocess.run([sys.executable, EXAMPLE / "make_jsonl.py", csv_path, tmp_path / "o.jsonl"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 1 and "missing column(s) ['image']" in result.stderr


@pytest.mark.slow
def test_the_example_runs_end_to_end(tmp_path):
    work = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, EXAMPLE / "run.py", "--work", work, "--images", "8", "--steps", "4"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "$ lvit data check" in out and "[image_missing]" in out  # the check found the missing photo
    assert "$ lvit finetune" in out and "$ lvit export" in out
    skipped = [json.loads(line) for line in (work / "run" / "skipped_records.jsonl").read_text().splitlines()]
    assert [(s["id"], s["kind"]) for s in skipped] == [("row-18", "image_missing")]
    assert (work / "export" / "config.json").is_file() and (work / "export" / "processor_config.json").is_file()
    assert "Q: What colour is the shape?\nanswer: " in out
