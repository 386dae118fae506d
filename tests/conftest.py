"""Shared fixtures: tiny model parts, synthetic data and tiny recipes, built once per session.

Everything here is offline and CPU-only. The expensive pieces (the tiny CLIP + Llama checkpoints and
the synthetic shapes data) are session-scoped: build them once, never modify them in a test (copy
to `tmp_path` first if a test must change files).

Fixtures
--------
- `tiny_parts`            -> (vision_dir, lm_dir): tiny CLIP + tiny Llama, metaspace (Llama-like) tokenizer.
- `tiny_parts_bytelevel`  -> (vision_dir, lm_dir): the same with a byte-level (GPT-2-like) tokenizer.
- `shapes_data`           -> dict of paths from `lvit.synthetic.write_shapes_data` (48 train / 8 test images):
                             keys "captions", "instruct", "test" (JSON files) and "images" (folder).
- `tiny_recipe`           -> a `TinyRecipes` factory: `tiny_recipe(stage="finetune", out_dir=None, **overrides)`
                             returns a validated `lvit.recipe.Recipe` pointing at the fixtures above
                             (see `TinyRecipes` for the override rules, `.raw()` and `.write()`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

# No network in tests: fail fast instead of waiting on the Hub, and keep tokenizers quiet after fork.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory) -> tuple[Path, Path]:
    """(vision_dir, lm_dir): a tiny CLIP and a tiny Llama whose tokenizer is metaspace (SentencePiece-like)."""
    from lvit import synthetic
    from lvit.tiny import build_tiny_parts

    return build_tiny_parts(tmp_path_factory.mktemp("parts-metaspace"), corpus=synthetic.corpus())


@pytest.fixture(scope="session")
def tiny_parts_bytelevel(tmp_path_factory) -> tuple[Path, Path]:
    """(vision_dir, lm_dir): like `tiny_parts`, with a byte-level BPE (GPT-2-like) tokenizer."""
    from lvit import synthetic
    from lvit.tiny import build_tiny_parts

    return build_tiny_parts(
        tmp_path_factory.mktemp("parts-bytelevel"), corpus=synthetic.corpus(), tokenizer_style="bytelevel"
    )


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> dict[str, Path]:
    """The synthetic shapes task, small: keys captions / instruct / test (LLaVA JSON) and images (folder).

    `instruct` holds 48 two-turn image records (`ins-<i>`) and 5 text-only records (`txt-<i>`);
    `captions` holds 48 stage-1 records (`cap-<i>`) whose placeholder is at the END of the human turn.
    """
    from lvit.synthetic import write_shapes_data

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
        from lvit.recipe import recipe_from_dict

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
