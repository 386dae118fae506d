"""The files of a run folder, a checkpoint and an export: their names, and reading and writing them.

Light imports only (no torch, transformers or safetensors at import time): `lvit.model` and the CLI
reach this module.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from lvit.errors import LvitError
from lvit.recipe.load import recipe_from_dict
from lvit.recipe.schema import Recipe

# In every run folder and checkpoint (written by lvit):
RECIPE_FILE = "lvit_recipe.yaml"
"""The recipe the run trained with, every override applied."""
RUN_INFO_FILE = "lvit_run.json"
"""What the run is (`run_info`); in the run folder itself it marks a finished run."""
# In a finished stage-1 run folder, and in a `--projector-only` export:
PROJECTOR_FILE = "projector.safetensors"
"""The projector's weights, `linear_1.*` and `linear_2.*` (what `model.projector_from` reads)."""
# In an export (`lvit export`):
EXPORT_INFO_FILE = "lvit_export.json"
"""What was exported from which run, and its self-check (the run's recipe included)."""
MODEL_CARD_FILE = "README.md"
# In a run folder whose data had records left out (invalid under data.on_bad_record: skip, too long, or an
# image that failed to decode mid-run), written by lvit.data.dataset:
SKIPPED_FILE = "skipped_records.jsonl"
"""One JSON line per record left out of training: `{"id", "index", "kind", "reason"}`."""
# In every run folder, by lvit.train.history: the loss history, written as training goes, and its plot, at the end.
LOG_FILE = "lvit_log.jsonl"
"""One JSON line per logging step: `{"step", "epoch", "loss", "learning_rate", "grad_norm", ...eval metrics}`."""
PLOT_FILE = "lvit_loss.png"
"""The training loss (and eval loss, learning rate) per step, drawn when training ends."""
MIXTURE_FILE = "mixture.json"
"""A mixture's plan: per source, its records and what each epoch draws (`lvit.data.mixture`)."""
MIXTURE_FOLDER = "mixture"
"""A mixture's draws, `epoch-<E>.jsonl` (`lvit.data.mixture_sampler`)."""
OWN_LOG_FILES = (LOG_FILE, SKIPPED_FILE, MIXTURE_FILE, MIXTURE_FOLDER)
"""What lvit writes into an output folder before its first checkpoint (a run killed then starts afresh)."""
# Written by the Trainer into every checkpoint, after everything else it saves:
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# Weights, as transformers and peft name them:
MODEL_WEIGHTS_FILE = "model.safetensors"
MODEL_WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
"""A sharded model's index: tensor name -> shard file (`model-0000N-of-0000M.safetensors`)."""
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
WEIGHT_FILES = (MODEL_WEIGHTS_FILE, MODEL_WEIGHTS_INDEX_FILE, ADAPTER_WEIGHTS_FILE, "pytorch_model.bin")
"""Any of these: a checkpoint holds weights (a whole model, sharded or not, or an adapter)."""


@dataclass
class RunFolder:
    """A run folder or one of its checkpoints, as lvit wrote it."""

    path: Path
    recipe: Recipe
    info: dict

    @property
    def kind(self) -> str:
        """ "align", "full", "lora" or "qlora"."""
        return "align" if self.recipe.stage == "align" else self.recipe.method

    @property
    def is_checkpoint(self) -> bool:
        return CHECKPOINT_NAME.match(self.path.name) is not None

    @property
    def holds_whole_model(self) -> bool:
        """A stock LLaVA checkpoint: a full run, or a stage-1 *checkpoint* (the Trainer saves the whole,
        mostly frozen model there; only the finished stage-1 run folder holds just the projector)."""
        if self.kind == "full":
            return True
        return (
            self.kind == "align"
            and not (self.path / PROJECTOR_FILE).is_file()
            and any(self.path.glob("model*.safetensors"))
        )

    @property
    def recipe_path(self) -> Path:
        return self.path / RECIPE_FILE

    def trainer_state(self) -> dict | None:
        return read_trainer_state(self.path)


