"""LLaVA-1.5's recipes (`recipes/llava15_*.yaml`) and its projector.

The dry runs of the shipped recipes are in tests/test_cli.py; here: the recipes hold LLaVA-1.5's design (the
values themselves carry their sources in the recipe files), and lvit's `mlp2x_gelu` is LLaVA's projector.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lvit.recipe.load import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_llava15_recipes_chain_stage1_into_stage2():
    stage1 = load_recipe(RECIPES / "llava15_stage1.yaml")
    for name in ("llava15_stage2.yaml", "llava15_stage2_lora.yaml"):
        stage2 = load_recipe(RECIPES / name)
        assert stage2.model.projector_from == stage1.training["output_dir"]
        assert (stage2.model.vision_tower, stage2.model.language_model, stage2.model.projector) == (
            stage1.model.vision_tower,
            stage1.model.language_model,
            stage1.model.projector,
        )
        assert stage2.data.group_by_modality_length and stage2.data.template == "vicuna_v1"
    assert stage1.data.template == "plain" and not stage1.data.group_by_modality_length


def test_mlp2x_gelu_is_llavas_projector(tiny_parts):
    """LLaVA's `mlp2x_gelu` (llava/model/multimodal_projector/builder.py): Linear(vision, text), nn.GELU() (exact,
    erf), Linear(text, text), both with bias. lvit's projector with the same weights gives the same output."""
    from lvit.model.assemble import assemble
    from lvit.recipe.schema import ModelSection

    vision, lm = tiny_parts
    model, _ = assemble(ModelSection(vision_tower=str(vision), language_model=str(lm), projector="mlp2x_gelu"))
    projector = model.model.multi_modal_projector
    reference = torch.nn.Sequential(
        torch.nn.Linear(projector.linear_1.in_features, projector.linear_1.out_features),
        torch.nn.GELU(),
        torch.nn.Linear(projector.linear_2.in_features, projector.linear_2.out_features),
    )
    reference[0].load_state_dict(projector.linear_1.state_dict())
    reference[2].load_state_dict(projector.linear_2.state_dict())
    features = torch.randn(2, 5, projector.linear_1.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(projector(features), reference(features))
