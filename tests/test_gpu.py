"""Checks that need a CUDA GPU (marked `gpu`; skipped elsewhere): the QLoRA path as a consumer GPU runs it."""

from __future__ import annotations

import math

import pytest
import torch

from lvit.train import run

pytestmark = pytest.mark.gpu


def test_qlora_trains_on_gpu_in_bf16(tiny_recipe, tmp_path, monkeypatch):
    import lvit.train as train_mod
    from lvit.quant import linear4bit_modules

    seen = {}
    real_save = train_mod.save_run

    def spy(trainer, *args, **kwargs):
        model = trainer.model
        seen["devices"] = {p.device.type for p in model.parameters()}
        seen["layers_4bit"] = len(linear4bit_modules(model))
        return real_save(trainer, *args, **kwargs)

    monkeypatch.setattr(train_mod, "save_run", spy)
    out = run(
        tiny_recipe(
            "finetune",
            out_dir=tmp_path / "q",
            method="qlora",
            lora={"r": 8, "alpha": 16},
            training={"use_cpu": False, "bf16": True, "optim": "paged_adamw_8bit", "max_steps": 3},
        )
    )
    assert seen["devices"] == {"cuda"}
    assert seen["layers_4bit"] == 14  # 2 layers x 7 projections of the tiny LM
    import json

    loss = json.loads((out / "lvit_run.json").read_text())["metrics"]["train_loss"]
    assert math.isfinite(loss) and loss > 0
    assert torch.cuda.max_memory_allocated() > 0
