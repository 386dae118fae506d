"""examples/instruction_data: captioned photos -> instruction data -> fine-tune -> judged, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "instruction_data"


def test_make_input_reads_sidecar_captions_and_lists_uncaptioned_images(tmp_path):
    from PIL import Image

    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("A cat.\n\nA small cat.\n")
    (tmp_path / "c.txt").write_text("\n")
    out = tmp_path / "in.jsonl"
    result = subprocess.run([sys.executable, EXAMPLE / "make_input.py", tmp_path, out], capture_output=True, text=True)
    assert result.returncode == 0 and "1 captioned images" in result.stdout
    assert "left out b.png" in result.stderr and "left out c.png" in result.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"id": "a", "image": "a.png", "captions": ["A cat.", "A small cat."]}
    ]


@pytest.mark.slow
def test_the_example_runs_end_to_end(tmp_path):
    work = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, EXAMPLE / "run.py", "--work", work, "--photos", "8", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "$ lvit data generate" in out and "written this run: 24 (conversation 9, detail 4, complex 11)" in out
    assert "no errors" in out and "$ lvit finetune" in out and "$ lvit eval llava-bench" in out
    results = json.loads((work / "bench" / "results.json").read_text())
    assert results["questions"] == 16 and results["failed"] == 0
    assert set(results["categories"]) == {"conversation", "detail", "complex"}
    assert len((work / "bench" / "reviews.jsonl").read_text().splitlines()) == 16
