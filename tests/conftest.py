"""Shared fixtures: tiny model parts, synthetic data and tiny recipes, built once per session.

Everything here is offline and CPU-only. The expensive pieces (the tiny CLIP + Llama checkpoints and
the synthetic shapes data) are session-scoped: build them once, never modify them in a test (copy
to `tmp_path` first if a test must change files).

Fixtures
--------
- `tiny_parts`            -> (vision_dir, lm_dir): tiny CLIP + tiny Llama, metaspace (Llama-like) tokenizer.
- `tiny_parts_bytelevel`  -> (vision_dir, lm_dir): the same with a byte-level (GPT-2-like) tokenizer.
- `shapes_data`           -> dict of paths from `lvit.demo.synthetic.write_shapes_data` (48 train / 8 test images):
                             keys "captions", "instruct", "test" (JSON files) and "images" (folder).
- `tiny_recipe`           -> a `TinyRecipes` factory: `tiny_recipe(stage="finetune", out_dir=None, **overrides)`
                             returns a validated `lvit.recipe.schema.Recipe` pointing at the fixtures above
                             (see `TinyRecipes` for the override rules, `.raw()` and `.write()`).
- `tiny_runs`             -> a `TinyRuns`: `tiny_runs["align" | "full" | "lora" | "qlora"]` is a finished 4-step run
                             (checkpoints at steps 2 and 4) with its live model and its weights before and after,
                             trained once per session on first use and shared by every test that reads runs.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

# No network in tests: fail fast instead of waiting on the Hub, and keep tokenizers quiet after fork.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite runs in two pytest-xdist workers (pyproject.toml's addopts): one thread each, for them and the processes
# they start, set before torch is imported. Two workers of two threads on 2 cores took 11:44, these 7:28.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_threads, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory) -> tuple[Path, Path]:
    """(vision_dir, lm_dir): a tiny CLIP and a tiny Llama whose tokenizer is metaspace (SentencePiece-like)."""
    from lvit.demo import synthetic
    from lvit.demo.tiny import build_tiny_parts

    return build_tiny_parts(tmp_path_factory.mktemp("parts-metaspace"), corpus=synthetic.corpus())


@pytest.fixture(scope="session")
def tiny_parts_bytelevel(tmp_path_factory) -> tuple[Path, Path]:
    """(vision_dir, lm_dir): like `tiny_parts`, with a byte-level BPE (GPT-2-like) tokenizer."""
    from lvit.demo import synthetic
    from lvit.demo.tiny import build_tiny_parts

    return build_tiny_parts(
        tmp_path_factory.mktemp("parts-bytelevel"), corpus=synthetic.corpus(), tokenizer_style="bytelevel"
    )


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> dict[str, Path]:
    """The synthetic shapes task, small: keys captions / instruct / test (LLaVA JSON) and images (folder).

    `instruct` holds 48 two-turn image records (`ins-<i>`) and 5 text-only records (`txt-<i>`);
    `captions` holds 48 stage-1 records (`cap-<i>`) whose placeholder is at the END of the human turn.
    """
    from lvit.demo.synthetic import write_shapes_data

    return write_shapes_data(tmp_path_factory.mktemp("shapes"), n_train=48, n_test=8)


_REMOVE = ...  # an override value of `...` (Ellipsis) removes the key


def _set_dotted(raw: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    if value is _REMOVE:
        node.pop(last, None)
    else:
        node[last] = value


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            _set_dotted(base, key, value)


class TinyRecipes:
    """Builds tiny recipes (like recipes/tiny_stage{1,2}.yaml) that point at the session fixtures.

    `tiny_recipe(stage="finetune", out_dir=None, **overrides) -> Recipe`

    - `stage="align"`: plain template on `captions.json`; `stage="finetune"`: vicuna_v1 on `instruct.json`
      (no `model.projector_from` unless you pass one).
    - `out_dir` becomes `training.output_dir`; default: a fresh empty temporary folder per call.
    - Training is tiny: `max_steps=2`, `per_device_train_batch_size=4`, `global_batch_size=8` (so
      accumulation 2 on one process, 1 on two), CPU, fp32, no saving of checkpoints, no reporting, no tqdm.
    - Overrides: a section name with a dict merges into that section (`training={"max_steps": 5}`,
      `model={"projector": "mlp2x_gelu"}`); `__` in a name stands for a dot (`data__max_length=64`);
      a value of `...` removes the key (`global_batch_size=...`, `training={"max_steps": ...}`).
    - `.raw(...)` returns the raw recipe mapping (same arguments) and `.write(path, ...)` writes it as YAML
      (for CLI tests); `.recipe_from_raw(raw)` validates a mapping you edited yourself.
    """

    def __init__(self, parts: tuple[Path, Path], data: dict[str, Path], tmp_path_factory):
        self.vision_dir, self.lm_dir = parts
        self.data = data
        self._tmp = tmp_path_factory

    def raw(self, stage: str = "finetune", out_dir: str | Path | None = None, **overrides) -> dict:
        if out_dir is None:
            out_dir = self._tmp.mktemp(f"run-{stage}") / "out"
        align = stage == "align"
        raw = {
            "stage": stage,
            "model": {
                "vision_tower": str(self.vision_dir),
                "language_model": str(self.lm_dir),
                "projector": "linear",
                "vision_feature_layer": -2,
            },
            "data": {
                "path": str(self.data["captions" if align else "instruct"]),
                "image_folder": str(self.data["images"]),
                "template": "plain" if align else "vicuna_v1",
                "max_length": 128 if align else 256,
            },
            "global_batch_size": 8,
            "training": {
                "output_dir": str(out_dir),
                "per_device_train_batch_size": 4,
                "learning_rate": 3.0e-3,
                "max_steps": 2,
                "lr_scheduler_type": "cosine",
                "weight_decay": 0.0,
                "logging_steps": 1,
                "save_strategy": "no",
                "bf16": False,
                "use_cpu": True,
                "activation_checkpointing": False,
                "report_to": "none",
                "disable_tqdm": True,
                "dataloader_num_workers": 0,
                "seed": 0,
            },
        }
        _merge(raw, {k.replace("__", "."): v for k, v in overrides.items()})
        return raw

    def recipe_from_raw(self, raw: dict, source: str = "<tiny recipe>"):
        from lvit.recipe.load import recipe_from_dict

        return recipe_from_dict(copy.deepcopy(raw), source)

    def __call__(self, stage: str = "finetune", out_dir: str | Path | None = None, **overrides):
        return self.recipe_from_raw(self.raw(stage, out_dir, **overrides), source=f"<tiny {stage} recipe>")

    def write(self, path: str | Path, stage: str = "finetune", out_dir: str | Path | None = None, **overrides) -> Path:
        path = Path(path)
        path.write_text(yaml.safe_dump(self.raw(stage, out_dir, **overrides), sort_keys=False))
        return path


@pytest.fixture(scope="session")
def tiny_recipe(tiny_parts, shapes_data, tmp_path_factory) -> TinyRecipes:
    """Factory of tiny recipes on `tiny_parts` + `shapes_data`; see `TinyRecipes`."""
    return TinyRecipes(tiny_parts, shapes_data, tmp_path_factory)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA; on a machine without it they are skipped, with the reason."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- trained tiny runs, shared by the whole session --------------------------------------------------------------


def quant_snapshot(model) -> dict[str, dict]:
    """Of every 4-bit layer: its packed uint8 data and every quant-state tensor (absmax is itself 8-bit with double
    quantization). Empty for a model without 4-bit layers."""
    import torch

    from lvit.model.quant import linear4bit_modules

    snap = {}
    for name, m in linear4bit_modules(model):
        qs = m.weight.quant_state
        snap[name] = {
            "data": m.weight.data.clone(),
            "absmax": qs.absmax.clone(),
            "nested_absmax": qs.state2.absmax.clone(),
            "offset": torch.as_tensor(qs.offset).clone(),
            "code": qs.code.clone(),
        }
    return snap


@dataclass
class TrainedRun:
    """A finished tiny run and its live model, with the model's state before the first and after the last step."""

    out: Path
    recipe: object
    model: object  # the live model after the last optimizer step (a PeftModel for lora / qlora)
    processor: object
    before: dict  # state dict once the trainer was set up (adapters added), before step 1
    after: dict
    quant_before: dict  # `quant_snapshot`s (qlora)
    quant_after: dict


