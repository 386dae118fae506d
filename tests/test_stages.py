"""Training through `lvit.train.run`: what changes and what stays bitwise frozen in each stage."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from lvit.model.assemble import assemble
from lvit.runs.files import PROJECTOR_FILE, RUN_INFO_FILE
from lvit.train.run import TrainingRun, run


def _initial_state(recipe):
    # The run seeds before assembling, so the same seed reproduces its starting weights.
    import transformers

    transformers.set_seed(recipe.training["seed"])
    model, _ = assemble(recipe.model)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_stage1_trains_only_the_projector(tiny_recipe, tmp_path):
    recipe = tiny_recipe("align", out_dir=tmp_path / "s1", training={"max_steps": 3})
    before = _initial_state(recipe)
    out = run(recipe)

    projector = load_file(str(out / PROJECTOR_FILE))
    assert set(projector) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert not torch.equal(projector["linear_1.weight"], before["model.multi_modal_projector.linear_1.weight"])
    assert torch.equal(projector["linear_2.weight"], before["model.multi_modal_projector.linear_2.weight"])
    assert torch.equal(projector["linear_2.bias"], before["model.multi_modal_projector.linear_2.bias"])
    # stage 1 saves no copy of the frozen parts, only the projector + processor + config
    assert not (out / "model.safetensors").exists()
    AutoProcessor.from_pretrained(out)
    info = json.loads((out / RUN_INFO_FILE).read_text())
    assert info["stage"] == "align" and info["projector"] == "linear"


def test_stage1_frozen_parts_are_bitwise_unchanged(tiny_recipe, tmp_path):
    """Inspect the live model after the optimizer steps: every non-projector tensor is bitwise equal."""
    recipe = tiny_recipe("align", out_dir=tmp_path / "s1", training={"max_steps": 3})
    before = _initial_state(recipe)
    training = TrainingRun(recipe).setup().train()
    after = {k: v.detach().clone() for k, v in training.trainer.model.state_dict().items()}
    training.save()
    assert after.keys() == before.keys()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.bias"}


def test_stage2_trains_projector_and_lm_not_clip(tiny_recipe, tmp_path):
    stage1 = run(tiny_recipe("align", out_dir=tmp_path / "s1", training={"max_steps": 2}))
    recipe = tiny_recipe(
        "finetune", out_dir=tmp_path / "s2", model={"projector_from": str(stage1)}, training={"max_steps": 3}
    )
    before = _initial_state(recipe)  # includes the stage-1 projector, loaded by projector_from
    stage1_projector = load_file(str(stage1 / PROJECTOR_FILE))
    torch.testing.assert_close(
        before["model.multi_modal_projector.linear_1.weight"], stage1_projector["linear_1.weight"], rtol=0, atol=0
    )

    out = run(recipe)
    after = LlavaForConditionalGeneration.from_pretrained(out).state_dict()  # plain transformers
    for key, value in before.items():
        if key.startswith("model.vision_tower.") or "multi_modal_projector.linear_2" in key:
            assert torch.equal(after[key], value), f"{key} must stay frozen"
    for key in (
        "model.multi_modal_projector.linear_1.weight",
        "lm_head.weight",
        "model.language_model.layers.0.self_attn.q_proj.weight",
        "model.language_model.embed_tokens.weight",
    ):
        assert not torch.equal(after[key], before[key]), f"{key} should have trained"


def test_projector_learning_rate_group(tiny_recipe, tmp_path):
    recipe = tiny_recipe(
        "finetune", out_dir=tmp_path / "s2", projector_lr=1.0e-4, training={"max_steps": 1, "learning_rate": 1.0e-3}
    )
    trainer = TrainingRun(recipe).setup().train().trainer
    seen = {
        "groups": [
            (g["lr"] if "initial_lr" not in g else g["initial_lr"], len(g["params"]))
            for g in trainer.optimizer.param_groups
        ],
        "projector_ids": {id(p) for p in trainer.model.model.multi_modal_projector.parameters()},
        "group_params": [[id(p) for p in g["params"]] for g in trainer.optimizer.param_groups],
    }
    for (lr, _), ids in zip(seen["groups"], seen["group_params"], strict=True):
        is_projector = all(i in seen["projector_ids"] for i in ids)
        assert is_projector == (lr == pytest.approx(1.0e-4))
        if not is_projector:
            assert lr == pytest.approx(1.0e-3)
    assert any(lr == pytest.approx(1.0e-4) for lr, _ in seen["groups"])


def test_existing_output_folder_is_never_overwritten(tiny_recipe, tmp_path):
    from lvit.errors import LvitError

    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(LvitError, match="exists and is not empty"):
        run(tiny_recipe("align", out_dir=out))
    assert (out / "precious.txt").read_text() == "mine"


def test_batches_are_random_by_default_and_length_grouping_stays_seeded(tiny_recipe):
    """LLaVA samples at random (the paper's shuffle; LLaVA-1.5 groups by modality, never by length)."""
    from lvit.data.length_sampler import EpochSeededLengthGroupedSampler
    from lvit.train.config import build_sft_config

    recipe = tiny_recipe("finetune")
    assert "train_sampling_strategy" not in recipe.training
    assert build_sft_config(recipe).train_sampling_strategy == "random"
    trainer = TrainingRun(recipe).setup().trainer
    sampler = trainer._get_train_sampler()
    assert type(sampler) is torch.utils.data.RandomSampler
    # the Trainer's dataloader makes it accelerate's seedable sampler: the order depends on (seed, epoch) only,
    # so a resumed run sees the same batches (tests/test_resume.py, tests/test_qlora.py)
    assert type(trainer.get_train_dataloader().batch_sampler.sampler).__name__ == "SeedableRandomSampler"

    grouped = TrainingRun(tiny_recipe("finetune", training={"train_sampling_strategy": "group_by_length"})).setup()
    sampler = grouped.trainer._get_train_sampler()
    assert isinstance(sampler, EpochSeededLengthGroupedSampler)
    first = list(sampler)
    assert list(sampler) == first and sorted(first) == list(range(len(first)))  # the same order each time
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_the_trainers_knobs_are_fields_of_its_config(tiny_recipe, tmp_path):
    """TRL's trainer/config pair: `LlavaTrainer`'s knobs live in `LlavaSFTConfig`, set from the recipe's own keys;
    a library user sets them on the config, and a plain `SFTConfig` trains as SFTTrainer does."""
    from trl import SFTConfig

    from lvit.train.config import LlavaSFTConfig, build_sft_config

    recipe = tiny_recipe(projector_lr=1e-4, compact_head=False, data={"group_by_modality_length": True})
    args = build_sft_config(recipe)
    assert isinstance(args, LlavaSFTConfig) and isinstance(args, SFTConfig)
    assert (args.projector_lr, args.compact_head, args.group_by_modality, args.max_tokens_per_batch) == (
        1e-4,
        False,
        True,
        None,
    )
    plain = LlavaSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    assert (plain.projector_lr, plain.compact_head, plain.group_by_modality) == (None, False, False)
    assert "projector_lr" in plain.to_dict()  # saved with the run's training arguments like any other field
