"""Kills, preemption and resume, through the real CLI in a subprocess, as a user would meet them. The uninterrupted
reference run each result is compared with trains in this process (`lvit.train.run.run`, what `lvit finetune`
calls), which spares a process start-up per test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lvit.errors import LvitError
from lvit.runs.files import LOG_FILE, PLOT_FILE, RUN_INFO_FILE
from lvit.runs.resume import incomplete_reason, resume_checkpoint, set_aside_incomplete
from lvit.train.history import read_log

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = {"full": "model.safetensors", "qlora": "adapter_model.safetensors"}


def _command(recipe: Path) -> list[str]:
    return [sys.executable, "-m", "lvit", "finetune", str(recipe)]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _write(tiny_recipe, tmp: Path, method: str, out: Path, max_steps: int, save_steps: int) -> Path:
    extra = {"method": method}
    if method == "qlora":
        extra["lora"] = {"r": 8, "alpha": 16}
    return tiny_recipe.write(
        tmp / f"{method}-{out.name}.yaml",
        "finetune",
        out_dir=out,
        global_batch_size=4,
        training={
            "max_steps": max_steps,
            "save_strategy": "steps",
            "save_steps": save_steps,
            "save_total_limit": 2,
            "optim": "adamw_torch",
            "learning_rate": 1.0e-3,
        },
        **extra,
    )


def _reference(recipe: Path) -> None:
    """The same recipe trained straight through, in this process."""
    from lvit.recipe.load import load_recipe
    from lvit.train.run import run

    run(load_recipe(recipe))


def _run(recipe: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(_command(recipe), capture_output=True, text=True, cwd=REPO, env=_env(), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _assert_same_weights(a: Path, b: Path, name: str) -> None:
    wa, wb = load_file(str(a / name)), load_file(str(b / name))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_sigkill_then_same_command_resumes_to_the_same_weights(tiny_recipe, tmp_path, method):
    reference = tmp_path / "reference"
    _reference(_write(tiny_recipe, tmp_path, method, reference, max_steps=16, save_steps=4))

    out = tmp_path / "killed"
    recipe = _write(tiny_recipe, tmp_path, method, out, max_steps=16, save_steps=4)
    proc = subprocess.Popen(
        _command(recipe), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 600
    while not (out / "checkpoint-4" / "lvit_run.json").is_file():  # written last, after the checkpoint
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / WEIGHTS[method]).exists()  # it really did not finish
    newest = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    # A checkpoint cut off mid-write at a later step: it must be skipped, not resumed from.
    cut = out / f"checkpoint-{newest + 1}"
    shutil.copytree(out / f"checkpoint-{newest}", cut)
    (cut / "trainer_state.json").unlink()

    again = _run(recipe)  # the same command
    assert f"checkpoint-{newest + 1} is incomplete" in again.stderr
    assert f"resuming from {out / f'checkpoint-{newest}'}" in again.stderr
    assert (out / f"incomplete-checkpoint-{newest + 1}").is_dir()  # set aside, not deleted
    _assert_same_weights(reference, out, WEIGHTS[method])


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tiny_recipe, tmp_path):
    reference = tmp_path / "reference"
    _reference(_write(tiny_recipe, tmp_path, "full", reference, max_steps=16, save_steps=1000))

    out = tmp_path / "preempted"
    recipe = _write(tiny_recipe, tmp_path, "full", out, max_steps=16, save_steps=1000)
    proc = subprocess.Popen(
        _command(recipe), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:  # lvit logs every step (logging_steps 1): stop after the first
        lines.append(line)
        if "step 1/16  loss " in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    output = "".join(lines) + rest
    assert proc.returncode == 143, output[-3000:]  # 128 + SIGTERM: its own status, not an error's 2
    assert "error:" not in output
    saved = list(out.glob("checkpoint-*"))
    assert len(saved) == 1 and incomplete_reason(saved[0]) is None
    step = int(saved[0].name.split("-")[1])
    assert 1 <= step < 16
    assert "SIGTERM received" in output
    assert (
        f"stopped by SIGTERM at step {step}; checkpoint saved in {saved[0]}; run the same command to resume" in output
    )
    assert not (out / "model.safetensors").exists()
    assert [e["step"] for e in read_log(out / LOG_FILE)] == list(range(1, step + 1))

    again = _run(recipe)
    _assert_same_weights(reference, out, "model.safetensors")
    # the log of the resumed run covers the whole run, once per step, and the plot is drawn from it
    entries = read_log(out / LOG_FILE)
    assert [e["step"] for e in entries] == list(range(1, 17))
    assert [e["loss"] for e in entries] == pytest.approx([e["loss"] for e in read_log(reference / LOG_FILE)], rel=1e-5)
    assert (out / PLOT_FILE).is_file()
    assert f"(the whole run; resumed at step {step})" in again.stderr
    # the headline loss is the whole run's, as the straight run's; each segment is on record
    info, straight = (json.loads((folder / RUN_INFO_FILE).read_text()) for folder in (out, reference))
    assert info["metrics"]["train_loss"] == pytest.approx(straight["metrics"]["train_loss"], rel=1e-4)
    assert [(s["from_step"], s["to_step"]) for s in info["segments"]] == [(0, step), (step, 16)]
    assert info["metrics"]["train_runtime"] == pytest.approx(sum(s["runtime_s"] for s in info["segments"]), abs=0.01)


def test_output_folder_rules(tmp_path):
    out = tmp_path / "run"
    assert resume_checkpoint(out, None, "r.yaml") is None  # new folder
    with pytest.raises(LvitError, match="no checkpoint to resume from"):
        resume_checkpoint(out, True, "r.yaml")
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LvitError, match="never overwrites"):
        resume_checkpoint(out, None, "r.yaml")
    good = out / "checkpoint-3"
    good.mkdir()
    (good / "trainer_state.json").write_text('{"global_step": 3}')
    (good / "model.safetensors").write_bytes(b"x")
    bad = out / "checkpoint-5"
    bad.mkdir()
    (bad / "trainer_state.json").write_text('{"global_st')
    set_aside_incomplete(out)
    assert not bad.exists() and (out / "incomplete-checkpoint-5").is_dir()
    assert resume_checkpoint(out, None, "r.yaml") == good
    with pytest.raises(LvitError, match="Pass --resume"):
        resume_checkpoint(out, False, "r.yaml")
    (out / "lvit_run.json").write_text("{}")
    with pytest.raises(LvitError, match="finished run"):
        resume_checkpoint(out, None, "r.yaml")
    assert (out / "notes.txt").read_text() == "mine"


def test_a_run_stopped_while_saving_its_first_checkpoint_starts_afresh(tmp_path):
    """A second Ctrl-C (or a kill) while the first checkpoint is being written leaves lvit's log and a checkpoint
    cut off: the same command sets it aside (kept, not deleted) and starts afresh, never "not empty"."""
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "model.safetensors").write_bytes(b"half")
    (out / "lvit_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    set_aside_incomplete(out)
    assert resume_checkpoint(out, None, "r.yaml") is None
    assert (out / "incomplete-checkpoint-2" / "model.safetensors").read_bytes() == b"half"
    with pytest.raises(LvitError, match="no checkpoint to resume from"):
        resume_checkpoint(out, True, "r.yaml")