def model_weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a whole model saved in `folder` (its shards, or the one file); [] if none."""
    folder = Path(folder)
    index = folder / MODEL_WEIGHTS_INDEX_FILE
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / MODEL_WEIGHTS_FILE
    return [single] if single.is_file() else []


BASE_MODEL_KEYS = ("vision_tower", "language_model")
BASE_MODEL_OPTION = "--base-model"


def parse_base_model(values: list[str] | None) -> dict[str, str]:
    """`--base-model KEY=PATH` values (KEY: vision_tower or language_model) as `{KEY: PATH}`."""
    parsed = {}
    for value in values or []:
        key, sep, path = value.partition("=")
        if not sep or key.strip() not in BASE_MODEL_KEYS or not path.strip():
            raise LvitError(
                f"{BASE_MODEL_OPTION} {value!r}: expected KEY=PATH with KEY one of {', '.join(BASE_MODEL_KEYS)}, "
                f"e.g. {BASE_MODEL_OPTION} language_model=/models/vicuna-13b."
            )
        parsed[key.strip()] = path.strip()
    return parsed


def read_run(path: str | Path, base_model: dict[str, str] | None = None) -> RunFolder:
    """Open a run folder or checkpoint; `LvitError` if it is not one lvit wrote.

    `base_model` (`{"language_model": PATH}`, from `--base-model`) replaces where the run's frozen base parts are
    read from, for a base model moved since training."""
    path = Path(path)
    if not path.is_dir():
        raise LvitError(f"{path}: no such run folder")
    recipe_path, info_path = path / RECIPE_FILE, path / RUN_INFO_FILE
    if not recipe_path.is_file() or not info_path.is_file():
        if any(path.glob("checkpoint-*")):
            raise LvitError(
                f"{path} has no finished run files yet; pass one of its checkpoints "
                f"({', '.join(sorted(p.name for p in path.glob('checkpoint-*')))}) instead."
            )
        raise LvitError(f"{path} is not an lvit run folder (no {RECIPE_FILE} / {RUN_INFO_FILE}).")
    recipe = recipe_from_dict(yaml.safe_load(recipe_path.read_text()), str(recipe_path))
    if base_model:
        import dataclasses

        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, **base_model))
    return RunFolder(path, recipe, json.loads(info_path.read_text()))


def is_run_folder(path: str | Path) -> bool:
    """Whether `path` is (or is becoming) an lvit run folder or checkpoint, rather than a model folder."""
    path = Path(path)
    return (path / RUN_INFO_FILE).is_file() or any(path.glob("checkpoint-*"))


def is_finished_run(path: str | Path) -> bool:
    """Whether the run folder `path` holds a finished run (`save_run` writes the run info last)."""
    return (Path(path) / RUN_INFO_FILE).is_file()


# --- run info and recipe ------------------------------------------------------------------------------------


PATH_KEYS = (
    ("model", "vision_tower"),
    ("model", "language_model"),
    ("model", "projector_from"),
    ("data", "path"),
    ("data", "image_folder"),
)
"""The recipe keys that may name a local file or folder (a model key may also hold a Hub id)."""


def given_paths(recipe: Recipe) -> dict[str, str]:
    """The recipe's local paths as given (`"model.language_model": "runs/parts/lm"`), where they are relative.

    Hub ids (`openai/clip-vit-large-patch14`: no such local file or folder) and absolute paths are left out."""
    named = {f"{section}.{key}": getattr(getattr(recipe, section), key) for section, key in PATH_KEYS}
    for i, source in enumerate(recipe.data.sources or []):  # a mixture's sources
        named.update({f"data.sources.{i}.{key}": getattr(source, key) for key in ("path", "image_folder")})
    return {k: v for k, v in named.items() if v and not Path(v).is_absolute() and Path(v).exists()}


def recipe_with_absolute_paths(recipe: Recipe) -> dict:
    """The recipe as a mapping, local paths made absolute, so the run can be used from any folder."""
    raw = recipe.to_dict()
    for dotted in given_paths(recipe):
        *parents, key = dotted.split(".")
        node = raw
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[key] = str(Path(node[key]).resolve())
    return raw


def read_run_info(folder: str | Path) -> dict | None:
    """The parsed `lvit_run.json` of a run folder or checkpoint, or None if it is missing or unreadable."""
    path = Path(folder) / RUN_INFO_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def run_info(
    recipe: Recipe,
    metrics: dict | None = None,
    skipped: int = 0,
    segments: list | None = None,
    facts: dict | None = None,
) -> dict:
    """What `lvit_run.json` says about a run (also written into every checkpoint).

    Model and data paths are absolute (as in the saved recipe); `given_paths` holds the relative ones as the
    recipe gave them."""
    import math

    absolute = recipe_with_absolute_paths(recipe)
    return {
        "stage": recipe.stage,
        "method": recipe.method,
        "projector": recipe.model.projector,
        "architecture": recipe.model.architecture,
        "vision_tower": absolute["model"]["vision_tower"],
        "language_model": absolute["model"]["language_model"],
        "projector_from": absolute["model"]["projector_from"],
        "template": recipe.data.template,
        "data": absolute["data"]["path"]
        if absolute["data"]["sources"] is None
        else [{"name": s["name"], "path": s["path"]} for s in absolute["data"]["sources"]],
        "given_paths": given_paths(recipe),
        "recipe": recipe.source,
        "skipped_records": skipped,  # invalid (on_bad_record=skip), too long or undecodable: skipped_records.jsonl
        "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)},
        # the parts of a resumed run: the step each started at, when, the settings it changed, its time
        "segments": segments or [],
        # a finished run: steps, records, final loss, times, versions, command line (lvit.train.run)
        **(facts or {}),
    }


def write_run_files(folder: str | Path, recipe: Recipe, info: dict) -> None:
    """The recipe (local paths absolute), run info and run card, into a run folder or checkpoint (what makes it one
    lvit can read back).

    The card (`README.md`) replaces the generic one that TRL and peft write when they save (a text-generation
    snippet for a model "fine-tuned from None", or an empty adapter card): it says what the folder is and how to
    use it."""
    folder = Path(folder)
    (folder / RECIPE_FILE).write_text(yaml.safe_dump(recipe_with_absolute_paths(recipe), sort_keys=False))
    (folder / RUN_INFO_FILE).write_text(json.dumps(info, indent=2))
    (folder / MODEL_CARD_FILE).write_text(run_card(folder, info))


_HOLDS = {
    "align": "the trained projector (`projector.safetensors`); CLIP and the language model are unchanged base parts",
    "align-checkpoint": "the whole LLaVA model as the Trainer saves a checkpoint (only its projector trained)",
    "full": "the whole trained LLaVA model (`model.safetensors`), a stock `{model_class}`",
    "lora": "a peft adapter (`adapter_model.safetensors`): LoRA on the language model and the trained "
    "projector{newline}",
    "qlora": "a peft adapter (`adapter_model.safetensors`) trained on a 4-bit NF4 language model: LoRA on the "
    "language model and the trained projector{newline}",
}


def is_hub_id(value) -> bool:
    """Whether a model source names a Hugging Face Hub repository (`owner/name`), not a local folder."""
    text = str(value or "")
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", text)) and not text.startswith(".") and not Path(text).exists()


def portable(value) -> str:
    """How a card names a model or data source: a Hub id as it is, a local path by its last part alone
    (`.../vicuna-13b`), so no card shows the folders of the machine that trained it."""
    text = str(value)
    if text.startswith(("/", "~")) or Path(text).is_absolute() or Path(text).exists():
        return f".../{Path(text).name}"
    return text


def run_card(folder: str | Path, info: dict) -> str:
    """The `README.md` of a run folder or checkpoint: what it holds, what it was trained from, how to use it."""
    folder = Path(folder)
    kind = "align" if info["stage"] == "align" else info["method"]
    checkpoint = bool(CHECKPOINT_NAME.match(folder.name))
    where = f"`{folder.name}`, a checkpoint of an lvit run" if checkpoint else "an lvit run"
    next_run = info.get("architecture") == "llava_next"  # AnyRes: its class, and image_newline beside an adapter
    holds = _HOLDS["align-checkpoint" if kind == "align" and checkpoint else kind].format(
        model_class="LlavaNextForConditionalGeneration" if next_run else "LlavaForConditionalGeneration",
        newline=", with `image_newline.safetensors` beside it" if next_run else "",
    )
    lines = [
        f"# {folder.name}",
        "",
        f"This folder is {where} (stage `{info['stage']}`, method `{info['method']}`). It holds {holds}, with "
        f"the processor, the recipe (`{RECIPE_FILE}`) and what the run is (`{RUN_INFO_FILE}`).",
        "",
        f"- vision tower: `{portable(info['vision_tower'])}`",
        f"- language model: `{portable(info['language_model'])}`",
        f"- template: `{info['template']}`; data: `{portable(info['data'])}`",
    ]
    if info.get("metrics"):
        lines.append("- metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in info["metrics"].items()))
    lines += ["", "Use it with lvit, from the folder that holds it:", "", "```bash"]
    name = folder.name
    if kind == "align":
        lines.append(f"lvit finetune RECIPE model.projector_from={name}   # stage 2 from this projector")
        lines.append(f"lvit export {name} --out EXPORT --projector-only")
    else:
        lines.append(f"lvit chat {name} --image IMAGE --prompt 'Describe the image.'")
        lines.append(f"lvit export {name} --out EXPORT   # a stock LLaVA folder for plain transformers and vLLM")
    lines += ["```", ""]
    return "\n".join(lines)


def copy_run_files(run: RunFolder, folder: str | Path) -> None:
    """The run's recipe and run info, copied as they are (a projector-only export carries them)."""
    for name in (RUN_INFO_FILE, RECIPE_FILE):
        shutil.copy2(run.path / name, Path(folder) / name)


