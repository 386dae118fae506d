"""Recipes: YAML files that describe one training run, validated before anything loads.

A recipe has lvit's own sections (`stage`, `model`, `data`, and a few batch/optimizer keys) and a
`training:` section that is passed through to `trl.SFTConfig`, so every `SFTConfig` /
`TrainingArguments` option works without lvit re-declaring it. Every key can be overridden on the
command line with `dotted.key=value` (the value is read as YAML).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lvit.catalog import resolve_recipe
from lvit.errors import LvitError

STAGES = ("align", "finetune")


@dataclass
class ModelSection:
    """Where the parts come from and how they are joined."""

    vision_tower: str
    """A CLIP or SigLIP / SigLIP2 (fixed resolution) vision checkpoint (hub id or local folder); a full
    CLIPModel / SiglipModel checkpoint works too. CLIP's CLS token is dropped; SigLIP has none, every patch
    feature is used (`lvit.model.VISION_TOWERS`)."""
    language_model: str
    """A causal LM with `.model` and `.lm_head` (Llama, Qwen2/3, Mistral, Gemma 2/3...; hub id or local
    folder); its tokenizer is loaded from the same place."""
    projector: Literal["linear", "mlp2x_gelu"] = "linear"
    """`linear`: the paper's single matrix W. `mlp2x_gelu`: LLaVA-1.5's two-layer MLP."""
    vision_feature_layer: int = -2
    """Which vision-tower layer feeds the projector; -2 (the penultimate) as in LLaVA."""
    torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The dtype the parts are loaded in."""
    projector_from: str | None = None
    """A stage-1 (`align`) run folder whose trained projector initialises this run's projector."""
    attn_implementation: str | None = None
    """Passed to `from_pretrained` (`sdpa`, `flash_attention_2`, `eager`); None lets transformers choose."""


@dataclass
class DataSection:
    """Training data and how a record becomes tokens."""

    path: str
    """The data: a JSON (a list of records) or JSON Lines file in LLaVA or chat format, or a Hugging Face
    dataset (a `save_to_disk` folder, parquet or arrow files). See `lvit/data/records.py`."""
    image_folder: str | None = None
    """Folder that relative image paths in the data are resolved against."""
    format: Literal["auto", "llava", "chat", "hf"] = "auto"
    """The data's format; `auto` detects it (a folder / .parquet / .arrow is `hf`, else from the first record)."""
    on_bad_record: Literal["error", "skip"] = "error"
    """A record that cannot be trained on (`lvit data check` lists them): `error` stops before training with
    the checker's report; `skip` trains on the rest and lists each skipped record with its reason in the run
    folder's `skipped_records.jsonl`."""
    template: Literal["vicuna_v1", "plain", "auto"] = "vicuna_v1"
    """Conversation template; see `lvit/templates.py`. `auto`: the language model's own chat template (Llama 3,
    Qwen, Mistral, Gemma...; `lvit/chat_template.py`), refused with the reason if lvit cannot split it exactly."""
    max_length: int = 2048
    """Longest sequence in tokens, image tokens included."""
    overlong: Literal["truncate", "drop", "error"] = "truncate"
    """A sample longer than max_length: `truncate` cuts text after the image (never the image itself;
    a sample that cannot be cut so is dropped and recorded), `drop` drops and records it, `error` stops."""
    image_aspect_ratio: Literal["square", "pad"] = "square"
    """`square`: the processor's resize and centre crop. `pad`: pad to a square with the processor's
    mean colour first (LLaVA-1.5)."""
    group_by_modality_length: bool = False
    """Each optimizer step draws only image records or only text-only records (LLaVA-1.5's
    `--group_by_modality_length`; `lvit/data/modality_sampler.py`). False: random batches."""
    packing: bool = True
    """Padding-free batches (`lvit/data/packing.py`): each micro-batch's samples laid end to end in as few rows
    as fit `max_tokens_per_row`, positions restarting at 0 per sample, attention confined to each sample. The
    samples of a step are those of the unpacked run; only the layout changes (loss and gradients equal).
    Needs `model.attn_implementation` eager, sdpa or flash_attention_2/3 (None picks sdpa or eager)."""
    max_tokens_per_row: int | None = None
    """packing: the most tokens in one packed row (None: `max_length`); at least `max_length`. With
    flash attention the whole micro-batch is one row (its varlen kernel reads sample bounds from one row)."""
    max_tokens_per_batch: int | None = None
    """Token-budget micro-batches (`lvit/data/token_budget.py`): each micro-batch takes samples, in shuffled
    order, while their tokens (image tokens included) stay within this many; `per_device_train_batch_size`
    is then unused. This CHANGES the samples per step (unlike `packing`). None (default): fixed-size batches.
    One process only; not with `global_batch_size` (set `training.gradient_accumulation_steps`) nor with
    another batch order (`group_by_modality_length`, `training.train_sampling_strategy`)."""


