"""The `lvit` command line: errors a user hits first, dry runs, overrides, the demo, the shipped recipes.

Most tests invoke the app in-process (`CliRunner`); a few run the real entry point (`python -m lvit`) in a
subprocess for the exit status and the "no traceback" behaviour a user sees.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from lvit.cli.app import LvitGroup, app
from lvit.errors import LvitError
from lvit.recipe.catalog import RECIPES_DIR

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"


def lvit(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real entry point in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "lvit", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        timeout=timeout,
    )


def test_help_is_lazy():
    # `lvit --help` must not import the heavy stack (torch, transformers, trl)
    heavy = "('torch', 'transformers', 'trl')"
    code = f"import sys; import lvit.cli.app; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    result = lvit("--help")
    assert result.returncode == 0 and "finetune" in result.stdout and "demo" in result.stdout


def test_unknown_key_is_a_clear_error_not_a_traceback(tiny_recipe, tmp_path):
    raw = tiny_recipe.raw("finetune", out_dir=tmp_path / "out")
    raw["training"]["learnin_rate"] = 1e-3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = lvit("finetune", str(path))
    assert result.returncode == 2
    assert "training.learnin_rate" in result.stderr and str(path) in result.stderr
    assert "training.learning_rate" in result.stderr  # the suggestion
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_data_path_is_reported_before_any_model_loads(tiny_recipe, tmp_path):
    # The model paths are bogus too: the data error must come first, so no model was loaded.
    path = tiny_recipe.write(
        tmp_path / "r.yaml",
        "finetune",
        out_dir=tmp_path / "out",
        data={"path": str(tmp_path / "nope.json")},
        model={"vision_tower": str(tmp_path / "no-clip")},
    )
    result = CliRunner().invoke(app, ["finetune", str(path)], catch_exceptions=False)
    assert result.exit_code == 2
    assert re.search(r"error: .*data\.path = .*nope\.json.*file not found", result.stderr)


def test_unreachable_model_id_names_the_recipe_key(tiny_recipe, tmp_path):
    path = tiny_recipe.write(
        tmp_path / "r.yaml",
        "finetune",
        out_dir=tmp_path / "out",
        model={"language_model": "someone/not-a-real-model-xyz"},
    )
    result = CliRunner().invoke(app, ["finetune", str(path)], catch_exceptions=False)
    assert result.exit_code == 2
    assert "model.language_model = 'someone/not-a-real-model-xyz'" in result.stderr
    assert "HF_HUB_OFFLINE" in result.stderr and "local folder" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "name",
    [
        "llava_stage1.yaml",
        "llava_stage2.yaml",
        "llava_stage2_qlora.yaml",
        "llava_stage2_lora.yaml",
        "llava15_stage1.yaml",
        "llava15_stage2.yaml",
        "llava15_stage2_lora.yaml",
        "llava15_stage2_mixture.yaml",
        "siglip2_qwen7b_qlora.yaml",
        "llava_next_stage1.yaml",
        "llava_next_stage2.yaml",
        "llava_next_stage2_qlora.yaml",
        "llava_next_qwen2_stage1.yaml",
        "llava_next_qwen2_stage2.yaml",
        "llava_next_qwen2_stage2_qlora.yaml",
    ],
)
def test_paper_recipes_dry_run_offline(name):
    result = CliRunner().invoke(app, ["finetune", str(RECIPES / name), "--dry-run"], catch_exceptions=False)
    assert result.exit_code == 1
    out = result.stdout
    assert "ok   structure" in out and "ok   training section builds an SFTConfig" in out
    assert "FAIL data" in out
    for key in ("model.vision_tower", "model.language_model"):
        assert f"FAIL {key}" in out and "not in the local Hugging Face cache" in out


def test_paper_recipe_dry_run_passes_with_local_parts(tiny_parts, shapes_data, tmp_path):
    vision, lm = tiny_parts
    result = CliRunner().invoke(
        app,
        [
            "finetune",
            str(RECIPES / "llava_stage2.yaml"),
            "--dry-run",
            f"model.vision_tower={vision}",
            f"model.language_model={lm}",
            f"model.projector_from={tmp_path}",
            f"data.path={shapes_data['instruct']}",
            f"data.image_folder={shapes_data['images']}",
            f"training.output_dir={tmp_path / 'out'}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "8 process(es): 4 per device x 1 accumulation x 8 = 32 global batch" in result.output
    assert "dry run passed" in result.output


@pytest.mark.parametrize("name", ["llava15_stage2.yaml", "llava15_stage2_lora.yaml"])
def test_llava15_recipe_dry_run_passes_with_local_parts(tiny_parts, shapes_data, tmp_path, name):
    """LLaVA-1.5's stage 2 on local parts: the mlp2x_gelu projector, 16 x 8 = 128 and modality grouping check out."""
    vision, lm = tiny_parts
    result = CliRunner().invoke(
        app,
        [
            "finetune",
            str(RECIPES / name),
            "--dry-run",
            f"model.vision_tower={vision}",
            f"model.language_model={lm}",
            f"model.projector_from={tmp_path}",
            f"data.path={shapes_data['instruct']}",
            f"data.image_folder={shapes_data['images']}",
            f"training.output_dir={tmp_path / 'out'}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "8 process(es): 16 per device x 1 accumulation x 8 = 128 global batch" in result.output
    assert "dry run passed" in result.output


def test_cli_overrides_reach_the_run(tiny_recipe, tmp_path):
    path = tiny_recipe.write(tmp_path / "r.yaml", "align", out_dir=tmp_path / "ignored")
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["finetune", str(path), f"training.output_dir={out}", "training.max_steps=1", "data.max_length=64"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0
    saved = yaml.safe_load((out / "lvit_recipe.yaml").read_text())
    assert saved["training"]["max_steps"] == 1 and saved["data"]["max_length"] == 64
    assert json.loads((out / "lvit_run.json").read_text())["metrics"]["train_loss"] > 0
    assert not (tmp_path / "ignored").exists()


def test_demo_never_overwrites_a_folder(tmp_path):
    # The demo's learning run itself is tests/test_learning.py (slow).
    out = tmp_path / "demo"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    result = CliRunner().invoke(app, ["demo", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 2 and "--overwrite" in result.stderr and "Traceback" not in result.stderr
    assert (out / "mine.txt").read_text() == "keep" and sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_dry_run_returns_the_checks_and_prints_nothing(capsys):
    from lvit.recipe.load import load_recipe
    from lvit.train.dry_run import Check, dry_run

    result = dry_run(load_recipe(RECIPES / "llava_stage1.yaml"))
    assert capsys.readouterr().out == ""
    assert not result.ok and result.checks[0] == Check(True, "structure: every key known and well typed")
    failed = [check.what for check in result.checks if not check.passed]
    assert failed == ["data", "model.vision_tower", "model.language_model"]
    assert any(
        "1 process(es): 16 per device x 8 accumulation" in item for item in result.items if isinstance(item, str)
    )


# --- one handler for every command --------------------------------------------------------------------------------


def test_one_handler_covers_nested_sub_apps():
    """LvitGroup, the top-level group, turns an LvitError from a command of a sub-app of a sub-app into exit 2."""
    top = typer.Typer(cls=LvitGroup)
    sub, subsub = typer.Typer(), typer.Typer()
    top.add_typer(sub, name="sub")
    sub.add_typer(subsub, name="deeper")

    @top.command()
    def ok() -> None:
        typer.echo("fine")

    @subsub.command()
    def boom() -> None:
        raise LvitError("what is wrong, where, how to fix it")

    result = CliRunner().invoke(top, ["sub", "deeper", "boom"], catch_exceptions=False)
    assert result.exit_code == 2 and result.stderr == "error: what is wrong, where, how to fix it\n"
    assert CliRunner().invoke(top, ["ok"]).stdout == "fine\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data", "check", "x.json", "-o", "a=1"], "'a=1' overrides a key of the recipe given with --recipe"),
        (["data", "check", "x.json", "a=1"], "'a=1' overrides a key of the recipe given with --recipe; there is none"),
        (["data", "convert", "x.json"], "pass OUT, the file to write"),
        (["recipes", "cp", "nope", "."], "no shipped recipe named 'nope'"),
        (["finetune", "no_such_recipe"], "recipe file not found: no_such_recipe"),
    ],
)
def test_user_errors_print_a_message_and_exit_2(args, message):
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {message}"), result.output
    assert result.stdout == ""


# --- the shipped recipes, the version ------------------------------------------------------------------------------


def test_version_is_the_package_metadata():
    result = CliRunner().invoke(app, ["--version"], catch_exceptions=False)
    assert result.exit_code == 0 and result.stdout == f"lvit {version('lvit')}\n"


@pytest.mark.parametrize(
    ("name", "batch"),
    [
        ("llava_next_stage1.yaml", "32 per device x 1 accumulation x 8 = 256"),
        ("llava_next_stage2.yaml", "4 per device x 4 accumulation x 8 = 128"),
        ("llava_next_stage2_qlora.yaml", "1 per device x 128 accumulation x 1 = 128"),
        ("llava_next_qwen2_stage2.yaml", "4 per device x 4 accumulation x 8 = 128"),
    ],
)
def test_llava_next_recipes_dry_run_with_local_parts(tiny_parts, shapes_data, tmp_path, name, batch):
    """LLaVA-NeXT's recipes on local parts: stage 1 as LLaVA-1.5's, stage 2 as AnyRes (the pinpoints in units of
    the tiny tower's 32 px), the tower at 2e-6 in the full recipes. The tiny LM has no chat template of its own:
    the Qwen2 recipe's `auto` is replaced by vicuna_v1 here (tests/test_families.py covers `auto`)."""
    vision, lm = tiny_parts
    overrides = [f"model.vision_tower={vision}", f"model.language_model={lm}"]
    if "stage2" in name:
        overrides += [f"model.projector_from={tmp_path}", "model.image_grid_pinpoints=null"]
        overrides += [f"data.path={shapes_data['instruct']}", f"data.image_folder={shapes_data['images']}"]
    else:
        overrides += [f"data.path={shapes_data['captions']}", f"data.image_folder={shapes_data['images']}"]
    if "qwen2" in name:
        overrides += ["data.template=vicuna_v1"]
    result = CliRunner().invoke(
        app, ["finetune", str(RECIPES / name), "--dry-run", *overrides, f"training.output_dir={tmp_path / 'out'}"]
    )
    assert result.exit_code == 0, result.output
    assert batch in result.output and "dry run passed" in result.output
    assert ("architecture llava_next (AnyRes)" in result.output) == ("stage2" in name)


def test_checkout_recipes_folder_is_the_shipped_one():
    assert RECIPES.resolve() == RECIPES_DIR and RECIPES.is_symlink()
    assert (RECIPES / "accelerate" / "fsdp_8gpu.yaml").is_file()


def test_recipes_ls_lists_every_shipped_file():
    result = CliRunner().invoke(app, ["recipes", "ls"], catch_exceptions=False)
    assert result.exit_code == 0
    listed = {line.split()[0]: line.split(None, 1)[1] for line in result.stdout.splitlines()}
    expected = {p.stem for p in RECIPES_DIR.glob("*.yaml")}
    expected |= {p.relative_to(RECIPES_DIR).as_posix() for p in RECIPES_DIR.glob("accelerate/*")}
    assert set(listed) == expected and "llava_stage2" in listed and "accelerate/fsdp_8gpu.yaml" in listed
    assert listed["llava_stage2"] == "LLaVA stage 2: fine-tuning end to end on instruction data."
    assert all(listed.values())  # each with a description


def test_recipes_cp_copies_and_never_overwrites(tmp_path):
    runner = CliRunner()
    source = (RECIPES_DIR / "llava_stage2_qlora.yaml").read_text()
    result = runner.invoke(app, ["recipes", "cp", "llava_stage2_qlora", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "llava_stage2_qlora.yaml").read_text() == source
    result = runner.invoke(app, ["recipes", "cp", "llava_stage2_qlora.yaml", str(tmp_path / "mine")])
    assert result.exit_code == 0 and (tmp_path / "mine.yaml").read_text() == source  # .yaml added
    result = runner.invoke(app, ["recipes", "cp", "accelerate/zero3.json", str(tmp_path / "ds.json")])
    assert result.exit_code == 0 and json.loads((tmp_path / "ds.json").read_text())["zero_optimization"]

    (tmp_path / "mine.yaml").write_text("keep")
    result = runner.invoke(app, ["recipes", "cp", "llava_stage2", str(tmp_path / "mine.yaml")])
    assert result.exit_code == 2 and "already exists" in result.stderr and "another DEST" in result.stderr
    assert (tmp_path / "mine.yaml").read_text() == "keep"
    result = runner.invoke(app, ["recipes", "cp", "llava_stage2", str(tmp_path / "no" / "x.yaml")])
    assert result.exit_code == 2 and "mkdir -p" in result.stderr and not (tmp_path / "no").exists()


def test_finetune_accepts_a_shipped_recipe_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ here: the name is the shipped recipe
    result = CliRunner().invoke(app, ["finetune", "llava_stage2_lora", "--dry-run"], catch_exceptions=False)
    assert result.exit_code == 1  # data and models are not here
    assert f"recipe {RECIPES_DIR / 'llava_stage2_lora.yaml'}: stage finetune" in result.stdout
    assert "ok   training section builds an SFTConfig" in result.stdout


def _dry_run(recipe_path, *overrides):
    return CliRunner().invoke(app, ["finetune", str(recipe_path), "--dry-run", *overrides], catch_exceptions=False)


def _fail_lines(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.strip().startswith("FAIL")]


def test_dry_run_fails_on_records_training_would_refuse(tiny_recipe, shapes_data, tmp_path):
    """data.on_bad_record: error (the default) stops a run at its record check: the dry run runs the same check."""
    records = json.loads(shapes_data["instruct"].read_text())[:3]
    (tmp_path / "page.png").write_text("<html>503 Service Unavailable</html>")
    records[1]["image"] = str(tmp_path / "page.png")
    records.append({"id": "gpt-first", "conversations": [{"from": "gpt", "value": "Hi."}]})
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    recipe = tiny_recipe.write(tmp_path / "r.yaml", data={"path": str(data)}, out_dir=tmp_path / "out")
    result = _dry_run(recipe)
    assert result.exit_code == 1, result.output
    assert _fail_lines(result.stdout) == ["FAIL records"]
    assert f"{data}: 2 of 4 records cannot be trained on" in result.stdout
    assert f"record #1 (id '{records[1]['id']}'): image {tmp_path / 'page.png'} is not an image file" in result.stdout
    assert "record #3 (id 'gpt-first'): the conversation must start with a human turn" in result.stdout
    assert "set data.on_bad_record: skip" in result.stdout and "dry run found problems" in result.stdout

    skip = _dry_run(recipe, "data.on_bad_record=skip")
    assert skip.exit_code == 0, skip.output
    assert "ok   records: 2 of 4 trainable (2 left out, listed in the run's skipped_records.jsonl)" in skip.stdout


def test_dry_run_fails_on_an_output_folder_holding_a_finished_run(tiny_recipe, tiny_runs, tmp_path):
    finished = tiny_runs["align"].out
    before = sorted(p.name for p in finished.iterdir())
    recipe = tiny_recipe.write(tmp_path / "r.yaml", out_dir=finished)
    result = _dry_run(recipe)
    assert result.exit_code == 1, result.output
    assert _fail_lines(result.stdout) == ["FAIL output folder"]
    assert f"{finished} holds a finished run" in result.stdout and "training.output_dir=..." in result.stdout
    assert sorted(p.name for p in finished.iterdir()) == before  # nothing renamed or written

    ok = _dry_run(recipe, f"training.output_dir={tmp_path / 'new'}")
    assert ok.exit_code == 0 and f"ok   output folder {tmp_path / 'new'}: a new run" in ok.stdout
    assert not (tmp_path / "new").exists()


def test_dry_run_fails_on_a_reporting_integration_that_is_not_installed(tiny_recipe, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    recipe = tiny_recipe.write(tmp_path / "r.yaml", out_dir=tmp_path / "out", training={"report_to": "wandb"})
    result = _dry_run(recipe)
    assert result.exit_code == 1, result.output
    assert _fail_lines(result.stdout) == ["FAIL training.report_to"]
    assert "training.report_to names 'wandb', but its package (wandb) is not installed: `pip install wandb`" in (
        result.stdout
    )
    for value, ok in (("none", True), ("all", True), ('["tensorboard"]', True), ("nonsense", False)):
        result = _dry_run(recipe, f"training.report_to={value}")
        assert (result.exit_code == 0) is ok, result.output
    assert "'nonsense', which transformers does not report to" in result.stdout


@pytest.mark.parametrize("user_value", [None, "ACTIVE"])
def test_the_cli_sets_a_passive_omp_wait_policy_unless_the_user_set_one(monkeypatch, user_value):
    # libgomp reads OMP_WAIT_POLICY when torch is imported, which no command does before the app callback
    if user_value is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", user_value)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    result = CliRunner().invoke(app, ["recipes", "ls"], catch_exceptions=False)
    assert result.exit_code == 0
    assert os.environ["OMP_WAIT_POLICY"] == (user_value or "PASSIVE")
    assert "OMP_NUM_THREADS" not in os.environ  # the thread count stays torch's choice