def read_trainer_state(folder: str | Path) -> dict | None:
    """A checkpoint's parsed `trainer_state.json`, or None if it is missing or unreadable."""
    path = Path(folder) / TRAINER_STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


# --- the projector ------------------------------------------------------------------------------------------


def write_projector(folder: str | Path, state: dict, dtype=None) -> Path:
    """Write projector weights (`linear_1.weight`, ...) as `projector.safetensors`, cast to `dtype` if given.

    The one writer: a finished stage-1 run and `lvit export --projector-only` both write through it.
    """
    from safetensors.torch import save_file

    path = Path(folder) / PROJECTOR_FILE
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def read_projector(folder: str | Path, kind: str, source: str = "<recipe>") -> tuple[dict, Path]:
    """The projector weights of a stage-1 run (or projector-only export) for a `kind` projector.

    Returns `(state, path)`; `LvitError` (naming `model.projector_from` in `source`) if the folder
    holds no projector or its run info says it trained another kind.
    """
    from safetensors.torch import load_file

    run = Path(folder)
    path = run / PROJECTOR_FILE
    if not path.is_file():
        raise LvitError(
            f"{source}: model.projector_from = {str(folder)!r} has no {PROJECTOR_FILE}; point it at the "
            "output folder of a finished `stage: align` run."
        )
    info_path = run / RUN_INFO_FILE
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("projector") not in (None, kind):
            raise LvitError(
                f"{source}: model.projector is {kind!r} but the stage-1 run {str(folder)!r} trained a "
                f"{info['projector']!r} projector; make them match."
            )
    return load_file(str(path)), path


# --- exports ------------------------------------------------------------------------------------------------


def write_export_info(folder: str | Path, run: RunFolder, result: dict) -> None:
    """`lvit_export.json`: the export's result, its source run, the run's info and recipe."""
    info = dict(result)
    info.update(source=str(run.path.resolve()), run=run.info, recipe=run.recipe.to_dict())
    (Path(folder) / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2))


def read_export_info(folder: str | Path) -> dict | None:
    """What `lvit export` wrote about an exported folder, or None for any other folder."""
    path = Path(folder) / EXPORT_INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else None