@dataclass
class LoraSection:
    """LoRA adapters on every linear layer of the language model (methods `lora` and `qlora`).

    Defaults: LLaVA-1.5's LoRA recipe (github.com/haotian-liu/LLaVA, scripts/v1_5/finetune_lora.sh:
    lora_r 128, lora_alpha 256; lora_dropout 0.05 is llava/train/train.py's default).
    """

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """qlora only: the dtype the 4-bit layers compute in (QLoRA paper: bf16)."""


@dataclass
class EvalSection:
    """Evaluation during training (`lvit.eval.callback`): answers to a question set, scored, written to
    the run folder's `eval/` at the end (and `eval/step-N/` every `every_n_steps` steps). lvit's own keys."""

    data: str | None = None
    """Questions with reference answers, in any format lvit reads; null: no evaluation."""
    image_folder: str | None = None
    """Folder the questions' image paths are relative to; null: `data.image_folder`."""
    metric: Literal["exact_match", "scienceqa", "pope"] = "exact_match"
    """`exact_match` (case-insensitive), `scienceqa` (LLaVA's answer parsing), `pope` (LLaVA's yes/no parsing)."""
    max_new_tokens: int = 32
    every_n_steps: int | None = None
    """Also evaluate every this many optimizer steps; null: only at the end."""
    batch_size: int = 16
    """Questions per generation batch."""


