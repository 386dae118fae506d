"""The `lvit` command line: errors a user hits first, dry runs, overrides, the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lvit.cli import app
from lvit.errors import LvitError

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
    code = "import sys; import lvit.cli; print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))"
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
    with pytest.raises(LvitError, match=r"data\.path = .*nope\.json.*file not found"):
        CliRunner().invoke(app, ["finetune", str(path)], catch_exceptions=False)


def test_unreachable_model_id_names_the_recipe_key(tiny_recipe, tmp_path):
    path = tiny_recipe.write(
        tmp_path / "r.yaml",
        "finetune",
        out_dir=tmp_path / "out",
        model={"language_model": "someone/not-a-real-model-xyz"},
    )
    result = lvit("finetune", str(path))
    assert result.returncode == 2
    assert "model.language_model = 'someone/not-a-real-model-xyz'" in result.stderr
    assert "HF_HUB_OFFLINE" in result.stderr and "local folder" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "name", ["llava_stage1.yaml", "llava_stage2.yaml", "llava_stage2_qlora.yaml", "llava_stage2_lora.yaml"]
)
def test_paper_recipes_dry_run_offline(name):
    result = lvit("finetune", str(RECIPES / name), "--dry-run")
    assert result.returncode == 1
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
    result = lvit("demo", "--out", str(out))
    assert result.returncode == 2 and "--overwrite" in result.stderr and "Traceback" not in result.stderr
    assert (out / "mine.txt").read_text() == "keep" and sorted(p.name for p in out.iterdir()) == ["mine.txt"]
