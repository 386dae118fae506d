"""Recipes: loading, validation messages, overrides and the global batch arithmetic."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from lvit.errors import LvitError
from lvit.recipe.load import apply_override, gradient_accumulation, load_recipe, recipe_from_dict
from lvit.recipe.schema import STAGES

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

BASE = {
    "stage": "finetune",
    "model": {"vision_tower": "parts/clip", "language_model": "parts/vicuna"},
    "data": {"path": "data/instruct.json"},
    "training": {"output_dir": "runs/x", "per_device_train_batch_size": 4, "learning_rate": 0.001},
}


def write(tmp_path, raw: dict | str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    return path


def with_(section: str | None, key: str, value) -> dict:
    raw = copy.deepcopy(BASE)
    (raw if section is None else raw.setdefault(section, {}))[key] = value
    return raw


def without(section: str | None, key: str) -> dict:
    raw = copy.deepcopy(BASE)
    del (raw if section is None else raw[section])[key]
    return raw


def load_error(tmp_path, raw, overrides=()) -> str:
    path = write(tmp_path, raw)
    with pytest.raises(LvitError) as info:
        load_recipe(path, list(overrides))
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") or f"in {path}" in msg, msg  # every message names the file
    return msg


def test_minimal_recipe_gets_the_documented_defaults(tmp_path):
    path = write(tmp_path, BASE)
    recipe = load_recipe(path)
    assert recipe.source == str(path)
    assert recipe.stage == "finetune"
    assert (recipe.model.vision_tower, recipe.model.language_model) == ("parts/clip", "parts/vicuna")
    assert recipe.model.projector == "linear" and recipe.model.vision_feature_layer == -2
    assert recipe.model.projector_from is None and recipe.model.torch_dtype == "float32"
    assert (recipe.data.template, recipe.data.max_length, recipe.data.overlong) == ("vicuna_v1", 2048, "truncate")
    assert recipe.data.image_aspect_ratio == "square" and recipe.data.image_folder is None
    assert recipe.global_batch_size is None and recipe.projector_lr is None
    assert recipe.training == BASE["training"]
    assert "source" not in recipe.to_dict()


def test_to_dict_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, with_(None, "global_batch_size", 8)))
    again = recipe_from_dict(yaml.safe_load(yaml.safe_dump(recipe.to_dict())), recipe.source)
    assert again == recipe


# ---------------------------------------------------------------------------------------------
# unknown keys


@pytest.mark.parametrize(
    ("section", "key", "dotted", "suggestion"),
    [
        (None, "stagee", "stagee", "stage"),
        (None, "global_batchsize", "global_batchsize", "global_batch_size"),
        ("model", "projecter", "model.projecter", "model.projector"),
        ("data", "max_lenght", "data.max_lenght", "data.max_length"),
        ("training", "learning_rat", "training.learning_rat", "training.learning_rate"),
        (
            "training",
            "per_device_train_batchsize",
            "training.per_device_train_batchsize",
            "training.per_device_train_batch_size",
        ),
    ],
)
def test_unknown_key_names_key_file_and_suggests(tmp_path, section, key, dotted, suggestion):
    msg = load_error(tmp_path, with_(section, key, 1))
    assert f"unknown key '{dotted}'. Did you mean '{suggestion}'?" in msg
    where = section or "the top level"
    assert f"Keys allowed at {where}: " in msg


@pytest.mark.parametrize("section", [None, "model", "training"])
def test_unknown_key_without_near_miss_has_no_suggestion(tmp_path, section):
    msg = load_error(tmp_path, with_(section, "zzqqxx", 1))
    dotted = f"{section}.zzqqxx" if section else "zzqqxx"
    assert f"unknown key '{dotted}'." in msg
    assert "Did you mean" not in msg


def test_source_is_not_a_recipe_key(tmp_path):
    assert "unknown key 'source'" in load_error(tmp_path, with_(None, "source", "x.yaml"))


# ---------------------------------------------------------------------------------------------
# types


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("training", "learning_rate", "abc", "'training.learning_rate' should be float, got 'abc' (str)"),
        ("model", "projector", "conv", "'model.projector' should be one of 'linear', 'mlp2x_gelu', got 'conv' (str)"),
        ("data", "max_length", "long", "'data.max_length' should be int, got 'long' (str)"),
        ("data", "max_length", True, "'data.max_length' should be int, got True (bool)"),
        ("data", "overlong", "cut", "'data.overlong' should be one of 'truncate', 'drop', 'error'"),
        ("data", "template", "llama3", "'data.template' should be one of 'vicuna_v1', 'plain'"),
        ("model", "vision_feature_layer", "-2", "'model.vision_feature_layer' should be int"),
        ("model", "projector_from", 3, "'model.projector_from' should be str or null, got 3 (int)"),
        (None, "stage", "pretrain", "'stage' should be one of 'align', 'finetune'"),
        (None, "global_batch_size", 2.5, "'global_batch_size' should be int or null, got 2.5 (float)"),
        (None, "projector_lr", "fast", "'projector_lr' should be float or null, got 'fast' (str)"),
        ("training", "max_steps", 1.5, "'training.max_steps' should be int, got 1.5 (float)"),
        ("training", "bf16", "yes", "'training.bf16' should be"),
    ],
)
def test_wrong_type_names_the_key(tmp_path, section, key, value, expected):
    assert expected in load_error(tmp_path, with_(section, key, value))


def test_unquoted_no_is_a_bool_and_is_caught(tmp_path):
    """YAML 1.1 reads `save_strategy: no` as False; the check catches it instead of SFTConfig failing later."""
    text = yaml.safe_dump(BASE, sort_keys=False) + "  save_strategy: no\n"
    assert yaml.safe_load(text)["training"]["save_strategy"] is False
    assert "'training.save_strategy' should be" in load_error(tmp_path, text)


def test_sections_must_be_mappings(tmp_path):
    assert "model must be a mapping, got str" in load_error(tmp_path, with_(None, "model", "clip"))
    assert "'training' must be a mapping" in load_error(tmp_path, with_(None, "training", ["lr"]))


@pytest.mark.parametrize(
    ("section", "key", "dotted"),
    [
        (None, "stage", "stage"),
        (None, "model", "model"),
        (None, "data", "data"),
        ("model", "vision_tower", "model.vision_tower"),
        ("model", "language_model", "model.language_model"),
    ],
)
def test_missing_required_key(tmp_path, section, key, dotted):
    assert f"missing required key '{dotted}'." in load_error(tmp_path, without(section, key))


def test_data_needs_a_path_or_sources(tmp_path):
    assert "set data.path (one source, or a LLaVA-OneVision data YAML) or data.sources (a mixture); this recipe sets " \
        "neither." in load_error(tmp_path, without("data", "path"))  # fmt: skip


def test_yaml_1_1_exponent_strings_are_floats(tmp_path):
    text = yaml.safe_dump(without("training", "learning_rate"), sort_keys=False)
    text += "  learning_rate: 2e-5\nprojector_lr: 1e-3\n"
    raw = yaml.safe_load(text)
    assert raw["training"]["learning_rate"] == "2e-5"  # what PyYAML gives: a string
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.training["learning_rate"] == 2e-5 and type(recipe.training["learning_rate"]) is float
    assert recipe.projector_lr == 1e-3 and type(recipe.projector_lr) is float


def test_exponent_floats_inside_mapping_options_are_floats(tmp_path):
    text = yaml.safe_dump(BASE, sort_keys=False) + "  lr_scheduler_kwargs:\n    min_lr: 1e-6\n"
    assert load_recipe(write(tmp_path, text)).training["lr_scheduler_kwargs"] == {"min_lr": 1e-6}
    overridden = load_recipe(write(tmp_path, BASE), ["training.lr_scheduler_kwargs.min_lr=1e-6"])
    assert overridden.training["lr_scheduler_kwargs"] == {"min_lr": 1e-6}


def test_int_where_float_is_expected_becomes_float(tmp_path):
    recipe = load_recipe(write(tmp_path, with_("training", "num_train_epochs", 3)))
    assert recipe.training["num_train_epochs"] == 3.0 and type(recipe.training["num_train_epochs"]) is float


@pytest.mark.parametrize("text", ["stage: [unclosed\n", "- a\n- b\n", ""])
def test_not_a_yaml_mapping(tmp_path, text):
    msg = load_error(tmp_path, text)
    assert "not valid YAML" in msg or "a recipe is a YAML mapping" in msg


def test_missing_recipe_file(tmp_path):
    with pytest.raises(LvitError, match="recipe file not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_length", 512),
        ("packing", True),
        ("padding_free", True),
        ("remove_unused_columns", True),
        ("dataset_kwargs", {}),
        ("assistant_only_loss", True),
        ("completion_only_loss", True),
    ],
)
def test_reserved_training_keys_are_rejected(tmp_path, key, value):
    msg = load_error(tmp_path, with_("training", key, value))
    assert f"training.{key} is set by lvit (" in msg
    assert "remove it from the recipe" in msg


def test_max_length_points_to_data_max_length(tmp_path):
    assert "use data.max_length" in load_error(tmp_path, with_("training", "max_length", 512))


@pytest.mark.parametrize("key", ["packing", "padding_free"])
def test_trl_packing_keys_point_to_data_packing(tmp_path, key):
    assert "use data.packing" in load_error(tmp_path, with_("training", key, True))


@pytest.mark.parametrize("value", [0, -8])
def test_global_batch_size_must_be_positive(tmp_path, value):
    assert f"global_batch_size must be at least 1, got {value}" in load_error(
        tmp_path, with_(None, "global_batch_size", value)
    )


def test_max_length_must_be_at_least_two(tmp_path):
    assert "data.max_length must be at least 2, got 1" in load_error(tmp_path, with_("data", "max_length", 1))


# ---------------------------------------------------------------------------------------------
# overrides


def test_overrides_set_nested_and_new_keys_with_yaml_values(tmp_path):
    raw = with_("model", "projector_from", "runs/stage1")
    path = write(tmp_path, raw)
    recipe = load_recipe(
        path,
        [
            "training.learning_rate=1e-4",
            "training.bf16=true",
            "training.max_steps=3",  # not in the file: added
            "training.lr_scheduler_kwargs.min_lr=0.5",  # a new nested mapping
            "data.max_length=64",
            "data.image_folder=images/train 2017",  # spaces kept
            "model.projector=mlp2x_gelu",
            "model.projector_from=null",
            "global_batch_size=16",
            "projector_lr=2e-5",
            "data.path=data/a=b.json",  # only the first '=' splits
        ],
    )
    assert recipe.training["learning_rate"] == 1e-4 and type(recipe.training["learning_rate"]) is float
    assert recipe.training["bf16"] is True
    assert recipe.training["max_steps"] == 3
    assert recipe.training["lr_scheduler_kwargs"] == {"min_lr": 0.5}
    assert recipe.data.max_length == 64
    assert recipe.data.image_folder == "images/train 2017"
    assert recipe.model.projector == "mlp2x_gelu"
    assert recipe.model.projector_from is None
    assert recipe.global_batch_size == 16
    assert recipe.projector_lr == 2e-5
    assert recipe.data.path == "data/a=b.json"
    assert yaml.safe_load(path.read_text()) == raw  # the file itself is untouched


def test_overrides_create_missing_sections(tmp_path):
    recipe = load_recipe(write(tmp_path, without(None, "training")), ["training.seed=7", "training.use_cpu=true"])
    assert recipe.training == {"seed": 7, "use_cpu": True}


def test_apply_override_in_place():
    raw: dict = {"data": {"path": "x"}, "training": None}
    apply_override(raw, "data.max_length=128", "r.yaml")
    apply_override(raw, "training.seed=1", "r.yaml")  # a null section becomes a mapping
    apply_override(raw, "data.image_folder=", "r.yaml")  # empty value: null
    apply_override(raw, "data.path=[not yaml", "r.yaml")  # unparsable YAML: the text as is
    apply_override(raw, " a.b.c = 1.5", "r.yaml")
    assert raw == {
        "data": {"path": "[not yaml", "max_length": 128, "image_folder": None},
        "training": {"seed": 1},
        "a": {"b": {"c": 1.5}},
    }


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("training.learning_rate", "override 'training.learning_rate' is not of the form key=value"),
        ("training..seed=1", "the key 'training..seed' is not a dotted recipe key"),
        ("=1", "the key '' is not a dotted recipe key"),
        ("data.path.x=1", "data.path in r.yaml is a value, not a section"),
    ],
)
def test_bad_override(item, expected):
    with pytest.raises(LvitError) as info:
        apply_override(copy.deepcopy(BASE), item, "r.yaml")
    assert expected in str(info.value)


def test_overridden_values_are_validated(tmp_path):
    assert "unknown key 'training.learning_rat'. Did you mean 'training.learning_rate'?" in load_error(
        tmp_path, BASE, ["training.learning_rat=1e-4"]
    )
    assert "'data.max_length' should be int, got 'long' (str)" in load_error(tmp_path, BASE, ["data.max_length=long"])


# ---------------------------------------------------------------------------------------------
# global batch size


def recipe_with(global_batch_size=None, **training):
    raw = copy.deepcopy(BASE)
    raw["training"] = {"output_dir": "runs/x", **training}
    if global_batch_size is not None:
        raw["global_batch_size"] = global_batch_size
    return recipe_from_dict(raw, "batch.yaml")


@pytest.mark.parametrize(("processes", "expected"), [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_accumulation_keeps_the_global_batch(processes, expected):
    recipe = recipe_with(32, per_device_train_batch_size=4)
    acc = gradient_accumulation(recipe, processes)
    assert acc == expected
    assert acc * 4 * processes == 32


def test_accumulation_uses_the_trainer_default_per_device_batch():
    from transformers import TrainingArguments

    default = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}["per_device_train_batch_size"]
    recipe = recipe_with(4 * default)
    assert gradient_accumulation(recipe, 1) == 4
    assert gradient_accumulation(recipe, 2) == 2


@pytest.mark.parametrize(("global_batch", "per_device", "processes"), [(32, 4, 16), (12, 8, 1), (24, 4, 4)])
def test_non_divisible_global_batch_is_an_error(global_batch, per_device, processes):
    recipe = recipe_with(global_batch, per_device_train_batch_size=per_device)
    with pytest.raises(LvitError) as info:
        gradient_accumulation(recipe, processes)
    assert str(info.value).startswith(
        f"batch.yaml: global_batch_size {global_batch} is not a multiple of per_device_train_batch_size "
        f"{per_device} x {processes} process(es) = {per_device * processes}."
    )


def test_without_global_batch_the_recipe_accumulation_is_used():
    assert gradient_accumulation(recipe_with(per_device_train_batch_size=4), 8) == 1
    assert gradient_accumulation(recipe_with(per_device_train_batch_size=4, gradient_accumulation_steps=3), 8) == 3


def test_global_batch_and_accumulation_together_are_rejected(tmp_path):
    raw = with_(None, "global_batch_size", 32)
    raw["training"]["gradient_accumulation_steps"] = 2
    msg = load_error(tmp_path, raw)
    assert "set either global_batch_size or training.gradient_accumulation_steps, not both" in msg


# ---------------------------------------------------------------------------------------------
# the shipped recipes


RECIPE_FILES = sorted(RECIPES_DIR.glob("*.yaml"))  # training recipes; subfolders hold launcher configs


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.stage in STAGES
    assert recipe.source == str(path)
    if recipe.global_batch_size is not None:
        acc = gradient_accumulation(recipe, 1)
        assert acc * recipe.training.get("per_device_train_batch_size", 8) == recipe.global_batch_size


def test_without_training_check_every_lvit_section_is_still_validated(tmp_path, monkeypatch):
    """`check_training=False` (`lvit data check --recipe`) leaves `training:` as written and never asks TRL."""
    import lvit.recipe.fields

    def no_trl():
        raise AssertionError("training: was validated (TRL imported)")

    raw = with_("training", "not_an_sft_option", "anything")
    path = write(tmp_path, raw)
    monkeypatch.setattr(lvit.recipe.fields, "_sft_fields", no_trl)
    recipe = load_recipe(path, ["data.max_length=512"], check_training=False)
    assert recipe.training == raw["training"] and recipe.data.max_length == 512
    assert recipe.source == str(path) and recipe.stage == "finetune"
    for section, key, value, expected in [
        ("data", "max_length", "long", "'data.max_length' should be int"),
        ("data", "max_lenght", 512, "unknown key 'data.max_lenght'. Did you mean 'data.max_length'?"),
        ("model", "projector", "mlp", "'model.projector' should be one of 'linear', 'mlp2x_gelu'"),
        ("lora", "r", "eight", "'lora.r' should be int"),
        ("eval", "metric", "bleu", "'eval.metric' should be one of"),
        (None, "stage", "align", None),
    ]:
        raw = with_(section, key, value)
        if expected is None:  # the checks across sections too
            raw["method"], expected = "lora", "method 'lora' needs stage 'finetune'"
        with pytest.raises(LvitError, match=re.escape(expected)):
            load_recipe(write(tmp_path, raw, "other.yaml"), check_training=False)
    with pytest.raises(LvitError, match="missing required key 'stage'"):
        load_recipe(write(tmp_path, without(None, "stage"), "other.yaml"), check_training=False)
    monkeypatch.undo()
    with pytest.raises(LvitError, match="unknown key 'training.not_an_sft_option'"):
        load_recipe(path)  # the default validates it