@dataclass
class Recipe:
    stage: Literal["align", "finetune"]
    """`align` (stage 1: only the projector trains) or `finetune` (stage 2: projector and LM train)."""
    model: ModelSection
    data: DataSection
    method: Literal["full", "lora", "qlora"] = "full"
    """How the LM trains in `finetune`: all weights (`full`), LoRA on a 16-bit base (`lora`), or LoRA
    on a 4-bit NF4 base with double quantization (`qlora`). The projector always trains fully."""
    lora: LoraSection = field(default_factory=LoraSection)
    global_batch_size: int | None = None
    """Samples per optimizer step over all processes. When set, gradient accumulation is derived
    from it (global = per-device batch x accumulation x processes) so it holds on any GPU count."""
    projector_lr: float | None = None
    """A separate learning rate for the projector (LLaVA's `mm_projector_lr`); None: the main one."""
    compact_head: bool = True
    """The training loss projects only the labelled positions onto the vocabulary (`lvit/loss.py`); the same
    loss and gradients as scoring every position, less work. false: TRL's loss."""
    eval: EvalSection = field(default_factory=EvalSection)
    """Evaluation during training; off unless `eval.data` is set."""
    training: dict[str, Any] = field(default_factory=dict)
    """Passed to `trl.SFTConfig`."""
    source: str = "<recipe>"
    """The file the recipe was read from (set by `load_recipe`, for messages)."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out


# Keys of `training:` that lvit sets itself; a recipe naming them would be silently overridden.
_RESERVED_TRAINING_KEYS = {
    "max_length": "use data.max_length (image tokens included) instead",
    "remove_unused_columns": "lvit's collator needs the raw columns",
    "dataset_kwargs": "lvit prepares the dataset itself",
    "packing": "lvit packs image data itself: use data.packing (on by default) and data.max_tokens_per_row",
    "padding_free": "lvit's packed batches are padding-free: use data.packing (on by default)",
    "assistant_only_loss": "lvit's templates already mask everything but the assistant turns",
    "completion_only_loss": "lvit's templates already mask everything but the assistant turns",
}


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 reads `2e-5` (no dot) as a string; a recipe means a number, also inside mappings."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), check_training: bool = True) -> Recipe:
    """Read a recipe file, apply `key=value` overrides and validate every key and type.

    Raises `LvitError` naming the file and the key at fault. Loads no model and reads no data.
    With `check_training=False` the `training:` section is kept as written, unvalidated: validating it
    imports TRL (seconds), which `lvit data check --recipe` does not need; every lvit section is
    still validated.
    """
    path = resolve_recipe(path)
    if not path.is_file():
        raise LvitError(
            f"recipe file not found: {path}. Pass the path of a YAML recipe or the name of a shipped one "
            "(`lvit recipes ls` lists them)."
        )
    try:
        raw = _yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise LvitError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise LvitError(f"{path}: a recipe is a YAML mapping (key: value), got {type(raw).__name__}.")
    for item in overrides:
        apply_override(raw, item, str(path))
    return recipe_from_dict(raw, str(path), check_training)


def apply_override(raw: dict, item: str, source: str) -> None:
    """Apply one `dotted.key=value` override to a raw recipe mapping, in place."""
    if "=" not in item:
        raise LvitError(f"override {item!r} is not of the form key=value (e.g. training.learning_rate=1e-4).")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise LvitError(f"override {item!r}: the key {key!r} is not a dotted recipe key.")
    try:
        value = _yaml(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise LvitError(f"override {item!r}: {where} in {source} is a value, not a section.")
        node = child
    node[parts[-1]] = value


def recipe_from_dict(raw: dict, source: str = "<recipe>", check_training: bool = True) -> Recipe:
    """Validate a raw recipe mapping into a `Recipe`; errors name `source` and the key.

    `check_training=False`: see `load_recipe`."""
    raw = dict(raw)
    training = raw.pop("training", None) or {}
    if not isinstance(training, dict):
        raise LvitError(f"{source}: 'training' must be a mapping of SFTConfig options.")
    recipe = _build(Recipe, {**raw, "training": {}}, source, prefix="")
    recipe.training = _validate_training(training, source) if check_training else dict(training)
    recipe.source = source
    if recipe.global_batch_size is not None and "gradient_accumulation_steps" in training:
        raise LvitError(
            f"{source}: set either global_batch_size or training.gradient_accumulation_steps, not both "
            "(lvit derives the accumulation from the global batch)."
        )
    if recipe.global_batch_size is not None and recipe.global_batch_size < 1:
        raise LvitError(f"{source}: global_batch_size must be at least 1, got {recipe.global_batch_size}.")
    if recipe.method != "full" and recipe.stage != "finetune":
        raise LvitError(
            f"{source}: method {recipe.method!r} needs stage 'finetune' (stage 'align' trains only the "
            "projector, so there is nothing to adapt)."
        )
    if recipe.data.max_length < 2:
        raise LvitError(f"{source}: data.max_length must be at least 2, got {recipe.data.max_length}.")
    strategy = training.get("train_sampling_strategy", "random")
    if recipe.data.group_by_modality_length and (strategy != "random" or training.get("group_by_length")):
        raise LvitError(
            f"{source}: data.group_by_modality_length orders the batches itself; remove "
            f"training.train_sampling_strategy ({strategy!r}) / training.group_by_length, or set "
            "data.group_by_modality_length: false."
        )
    budget = recipe.data.max_tokens_per_batch
    if budget is not None:
        if budget < 1:
            raise LvitError(f"{source}: data.max_tokens_per_batch must be at least 1, got {budget}.")
        if recipe.data.group_by_modality_length or strategy != "random":
            raise LvitError(
                f"{source}: data.max_tokens_per_batch forms the batches itself; it cannot be combined with "
                f"data.group_by_modality_length or training.train_sampling_strategy ({strategy!r}). Remove "
                "those, or data.max_tokens_per_batch."
            )
        if recipe.global_batch_size is not None:
            raise LvitError(
                f"{source}: data.max_tokens_per_batch makes the samples per step vary, so global_batch_size "
                f"({recipe.global_batch_size} samples) cannot hold. Set global_batch_size: null and choose "
                "training.gradient_accumulation_steps (micro-batches per optimizer step) instead."
            )
    if recipe.data.packing and recipe.model.attn_implementation is not None:
        from lvit.data.packing import check_attention

        check_attention(recipe.model.attn_implementation, f"{source}: model.attn_implementation")
    row = recipe.data.max_tokens_per_row
    if row is not None and row < recipe.data.max_length:
        raise LvitError(
            f"{source}: data.max_tokens_per_row = {row} is below data.max_length = {recipe.data.max_length}: "
            "a sample is never split across rows, so a row must hold the longest sample. Raise it or leave it "
            "unset (it defaults to data.max_length)."
        )
    return recipe


def gradient_accumulation(recipe: Recipe, num_processes: int) -> int:
    """Accumulation steps that keep `global_batch_size` for this many processes."""
    per_device = int(recipe.training.get("per_device_train_batch_size", 8))
    if recipe.global_batch_size is None:
        return int(recipe.training.get("gradient_accumulation_steps", 1))
    per_step = per_device * num_processes
    if recipe.global_batch_size % per_step:
        raise LvitError(
            f"{recipe.source}: global_batch_size {recipe.global_batch_size} is not a multiple of "
            f"per_device_train_batch_size {per_device} x {num_processes} process(es) = {per_step}. "
            "Change training.per_device_train_batch_size (or global_batch_size) so it divides."
        )
    return recipe.global_batch_size // per_step


# ---------------------------------------------------------------------------------------------
# validation helpers


def _build(cls, raw: Any, source: str, prefix: str):
    where = prefix.rstrip(".") or "the recipe"
    if not isinstance(raw, dict):
        raise LvitError(f"{source}: {where} must be a mapping, got {type(raw).__name__}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    _reject_unknown(raw, fields, source, prefix)
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise LvitError(f"{source}: missing required key '{key}'.")
            continue
        value = raw[name]
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, source, key + ".")
        else:
            kwargs[name] = _coerce(value, hint, key, source)
    return cls(**kwargs)


def _reject_unknown(raw: dict, known, source: str, prefix: str) -> None:
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            where = prefix.rstrip(".") or "the top level"
            raise LvitError(
                f"{source}: unknown key '{prefix}{key}'.{hint} Keys allowed at {where}: {', '.join(sorted(known))}."
            )


@functools.cache
def _sft_fields() -> dict[str, Any]:
    from trl import SFTConfig  # heavy import, only when a recipe is validated

    hints = typing.get_type_hints(SFTConfig)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(SFTConfig) if f.init}


def _validate_training(training: dict, source: str) -> dict:
    fields = _sft_fields()
    for key, why in _RESERVED_TRAINING_KEYS.items():
        if key in training:
            raise LvitError(f"{source}: training.{key} is set by lvit ({why}); remove it from the recipe.")
    _reject_unknown(training, fields, source, "training.")
    return {key: _coerce(value, fields[key], f"training.{key}", source) for key, value in training.items()}


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    ok, out = _match(value, hint)
    if not ok:
        raise LvitError(f"{source}: '{key}' should be {_describe(hint)}, got {value!r} ({type(value).__name__}).")
    return out


def _match(value: Any, hint: Any) -> tuple[bool, Any]:
    if hint is Any or hint is typing.Any:
        return True, value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        # Try the non-str members first so that "1e-3" becomes a float where a float is allowed.
        members = sorted(typing.get_args(hint), key=lambda h: h is str)
        for member in members:
            ok, out = _match(value, member)
            if ok:
                return True, out
        return False, None
    if origin is Literal:
        return (value in typing.get_args(hint)), value
    if hint is type(None):
        return value is None, None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-5" (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if hint is str:
        return isinstance(value, str), value
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        values = {m.value for m in hint}
        return (value in values or isinstance(value, hint)), value
    if origin in (dict, typing.Dict) or hint is dict:  # noqa: UP006
        return isinstance(value, dict), value
    if origin in (list, typing.List) or hint is list:  # noqa: UP006
        return isinstance(value, list), value
    return True, value  # a type this checker does not know: SFTConfig validates it when built


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    return getattr(hint, "__name__", str(hint))


# training.report_to: for each integration transformers reports to, the modules it needs (any one of them, as
# transformers' `is_*_available` look for them) and what to install. Source: transformers 5.24
# `integrations/integration_utils.py` (`INTEGRATION_TO_CALLBACK`, `get_available_reporting_integrations`).
_INTEGRATIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), 'pip install "lvit[tensorboard]"'),
    "wandb": (("wandb",), "pip install wandb"),
    "mlflow": (("mlflow",), "pip install mlflow"),
    "comet_ml": (("comet_ml",), "pip install comet-ml"),
    "neptune": (("neptune",), "pip install neptune"),
    "trackio": (("trackio",), "pip install trackio"),
    "codecarbon": (("codecarbon",), "pip install codecarbon"),
    "clearml": (("clearml",), "pip install clearml"),
    "dagshub": (("dagshub",), "pip install dagshub mlflow"),
    "flyte": (("flytekit",), "pip install flytekit"),
    "dvclive": (("dvclive",), "pip install dvclive"),
    "swanlab": (("swanlab",), "pip install swanlab"),
    "azure_ml": (("azureml",), "pip install azureml-core"),
}


def check_report_to(recipe: Recipe) -> None:
    """Raise `LvitError` when `training.report_to` names an integration that is unknown or whose package is not
    installed (the Trainer would fail only after the models load). `"none"` reports nowhere and `"all"` to
    every installed integration, as in transformers: neither can fail."""
    import importlib.util

    value = recipe.training.get("report_to", "none")
    names = [value] if isinstance(value, str) else list(value or [])
    if names in ([], ["none"], ["all"]):
        return
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise LvitError(
                f"{recipe.source}: training.report_to names {name!r}, which transformers does not report to; use "
                f"'none', 'all' or some of: {', '.join(INTEGRATION_TO_CALLBACK)}."
            )
        modules, install = _INTEGRATIONS.get(name, ((), ""))
        if modules and not any(importlib.util.find_spec(m) is not None for m in modules):
            raise LvitError(
                f"{recipe.source}: training.report_to names {name!r}, but its package ({' or '.join(modules)}) is not "
                f"installed: `{install}`, or set `training.report_to=none`."
            )