class TinyRuns:
    """One finished run of each kind, trained on first use and shared by every test of the session.

    `tiny_runs["align" | "full" | "lora" | "qlora"] -> TrainedRun`. Each trains 4 optimizer steps and saves
    checkpoints at steps 2 and 4 (`SAVE_STEPS`); lora / qlora use r 8, alpha 16 on the LM's linears and the
    default dropout (so a resume must restore the RNG too). Tests read the run folders; a test that needs
    to change one copies it first. `recipe(kind, out_dir)` is the same recipe pointed at another folder
    (to resume a copy of a checkpoint, say).
    """

    MAX_STEPS, SAVE_STEPS = 4, 2
    LORA = {"r": 8, "alpha": 16}

    def __init__(self, tiny_recipe: TinyRecipes, tmp_path_factory):
        self._recipes, self._tmp, self._runs = tiny_recipe, tmp_path_factory, {}

    def recipe(self, kind: str, out_dir: Path):
        stage = "align" if kind == "align" else "finetune"
        training = {"optim": "adamw_torch", "max_steps": self.MAX_STEPS, "save_strategy": "steps"}
        training["save_steps"] = self.SAVE_STEPS
        extra = {"method": kind, "lora": self.LORA} if kind in ("lora", "qlora") else {}
        return self._recipes(stage, out_dir=out_dir, training=training, **extra)

    def __getitem__(self, kind: str) -> TrainedRun:
        if kind not in self._runs:
            self._runs[kind] = self._train(kind)
        return self._runs[kind]

    def _train(self, kind: str) -> TrainedRun:
        from lvit.train.run import TrainingRun

        out_dir = self._tmp.mktemp(f"run-{kind}") / "run"
        recipe = self.recipe(kind, out_dir)
        training = TrainingRun(recipe).setup()
        model = training.trainer.model
        before, quant_before = _state(model), quant_snapshot(model)
        training.train()
        after, quant_after = _state(model), quant_snapshot(model)
        out = training.save()
        return TrainedRun(out, recipe, model, training.processor, before, after, quant_before, quant_after)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def tiny_runs(tiny_recipe, tmp_path_factory) -> TinyRuns:
    """Finished align / full / lora / qlora runs, each trained once per session; see `TinyRuns`."""
    return TinyRuns(tiny_recipe, tmp_path_factory)


