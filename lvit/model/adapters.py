"""LoRA adapters for stage 2 (methods `lora` and `qlora`), on the language model (and, with `lora.vision_tower`,
on the vision tower up to its feature layer).

`target_modules="all-linear"` or a list of names like `q_proj` would also adapt CLIP's layers
(docs/stack-notes.md#peft-targets-hit-clip), so the targets are found by walking the language model
and anchored to its path.
The projector trains fully: it is a peft `modules_to_save`, so it is saved with the adapter and
restored on resume. LLaVA-NeXT's `image_newline` trains fully too, saved beside the adapter by lvit's trainer
(`lvit.model.next.NEWLINE_FILE`).
"""

from __future__ import annotations

import re

import torch

from lvit.model.next import newline_of
from lvit.model.projector import freeze_identity
from lvit.model.stages import tower_unused


def lm_linear_targets(model) -> str:
    """A peft `target_modules` regex matching every linear layer of the LLaVA model's language model."""
    import bitsandbytes as bnb

    names = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.model.language_model.named_modules()
            if isinstance(m, (torch.nn.Linear, bnb.nn.Linear4bit))
        }
    )
    if not names:
        raise ValueError("the language model has no linear layers to adapt")
    return rf"model\.language_model\..*\.({'|'.join(re.escape(n) for n in names)})"


def tower_linear_targets(model) -> str:
    """A peft `target_modules` regex matching the vision tower's linear layers up to its feature layer (the later
    ones never reach the language model: `lvit.model.stages.tower_unused`)."""
    tower = model.model.vision_tower
    unused = tuple(f"model.vision_tower.{name}" for name in tower_unused(tower, model.config))
    names = sorted(
        f"model.vision_tower.{name}"
        for name, m in tower.named_modules()
        if isinstance(m, torch.nn.Linear) and not f"model.vision_tower.{name}".startswith(unused)
    )
    if not names:
        raise ValueError("the vision tower has no linear layers to adapt")
    return "|".join(re.escape(n) for n in names)


def add_lora(model, lora, projector: str):
    """Wrap an assembled, stage-frozen LLaVA model with LoRA adapters; returns the `PeftModel`. `lora.vision_tower`
    adds adapters to the tower's linear layers too."""
    from peft import LoraConfig, get_peft_model

    targets = lm_linear_targets(model)
    if lora.vision_tower:
        targets = f"(?:{targets})|(?:{tower_linear_targets(model)})"
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=["multi_modal_projector"],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    freeze_identity(peft_model, projector)  # modules_to_save made a trainable copy of the whole projector
    newline = newline_of(peft_model)
    if newline is not None:  # LLaVA-NeXT's row ends: peft froze them; they train, saved beside the adapter
        newline.requires_grad_(True)
    return peft_model
