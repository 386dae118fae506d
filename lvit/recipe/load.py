"""Reading a recipe: the YAML file, `key=value` overrides, the rules between keys, and the accumulation that keeps
the global batch."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from lvit.errors import LvitError
from lvit.recipe.attention import check_attention
from lvit.recipe.catalog import resolve_recipe
from lvit.recipe.fields import build_section, validate_training
from lvit.recipe.schema import Recipe
from lvit.textfiles import read_text


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
        raw = _yaml(read_text(path, "recipe file"))
    except yaml.YAMLError as exc:
        raise LvitError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise LvitError(f"{path}: a recipe is a YAML mapping (key: value), got {type(raw).__name__}.")
    for item in overrides:
        apply_override(raw, item, str(path))
    try:
        return recipe_from_dict(raw, str(path), check_training)
    except LvitError as exc:  # a key set on the command line: say so, not that the file has it
        text = str(exc)
        for item in overrides:
            key = item.partition("=")[0].strip()
            if key and (f"'{key}'" in text or f" {key} " in text or f" {key}:" in text or f" {key}=" in text):
                raise LvitError(f"{text} (set by the command-line override {item!r}, not in {path.name})") from None
        raise


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
    recipe = build_section(Recipe, {**raw, "training": {}}, source, prefix="")
    recipe.training = validate_training(training, source) if check_training else dict(training)
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
    _check_amounts(recipe, training, source)
    tower_trains = recipe.method == "full" or recipe.lora.vision_tower
    if recipe.vision_tower_lr is not None and (recipe.stage != "finetune" or not tower_trains):
        raise LvitError(
            f"{source}: vision_tower_lr trains the vision tower in stage 2 (stage 'finetune'): the whole tower with "
            f"method 'full', or its adapters with lora.vision_tower: true; this recipe is stage {recipe.stage!r}, "
            f"method {recipe.method!r}. Remove vision_tower_lr, or set lora.vision_tower: true (a LoRA run saves only "
            "its adapters, so a tower trained outside them would not be kept)."
        )
    if recipe.method != "full" and recipe.lora.vision_tower and recipe.vision_tower_lr is None:
        raise LvitError(
            f"{source}: lora.vision_tower: true adapts the vision tower at its own learning rate; set "
            "vision_tower_lr (e.g. 2.0e-5), or remove lora.vision_tower."
        )
    if (recipe.data.path is None) == (recipe.data.sources is None):
        both = "both" if recipe.data.path is not None else "neither"
        raise LvitError(
            f"{source}: set data.path (one source, or a LLaVA-OneVision data YAML) or data.sources (a mixture); "
            f"this recipe sets {both}."
        )
    _check_streaming(recipe, training, source)
    _check_next(recipe, source)
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
        check_attention(recipe.model.attn_implementation, f"{source}: model.attn_implementation")
    row = recipe.data.max_tokens_per_row
    if row is not None and row < 1:
        raise LvitError(f"{source}: data.max_tokens_per_row = {row}; it must be 1 or more, or null (lvit chooses)")
    return recipe


def _check_next(recipe: Recipe, source: str) -> None:
    """model.architecture llava_next: AnyRes in stage 2, without LLaVA's `pad`."""
    model = recipe.model
    if model.architecture != "llava_next":
        if model.image_grid_pinpoints is not None:
            raise LvitError(f"{source}: model.image_grid_pinpoints is for model.architecture: llava_next; remove it.")
        return
    if recipe.data.image_aspect_ratio != "square":
        raise LvitError(
            f"{source}: model.architecture llava_next sees each image at its own aspect ratio (AnyRes); remove "
            f"data.image_aspect_ratio: {recipe.data.image_aspect_ratio} (LLaVA-NeXT's `anyres` replaces `pad`)."
        )
    if recipe.stage != "finetune":
        raise LvitError(
            f"{source}: model.architecture llava_next is trained in stage 2 (finetune) on a LLaVA-1.5-style stage 1, "
            "as LLaVA-NeXT reused LLaVA-1.5's: train stage 1 with model.architecture: llava and pass its run folder "
            "as model.projector_from."
        )


def _check_streaming(recipe: Recipe, training: dict, source: str) -> None:
    """`data.streaming`: a length in steps, and no batch order that needs the whole dataset."""
    data = recipe.data
    if data.shuffle_buffer < 0:
        raise LvitError(f"{source}: data.shuffle_buffer must be 0 (no shuffling) or more, got {data.shuffle_buffer}.")
    if not data.streaming:
        return
    if not isinstance(training.get("max_steps"), int) or training["max_steps"] < 1:
        raise LvitError(
            f"{source}: data.streaming reads the data as it trains, so the run's length is not known from it: set "
            "training.max_steps (optimizer steps)."
        )
    whole = [
        key
        for key, on in (
            ("data.group_by_modality_length", data.group_by_modality_length),
            ("data.max_tokens_per_batch", data.max_tokens_per_batch is not None),
            ("training.train_sampling_strategy", training.get("train_sampling_strategy", "random") != "random"),
            ("training.group_by_length", bool(training.get("group_by_length"))),
        )
        if on
    ]
    if whole:
        raise LvitError(
            f"{source}: {', '.join(whole)} orders the batches over the whole dataset, which data.streaming never "
            "holds; remove it, or set data.streaming: false."
        )


def _check_amounts(recipe: Recipe, training: dict, source: str) -> None:
    """Learning rates, batch sizes and lengths a run can train with; else an error before any model loads (the
    Trainer would take a negative learning rate, and fail on a batch of 0 or train no step only after loading)."""

    def number(value):
        try:
            return float(value)
        except (TypeError, ValueError):
            return None  # the type check names it

    rules = [
        ("training.learning_rate", training.get("learning_rate"), lambda v: v > 0, "a positive number, e.g. 2e-5"),
        ("projector_lr", recipe.projector_lr, lambda v: v > 0, "a positive number, or null for the learning rate"),
        ("vision_tower_lr", recipe.vision_tower_lr, lambda v: v > 0, "a positive number, or null to keep it frozen"),
        (
            "training.per_device_train_batch_size",
            training.get("per_device_train_batch_size"),
            lambda v: v >= 1,
            "1 or more",
        ),
        (
            "training.gradient_accumulation_steps",
            training.get("gradient_accumulation_steps"),
            lambda v: v >= 1,
            "1 or more",
        ),
        (
            "training.max_steps",
            training.get("max_steps"),
            lambda v: v != 0,
            "a number of steps, or -1 to train by epochs",
        ),
    ]
    max_steps = number(training.get("max_steps", -1))
    if max_steps is None or max_steps < 0:  # the epochs decide how long it trains
        rules.append(("training.num_train_epochs", training.get("num_train_epochs"), lambda v: v > 0, "more than 0"))
    for key, value, ok, expected in rules:
        v = number(value)
        if value is not None and v is not None and not ok(v):
            raise LvitError(f"{source}: {key} = {value!r} would train nothing (or diverge); it must be {expected}.")


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