def save_llava_dataset(rows: list[dict], path: Path) -> Path:
    """Save LLaVA-format rows (`id`, `image` as PIL images / `{"bytes", "path"}` / None, `conversations`) as a
    Hugging Face dataset folder (`save_to_disk`), the image column a `datasets.Image` feature (embedded images)."""
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
        }
    )
    datasets.Dataset.from_list(rows, features=features).save_to_disk(path)
    return path


def trained_runs(labels: list[int]) -> list[list[int]]:
    """The trained labels (not -100) grouped into maximal runs of consecutive positions."""
    runs: list[list[int]] = []
    prev = None
    for i, label in enumerate(labels):
        if label == -100:
            continue
        if prev is not None and i == prev + 1:
            runs[-1].append(label)
        else:
            runs.append([label])
        prev = i
    return runs


def assert_resumed_steps_match(recipe, tmp_path: Path) -> None:
    """Train `recipe(out)` 4 steps in one go, and 2 steps then resumed from checkpoint-2: steps 3-4 must see
    the same batches (the same trained-token counts) and reach the same losses. `recipe(out)` must save
    every 2 steps and stop at 4."""
    import json
    import shutil

    from lvit.train.run import run

    straight = run(recipe(tmp_path / "straight"))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = run(recipe(resumed_dir))

    def steps(folder):
        state = json.loads((folder / "checkpoint-4" / "trainer_state.json").read_text())
        return {e["step"]: e for e in state["log_history"] if "loss" in e}

    a, b = steps(straight), steps(resumed)
    # TRL's num_tokens counts from the process start: compare what each step added
    assert [a[s]["num_tokens"] - a[s - 1]["num_tokens"] for s in (3, 4)] == [
        b[3]["num_tokens"],
        b[4]["num_tokens"] - b[3]["num_tokens"],
    ]
    assert [b[s]["loss"] for s in (3, 4)] == pytest.approx([a[s]["loss"] for s in (3, 4)], rel=1e-5)


def read_checked(path, image_folder=None):
    """`read_records` with every record's image checked too (`lvit.data.check.check_record_images`), as `lvit data
    check` reads a file: `(records, problems, total)`, the problems in record order."""
    from lvit.data.check import check_record_images
    from lvit.data.reader import read_all

    read = read_all(path)
    records, image_problems = check_record_images(read, image_folder)
    problems = sorted([*read.problems, *image_problems], key=lambda p: -1 if p.index is None else p.index)
    return records, problems, read.total


def kill_after_checkpoint(command: list[str], checkpoint: Path, timeout: float = 600) -> None:
    """Start `command` (an `lvit finetune`), wait until `checkpoint` is complete (its `lvit_run.json`, written last)
    and kill -9 the process."""
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (checkpoint / "lvit_run.json").is_file():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
