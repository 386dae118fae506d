"""Fault injection through the CLI: a run off the happy path keeps its work. Each test plays one failure, then
checks the exit status, the one message a user sees, and the files before and after: nothing lost, nothing
overwritten, and the same command (with the fix the message names) carries on from where the run stopped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lvit.cli.app import app
from lvit.errors import BAD_RECORD_STATUS
from lvit.runs.files import LOG_FILE, RECIPE_FILE, RUN_INFO_FILE, SKIPPED_FILE, TRAINER_STATE_FILE
from lvit.train.history import read_log

pytestmark = pytest.mark.slow  # whole runs through the CLI, about 15 s


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _data_with_a_cut_image(tmp: Path, shapes_data, n_good: int, at: int) -> Path:
    """`n_good` image records of the shapes data and, at position `at`, one whose file is cut off after an intact
    header: the default header check passes it, only a decode (the collator's, mid-run) finds it."""
    images = tmp / "images"
    images.mkdir()
    good = [r for r in json.loads(shapes_data["instruct"].read_text()) if "image" in r][:n_good]
    for r in good:
        shutil.copy(shapes_data["images"] / r["image"], images / r["image"])
    (images / "cut.png").write_bytes((images / good[0]["image"]).read_bytes()[:60])
    data = good[:at] + [{**good[0], "id": "cut", "image": "cut.png"}] + good[at:]
    path = tmp / "data.json"
    path.write_text(json.dumps(data))
    return path


def _cut_image_recipe(tmp: Path, tiny_recipe, data: Path, name: str, batch: int) -> Path:
    """A recipe over `data` that reads it in order, one epoch, one sample per process a step, `batch` a step."""
    return tiny_recipe.write(
        tmp / name,
        out_dir=tmp / "run",
        data={"path": str(data), "image_folder": str(tmp / "images")},  # on_bad_record: error (the default)
        global_batch_size=batch,
        training={
            "per_device_train_batch_size": 1,
            "max_steps": ...,
            "num_train_epochs": 1,
            "train_sampling_strategy": "sequential",
        },
    )


def test_an_unreadable_image_mid_run_saves_the_steps_done_and_the_same_command_resumes(
    tmp_path, tiny_recipe, shapes_data
):
    data = _data_with_a_cut_image(tmp_path, shapes_data, n_good=5, at=3)  # the fourth sample
    out = tmp_path / "run"
    recipe = _cut_image_recipe(tmp_path, tiny_recipe, data, "recipe.yaml", batch=1)
    inputs = _files(tmp_path / "images") | {"data.json": data.read_bytes(), "recipe.yaml": recipe.read_bytes()}

    dry = CliRunner().invoke(app, ["finetune", str(recipe), "--dry-run"])
    assert dry.exit_code == 0, dry.output  # the header check passes a file cut off after its header, and says so
    assert "`lvit data check --decode` finds such files now" in " ".join(dry.output.split())

    stopped = CliRunner().invoke(app, ["finetune", str(recipe)])
    assert stopped.exit_code == BAD_RECORD_STATUS, stopped.output
    message = " ".join(stopped.output.split())
    # the data loader reads one batch ahead, so the steps before the bad record's, or all but the last of them
    (checkpoint,) = out.glob("checkpoint-*")
    step = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())["global_step"]
    assert step in (2, 3) and checkpoint.name == f"checkpoint-{step}" and (checkpoint / RECIPE_FILE).is_file()
    assert f"stopped at step {step}: record 'cut': cannot read image 'cut.png'" in message
    assert "data.on_bad_record=skip" in message and "lvit data check --decode" in message
    assert str(checkpoint) in message and "Traceback" not in stopped.output
    assert not (out / RUN_INFO_FILE).exists()  # not finished, and not claimed to be
    assert _files(tmp_path / "images") | {"data.json": data.read_bytes(), "recipe.yaml": recipe.read_bytes()} == (
        inputs
    )

    resumed = CliRunner().invoke(app, ["finetune", str(recipe), "data.on_bad_record=skip"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.output and checkpoint.name in resumed.output
    assert (out / RUN_INFO_FILE).is_file()
    assert [e["step"] for e in read_log(out / LOG_FILE)] == [1, 2, 3, 4, 5, 6]  # every record a step, none twice
    assert [json.loads(line)["id"] for line in (out / SKIPPED_FILE).read_text().splitlines()] == ["cut"]


def test_an_unreadable_image_before_the_first_step_says_what_to_do(tmp_path, tiny_recipe, shapes_data):
    data = _data_with_a_cut_image(tmp_path, shapes_data, n_good=3, at=0)
    out = tmp_path / "run"
    recipe = tiny_recipe.write(
        tmp_path / "recipe.yaml",
        out_dir=out,
        data={"path": str(data), "image_folder": str(tmp_path / "images")},
        global_batch_size=1,
        training={"per_device_train_batch_size": 1, "max_steps": 2, "train_sampling_strategy": "sequential"},
    )
    result = CliRunner().invoke(app, ["finetune", str(recipe)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "record 'cut': cannot read image 'cut.png'" in message and "nothing trained yet" in message
    assert "data.on_bad_record=skip" in message and "Traceback" not in result.output
    assert not list(out.glob("checkpoint-*"))


def test_a_second_ctrl_c_while_the_first_checkpoint_saves_leaves_a_folder_the_same_command_resumes(
    tmp_path, tiny_recipe, monkeypatch
):
    """The stop message invites a second Ctrl-C; pressed while the first checkpoint is being written, it cuts the
    save off. The same command then sets that checkpoint aside (kept) and trains afresh; no card of TRL's or
    anything else makes the folder look like someone else's."""
    from transformers import Trainer

    out = tmp_path / "run"
    recipe = tiny_recipe.write(
        tmp_path / "recipe.yaml", out_dir=out, training={"save_strategy": "steps", "save_steps": 1, "max_steps": 2}
    )
    real = Trainer._save_optimizer_and_scheduler

    def cut_off(self, output_dir):  # the weights are written, then the second Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", cut_off)
    interrupted = CliRunner().invoke(app, ["finetune", str(recipe)])
    assert interrupted.exit_code == 130, interrupted.output
    left = sorted(p.name for p in out.iterdir())
    assert left == ["checkpoint-1", LOG_FILE], left  # lvit's log and the cut-off checkpoint, nothing else
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", real)

    again = CliRunner().invoke(app, ["finetune", str(recipe)])
    assert again.exit_code == 0, again.output
    assert "checkpoint-1 is incomplete" in " ".join(again.output.split())
    assert (out / "incomplete-checkpoint-1").is_dir() and (out / RUN_INFO_FILE).is_file()
    assert [e["step"] for e in read_log(out / LOG_FILE)] == [1, 2]


def test_a_resume_with_changed_settings_is_refused_before_the_model_loads_and_recorded_when_allowed(
    tmp_path, tiny_recipe
):
    """A resume continues the checkpoint's optimizer, schedule and data order: another learning rate or batch size
    is refused (dry run and run alike) with the list of changes; a logging change passes; `--allow-changed` lets a
    change through, and the run folder records which segment ran with what."""
    out = tmp_path / "run"
    recipe = tiny_recipe.write(
        tmp_path / "recipe.yaml",
        out_dir=out,
        training={"save_strategy": "steps", "save_steps": 1, "max_steps": 1},
    )
    assert CliRunner().invoke(app, ["finetune", str(recipe)]).exit_code == 0
    (out / RUN_INFO_FILE).unlink()  # as if stopped after step 1: checkpoint-1 is where it resumes
    (out / "model.safetensors").unlink()
    for name in [p.name for p in out.iterdir() if p.is_file() and p.name not in (LOG_FILE,)]:
        (out / name).unlink()
    before = _files(out)
    more = ["training.max_steps=2"]
    for argv in (["--dry-run"], []):
        result = CliRunner().invoke(app, ["finetune", str(recipe), *more, "training.learning_rate=1e-4", *argv])
        message = " ".join(result.output.split())
        assert result.exit_code == (1 if argv else 2), result.output
        assert "training.learning_rate: 0.003 -> 0.0001" in message and "training.max_steps: 1 -> 2" in message
        assert "--allow-changed" in message and "Traceback" not in result.output
        assert _files(out) == before  # nothing written, nothing loaded

    allowed = ["--allow-changed", "training.max_steps", "training.logging_steps=2"]
    result = CliRunner().invoke(app, ["finetune", str(recipe), *more, *allowed])
    assert result.exit_code == 0, result.output
    info = json.loads((out / RUN_INFO_FILE).read_text())
    assert [(s["from_step"], s["to_step"]) for s in info["segments"]] == [(0, 1), (1, 2)]
    assert (info["steps"], info["records_trained"]) == (2, 53) and isinstance(info["final_loss"], float)
    assert info["started"] < info["ended"]
    said = f"lvit finetune {recipe} training.max_steps=2 training.logging_steps=2 --allow-changed=training.max_steps"
    assert info["command"] == said
    assert {"lvit", "torch", "transformers", "trl", "peft", "accelerate"} <= info["versions"].keys()
    assert info["segments"][1]["changed"] == {"training.logging_steps": [1, 2], "training.max_steps": [1, 2]}


def test_an_unreadable_image_mid_run_on_two_processes_stops_every_rank_with_the_steps_saved(
    tmp_path, tiny_recipe, shapes_data
):
    """The rank whose batch holds the record says so at the step's start; every rank stops there and the steps done
    are saved, instead of the other rank waiting in an all-reduce forever. The same command with skip finishes, as
    a run under skip does on two processes (this replaces test_run_story's two-process skip test)."""
    import os
    import subprocess
    import sys

    data = _data_with_a_cut_image(tmp_path, shapes_data, n_good=7, at=5)  # 8 records: 4 steps of 2 (1 per rank)
    out = tmp_path / "run"
    recipe = _cut_image_recipe(tmp_path, tiny_recipe, data, "ddp.yaml", batch=2)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lvit"]

    def finetune(*more):  # a rank left waiting would hang: the timeout catches that
        return subprocess.run(
            [*command, "finetune", str(recipe), *more], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip

    stopped = finetune()
    assert stopped.returncode != 0
    (checkpoint,) = out.glob("checkpoint-*")
    step = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())["global_step"]
    assert 1 <= step <= 2 and (checkpoint / RECIPE_FILE).is_file(), stopped.stderr[-3000:]
    assert stopped.stderr.count(f"stopped at step {step}: record 'cut'") == 2  # both ranks, the same step
    # the rest under skip on two processes: the record is listed, its place trains nothing, both ranks take every step
    resumed = finetune("data.on_bad_record=skip")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [json.loads(line)["id"] for line in (out / SKIPPED_FILE).read_text().splitlines()] == ["cut"]
    assert [e["step"] for e in read_log(out / LOG_FILE)] == [1, 2, 3, 4]
    weights = load_file(str(out / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
