"""`vision_tower_lr`: the vision tower trains in stage 2 at its own learning rate (LLaVA-NeXT's stage 2: 2e-6),
with fp32 masters like everything that trains; frozen otherwise, as in LLaVA and LLaVA-1.5."""

from __future__ import annotations

import pytest
import torch

from lvit.errors import LvitError
from lvit.model.stages import apply_stage, report_modules, tower_unused

CHANGED_MIN = 0.99  # an Adam step moves every entry with a gradient; a few may get an exactly-zero one


def _params(module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in module.named_parameters()}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"vision_tower_lr": -1.0}, "a positive number"),
        ({"method": "lora", "vision_tower_lr": 2e-6}, "method 'full'"),
        ({"method": "lora", "lora": {"vision_tower": True}}, "set vision_tower_lr"),
    ],
)
def test_vision_tower_lr_is_checked_with_the_recipe(tiny_recipe, overrides, message):
    with pytest.raises(LvitError, match=message):
        tiny_recipe("finetune", **overrides)
    with pytest.raises(LvitError, match="stage 'align'"):
        tiny_recipe("align", vision_tower_lr=2e-6)


def test_the_tower_trains_up_to_its_feature_layer(tiny_runs):
    """LLaVA's feature layer -2 of the tiny tower's 2 layers: its embeddings, pre-layernorm and first layer train;
    the last layer and the post-layernorm never reach the language model and stay frozen."""
    model = tiny_runs["full"].model
    tower = model.model.vision_tower
    before = _params(model)
    try:
        apply_stage(model, "finetune", "linear", train_tower=True)
        inner = getattr(tower, "vision_model", tower)
        prefix = "vision_model." if inner is not tower else ""
        assert tower_unused(tower, model.config) == [f"{prefix}encoder.layers.1", f"{prefix}post_layernorm"]
        trains = _params(tower)
        assert all(trains[n] for n in trains if "layers.0." in n or "embeddings" in n or "pre_layrnorm" in n)
        assert not any(trains[n] for n in trains if "layers.1." in n or "post_layernorm" in n)
        row = next(r for r in report_modules(model) if r.name == "model.vision_tower")
        assert row.trainable and row.frozen  # "partly trains" in the run's log
        apply_stage(model, "finetune", "linear")  # the default: frozen, as before
        assert not any(p.requires_grad for p in tower.parameters())
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(before[name])


@pytest.mark.slow  # a bf16 run of 2 steps per architecture, about 6 s each
@pytest.mark.parametrize("architecture", ["llava", "llava_next"])
def test_a_bf16_tower_update_at_2e_6_reaches_its_fp32_masters(tiny_recipe, architecture):
    """At lr 2e-6 a step moves an entry by about 2e-6, far below bf16's resolution: only fp32 masters keep it. The
    run folder holds the tower's masters; every entry of the trained part moved from the initial tower, the unused
    last layer did not, and the optimizer gave the tower its own learning rate. LLaVA-NeXT's tower sees every tile
    of each image (AnyRes) and trains the same way."""
    import lvit.train.build
    import lvit.train.config
    from lvit.train.run import TrainingRun

    recipe = tiny_recipe(
        "finetune",
        vision_tower_lr=2e-6,
        model={"torch_dtype": "bfloat16", "architecture": architecture},
        data={"max_length": 512},
        training={"bf16": True, "max_steps": 2},
    )
    initial = lvit.train.build.build_model(recipe, lvit.train.config.build_sft_config(recipe))[0]
    start = {n: p.detach().float().clone() for n, p in initial.model.vision_tower.named_parameters()}
    training = TrainingRun(recipe).setup()
    tower = training.trainer.model.model.vision_tower
    assert all(p.dtype == torch.float32 for p in tower.parameters() if p.requires_grad)  # fp32 masters
    training.train()
    lrs = {id(p): g["initial_lr"] if "initial_lr" in g else g["lr"] for g in training.trainer.optimizer.param_groups
           for p in g["params"]}  # fmt: skip
    trained = {n: p for n, p in tower.named_parameters() if p.requires_grad}
    assert trained and all(lrs[id(p)] == 2e-6 for p in trained.values())
    for name, param in tower.named_parameters():
        moved = (param.detach().float() != start[name]).float().mean().item()
        if param.requires_grad:
            assert moved >= CHANGED_MIN, name
            # in bf16 most of these steps would round away (not at zero, where any step is representable)
            big = start[name].abs() > 1e-3
            if big.any():
                rounded = param.detach().bfloat16().float()[big] != start[name][big]
                assert rounded.float().mean().item() < 0.5, name
        else:
            assert moved == 0.0, name


@pytest.mark.slow  # a LoRA and a QLoRA run of 2 steps and their exports, about 25 s
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_on_the_tower_trains_merges_and_exports(tiny_recipe, tmp_path, method):
    """`lora.vision_tower`: adapters on the tower's linears up to the feature layer (none on the unused last layer),
    saved with the run's adapter, at `vision_tower_lr`; the export merges them (its self-check compares logits with
    the run's model) and its tower differs from the base where, and only where, adapters were."""
    from safetensors import safe_open
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration

    from lvit.export.exporter import export
    from lvit.train.run import run

    recipe = tiny_recipe(
        "finetune",
        out_dir=tmp_path / "run",
        method=method,
        lora={"r": 8, "alpha": 16, "vision_tower": True},
        vision_tower_lr=1e-3,
        training={"max_steps": 2},
    )
    out = run(recipe)
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        tower_keys = [k for k in f.keys() if "vision_tower" in k and "lora_" in k]  # noqa: SIM118
    assert tower_keys and all("layers.0." in k for k in tower_keys)  # the unused last layer has none
    result = export(out, tmp_path / "export", dtype="fp32")
    assert result.max_abs_diff <= result.tolerance
    exported = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export", dtype=torch.float32)
    base_tower = CLIPVisionModel.from_pretrained(recipe.model.vision_tower).state_dict()
    tower = exported.model.vision_tower.state_dict()
    for key, tensor in tower.items():
        adapted = "layers.0." in key and any(p in key for p in ("q_proj.weight", "v_proj.weight", "fc1.weight"))
        if adapted:
            assert not torch.equal(tensor, base_tower[key].float()), key
        if "layers.1." in key or "post_layernorm" in key:
            assert torch.equal(tensor, base_tower[key].float()), key
