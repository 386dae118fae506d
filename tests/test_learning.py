"""The learning proof on the demo's task.

One `lvit demo` run (stage 1 + stage 2). `lvit demo --ablation`, which also runs stage 2 alone (the
paper's first ablation in miniature), is reported in benchmarks/RESULTS.md rather than tested, to keep
the suite short. Asserted: the two-stage model answers held-out images (never trained on) at >= 80%
per question kind (chance 25%), and what a user reaches it through (`lvit chat`, an exported folder
answered by `lvit generate`) gives the same answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lvit.cli.app import app

pytestmark = pytest.mark.slow  # one to two minutes on 2 cores: two training runs


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from lvit.demo.run import run_demo

    out = tmp_path_factory.mktemp("learning") / "demo"
    run_demo(out)
    return out


def test_two_stages_learn_the_task(demo):
    results = json.loads((demo / "demo_results.json").read_text())
    assert results["accuracy"]["colour"] >= 0.8 and results["accuracy"]["place"] >= 0.8, results
    assert results["chance"] == 0.25
    assert set(results["train_loss"]) == {"stage 1", "stage 2"}
    assert (demo / "stage1" / "projector.safetensors").is_file() and (demo / "stage2" / "model.safetensors").is_file()


def test_chat_answers_like_the_evaluation(demo):
    """`lvit chat --prompt` builds the prompt as training did: it gives the evaluated answers."""
    rows = [json.loads(line) for line in (demo / "stage2" / "eval" / "heldout-answers.jsonl").read_text().splitlines()]
    for row in rows[:4]:
        image = demo / "data" / "images" / row["image"]
        result = CliRunner().invoke(
            app,
            ["chat", str(demo / "stage2"), "--image", str(image), "--prompt", row["prompt"], "--max-new-tokens", "6"],
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == row["answer"]


def test_exported_folder_answers_like_the_run(demo, tmp_path):
    """`lvit export` then `lvit generate` on the stock folder: the same held-out answers."""
    exported = tmp_path / "export"
    result = CliRunner().invoke(
        app, ["export", str(demo / "stage2"), "--out", str(exported), "--dtype", "fp32"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert not (exported / "lvit_run.json").exists()  # a stock LLaVA folder
    answers = tmp_path / "answers.jsonl"
    result = CliRunner().invoke(
        app,
        [
            "generate",
            str(exported),
            "--data",
            str(demo / "data" / "test.json"),
            "--out",
            str(answers),
            "--image-folder",
            str(demo / "data" / "images"),
            "--max-new-tokens",
            "6",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    got = {r["id"]: r["answer"] for r in map(json.loads, answers.read_text().splitlines())}
    run = {
        r["id"]: r["answer"]
        for r in map(json.loads, (demo / "stage2" / "eval" / "heldout-answers.jsonl").read_text().splitlines())
    }
    assert got == run
