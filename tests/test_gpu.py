"""Checks that need a CUDA GPU (marked `gpu`; skipped elsewhere): the QLoRA path as a consumer GPU runs it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lvit.runs.files import RUN_INFO_FILE
from lvit.train.run import TrainingRun

pytestmark = pytest.mark.gpu


def test_qlora_trains_on_gpu_in_bf16(tiny_recipe, tmp_path):
    from lvit.model.quant import linear4bit_modules

    recipe = tiny_recipe(
        "finetune",
        out_dir=tmp_path / "q",
        method="qlora",
        lora={"r": 8, "alpha": 16},
        training={"use_cpu": False, "bf16": True, "optim": "paged_adamw_8bit", "max_steps": 3},
    )
    training = TrainingRun(recipe).setup().train()
    model = training.trainer.model
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert len(linear4bit_modules(model)) == 14  # 2 layers x 7 projections of the tiny LM
    out = training.save()
    loss = json.loads((out / RUN_INFO_FILE).read_text())["metrics"]["train_loss"]
    assert math.isfinite(loss) and loss > 0
    assert torch.cuda.max_memory_allocated() > 0
