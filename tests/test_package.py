"""lvit as a user installs it: a built wheel in a fresh virtual environment, run outside the checkout.

Offline: the wheel is built with `pip wheel --no-deps --no-build-isolation --no-index` (setuptools from
this environment), the venv is created without pip and the wheel installed into it with this
environment's pip (`pip --python`), `--no-deps`. The dependencies (torch, transformers, ...) are not
installed again: a `.pth` file in the new venv appends this environment's site-packages to its path.
A plain path line in a `.pth` file adds the folder but does not run the `.pth` files inside it, so an
editable install of lvit here is not picked up: `lvit` must come from the wheel (asserted).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from lvit.recipe.catalog import RECIPES_DIR

pytestmark = pytest.mark.slow  # about half a minute: a wheel build, a venv, a quick demo

REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (no build/ or egg-info lands in, or comes from, the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "lvit", src / "lvit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", src, "-w", dist], tmp
    )
    (built,) = dist.glob("lvit-*.whl")
    return built


def test_wheel_ships_the_recipes_as_files(wheel):
    with zipfile.ZipFile(wheel) as whl:
        entries = {info.filename: info for info in whl.infolist() if info.filename.startswith("lvit/recipes/")}
        shipped = {
            f"lvit/recipes/{p.relative_to(RECIPES_DIR).as_posix()}" for p in RECIPES_DIR.rglob("*") if p.is_file()
        }
        assert set(entries) == shipped and "lvit/recipes/accelerate/zero3.json" in shipped
        for name, info in entries.items():
            assert (info.external_attr >> 16) & 0o170000 != 0o120000, f"{name} is a symlink in the wheel"
            assert whl.read(name) == (RECIPES_DIR / name.removeprefix("lvit/recipes/")).read_bytes()


def test_wheel_ships_the_prompt_files(wheel):
    """`lvit data generate`'s prompts and the judge's / arbiter's prompts are package data, read at run time."""
    lvit_dir = REPO / "lvit"
    shipped = {f"lvit/{p.relative_to(lvit_dir).as_posix()}" for p in lvit_dir.glob("*/prompts/*.yaml")}
    assert {"lvit/data/prompts/conversation.yaml", "lvit/eval/prompts/llava_bench_judge.yaml"} <= shipped
    with zipfile.ZipFile(wheel) as whl:
        for name in shipped:
            assert whl.read(name) == (REPO / name).read_bytes()


def test_installed_wheel_runs_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    site = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip()
    )
    here = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_lvit_test_dependencies.pth").write_text("".join(f"{path}\n" for path in here))
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], tmp_path)

    work = tmp_path / "elsewhere"  # cwd: no checkout, no recipes/ folder
    work.mkdir()
    where = _run([python, "-c", "import lvit; print(lvit.__file__)"], work).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # from the wheel, not the checkout or an editable install

    version = wheel.name.split("-")[1]
    assert _run([bindir / "lvit", "--version"], work).stdout == f"lvit {version}\n"

    listed = [line.split()[0] for line in _run([bindir / "lvit", "recipes", "ls"], work).stdout.splitlines()]
    assert "llava_stage2" in listed and "tiny_stage1" in listed and "accelerate/fsdp_8gpu.yaml" in listed
    _run([bindir / "lvit", "recipes", "cp", "llava_stage2_qlora", "."], work)
    assert (work / "llava_stage2_qlora.yaml").read_bytes() == (RECIPES_DIR / "llava_stage2_qlora.yaml").read_bytes()

    demo = _run([bindir / "lvit", "demo", "--quick", "--out", "demo"], work, timeout=600)
    assert "held-out accuracy (all)" in demo.stdout and "wall time" in demo.stdout, demo.stdout
    assert "[4/4] held-out accuracy" in demo.stderr  # progress through logging
    assert (work / "demo" / "demo_results.json").is_file() and (work / "demo" / "stage2" / "lvit_run.json").is_file()
