"""A real run never stops for a skipped sample, and leaves a run folder a user can read: the loss history
(`lvit_log.jsonl`), its plot, log lines instead of dicts, an end-of-run summary, and paths that work from any
folder (with `--base-model` for a base model moved since training)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from lvit.cli.app import app
from lvit.runs.files import LOG_FILE, PLOT_FILE, RECIPE_FILE, RUN_INFO_FILE, SKIPPED_FILE
from lvit.train.history import read_log

REPO = Path(__file__).resolve().parent.parent


def _data_with_a_corrupt_image(tmp: Path, shapes_data, n_good: int) -> Path:
    """`n_good` image records of the shapes data with one record whose image file is truncated in the middle."""
    images = tmp / "images"
    images.mkdir()
    good = [r for r in json.loads(shapes_data["instruct"].read_text()) if "image" in r][:n_good]
    for r in good:
        shutil.copy(shapes_data["images"] / r["image"], images / r["image"])
    data = good[:2] + [{**good[0], "id": "corrupt", "image": "corrupt.png"}] + good[2:]
    (images / "corrupt.png").write_bytes((images / good[0]["image"]).read_bytes()[:60])  # header, then nothing
    path = tmp / "data.json"
    path.write_text(json.dumps(data))
    return path


def _skipped_ids(out: Path) -> list[str]:
    return [json.loads(line)["id"] for line in (out / SKIPPED_FILE).read_text().splitlines()]


def test_a_corrupt_image_at_batch_one_is_skipped_and_the_run_finishes(tmp_path, tiny_recipe, shapes_data):
    from lvit.train.run import TrainingRun

    data = _data_with_a_corrupt_image(tmp_path, shapes_data, n_good=5)
    out = tmp_path / "run"
    recipe = tiny_recipe(
        out_dir=out,
        data={"path": str(data), "image_folder": str(tmp_path / "images"), "on_bad_record": "skip"},
        # batch 1, no accumulation: the corrupt record's step trains no token at all (0 / 0 if unguarded)
        global_batch_size=1,
        training={"per_device_train_batch_size": 1, "max_steps": ..., "num_train_epochs": 1, "optim": "adamw_torch"},
    )
    run = TrainingRun(recipe).setup()
    assert (run.trainer.args.per_device_train_batch_size, run.trainer.args.gradient_accumulation_steps) == (1, 1)
    run.train()
    run.save()
    assert run.trainer.state.global_step == 6  # every record, the corrupt one included, is a step
    assert _skipped_ids(out) == ["corrupt"]
    weights = load_file(str(out / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    entries = read_log(out / LOG_FILE)
    assert [e["step"] for e in entries] == list(range(1, 7))
    losses = [e["loss"] for e in entries]
    assert all(math.isfinite(x) for x in losses)
    assert losses.count(0.0) == 1  # the stand-in's step: nothing trained, a finite zero


@pytest.fixture(scope="module")
def relative_run(tiny_parts, shapes_data, tmp_path_factory):
    """A LoRA run trained through the CLI from its own folder, with the model parts given as relative paths."""
    home = tmp_path_factory.mktemp("relative")
    parts = home / "parts"
    shutil.copytree(tiny_parts[0], parts / "clip")
    shutil.copytree(tiny_parts[1], parts / "lm")
    recipe = {
        "stage": "finetune",
        "method": "lora",
        "lora": {"r": 8, "alpha": 16},
        "model": {"vision_tower": "parts/clip", "language_model": "parts/lm", "projector": "linear"},
        "data": {"path": str(shapes_data["instruct"]), "image_folder": str(shapes_data["images"]), "max_length": 256},
        "global_batch_size": 4,
        "training": {
            "output_dir": "run",
            "per_device_train_batch_size": 4,
            "max_steps": 3,
            "logging_steps": 1,
            "save_strategy": "no",
            "use_cpu": True,
            "report_to": "none",
            "seed": 0,
        },
    }
    (home / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lvit", "finetune", "recipe.yaml"], cwd=home, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return home, result


def test_run_folder_has_the_loss_history_plot_and_summary(relative_run):
    home, result = relative_run
    out = home / "run"
    entries = read_log(out / LOG_FILE)
    assert [e["step"] for e in entries] == [1, 2, 3]
    assert all(math.isfinite(e["loss"]) and "learning_rate" in e and "epoch" in e for e in entries)
    png = (out / PLOT_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out / PLOT_FILE) as image:
        assert image.format == "PNG" and image.width >= 400 and image.height >= 300
        assert len(set(image.convert("L").tobytes())) > 10  # something is drawn
    stderr = result.stderr
    assert "step 1/3  loss " in stderr and " lr " in stderr and "grad_norm" in stderr
    assert "trained 3 steps, 12 samples" in stderr and "final loss" in stderr
    assert f"lvit export {out.resolve()} --out {out.resolve()}-export" in stderr
    assert f"lvit chat {out.resolve()} --image " in stderr
    # no dicts of strings, no cursor escapes off a terminal, no notices a user cannot act on
    assert "{'loss'" not in stderr and "{'train_runtime'" not in stderr and "{'loss'" not in result.stdout
    assert "\r" not in stderr and "it/s]" not in stderr
    notices = ("requires torchvision", "Falling back to", "use_cache=True", "checkpointing` is deprecated", "gemm_4bit")
    for notice in notices:
        assert notice not in stderr


def test_a_run_trained_with_relative_paths_works_from_another_folder(relative_run, tmp_path, monkeypatch):
    home, _ = relative_run
    out = home / "run"
    saved = yaml.safe_load((out / RECIPE_FILE).read_text())
    assert saved["model"]["language_model"] == str((home / "parts" / "lm").resolve())
    info = json.loads((out / RUN_INFO_FILE).read_text())
    assert info["given_paths"] == {"model.vision_tower": "parts/clip", "model.language_model": "parts/lm"}

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    chat = ["chat", str(out), "--prompt", "What colour is the shape?", "--max-new-tokens", "3", "--device", "cpu"]
    result = CliRunner().invoke(app, chat)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["export", str(out), "--out", "exported", "--dtype", "fp32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (elsewhere / "exported" / "config.json").is_file()

    # the base language model moved: the error names the option, and the option makes it work
    moved = tmp_path / "moved-lm"
    shutil.move(home / "parts" / "lm", moved)
    try:
        result = CliRunner().invoke(app, chat)
        assert result.exit_code == 2
        assert "model.language_model" in result.output and "--base-model language_model=PATH" in result.output
        result = CliRunner().invoke(app, [*chat, "--base-model", f"language_model={moved}"])
        assert result.exit_code == 0, result.output
        result = CliRunner().invoke(
            app, ["export", str(out), "--out", "exported2", "--dtype", "fp32", "--device", "cpu", "--base-model",
                  f"language_model={moved}"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        result = CliRunner().invoke(app, [*chat, "--base-model", "lm=/x"])
        assert result.exit_code == 2 and "KEY=PATH" in result.output
    finally:
        shutil.move(moved, home / "parts" / "lm")
