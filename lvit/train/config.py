"""`LlavaSFTConfig`: TRL's `SFTConfig` with the knobs of `LlavaTrainer`, and the config a recipe gives."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import SFTConfig

from lvit.errors import LvitError
from lvit.recipe.load import gradient_accumulation
from lvit.recipe.schema import Recipe
from lvit.train.precision import training_precision

# How the loss is averaged (a difference from LLaVA, kept): transformers 5 divides the summed token loss
# of each micro-batch by the number of trained (label != -100) tokens in the whole global batch, i.e. all
# gradient_accumulation_steps micro-batches on all processes, so every trained token of an optimizer step
# weighs the same. LLaVA (transformers 4.31's Trainer) averaged the loss over each micro-batch's own tokens
# and then averaged those means, so a token in a short micro-batch weighed more. Read in transformers 5.24
# source, trainer.py: `Trainer._get_num_items_in_batch` (counts `labels[..., 1:] != -100` over the
# accumulated micro-batches and, with `average_tokens_across_devices`, default True in training_args.py,
# sums that count over processes) and `Trainer.compute_loss`; and in trl 1.16's `SFTTrainer.compute_loss`
# (trl/trainer/sft_trainer.py), which lvit's trainer uses: summed per-token loss / `num_items_in_batch`,
# times the process count (DDP then averages the gradients over processes).
TOKEN_BUDGET_ONE_PROCESS = (
    "data.max_tokens_per_batch works with one process only: with several, every process must take the same "
    "number of steps, which token-budget micro-batches do not guarantee (accelerate would repeat micro-batches "
    "to even them out). Train on one process, or remove data.max_tokens_per_batch."
)


@dataclass
class LlavaSFTConfig(SFTConfig):
    """`trl.SFTConfig` plus the knobs of `lvit.train.trainer.LlavaTrainer`, validated by the same config machinery.

    A recipe sets them through its own keys (`projector_lr`, `compact_head`, `data.group_by_modality_length`,
    `data.max_tokens_per_batch`: `build_sft_config`), never under `training:`; a library user sets them here.
    """

    projector_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the projector (None: the model's `learning_rate`)."}
    )
    vision_tower_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the vision tower when it trains (None: the model's)."}
    )
    compact_head: bool = field(
        default=False, metadata={"help": "Compute the LM head only where a label is (lvit.train.loss)."}
    )
    group_by_modality: bool = field(
        default=False, metadata={"help": "Every optimizer step only image records or only text-only ones."}
    )
    max_tokens_per_batch: int | None = field(
        default=None, metadata={"help": "Form micro-batches by a token budget (one process only)."}
    )


def build_sft_config(recipe: Recipe, num_processes: int | None = None, check_device: bool = True) -> LlavaSFTConfig:
    """The `LlavaSFTConfig` for a recipe: its `training:` section plus what lvit sets itself."""
    if num_processes is None:
        num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    if recipe.data.max_tokens_per_batch is not None and num_processes > 1:
        raise LvitError(f"{recipe.source}: {TOKEN_BUDGET_ONE_PROCESS}")
    kwargs: dict[str, Any] = dict(recipe.training)
    kwargs.setdefault("output_dir", f"runs/{Path(recipe.source).stem}")
    kwargs["gradient_accumulation_steps"] = gradient_accumulation(recipe, num_processes)
    # Autocast matching 16-bit weights; the trainable ones become fp32 masters (lvit.train.precision).
    kwargs.update(training_precision(recipe))
    # Random batches, as LLaVA samples them: the paper's code shuffles (Trainer's default), and LLaVA-1.5
    # groups by modality only (`--group_by_modality_length`: image and text-only megabatches, each of one
    # step's size and drawn at random; github.com/haotian-liu/LLaVA, llava/train/llava_trainer.py,
    # `get_modality_length_grouped_indices`). It never forms batches of similar length. Resume keeps the order:
    # accelerate's seedable sampler draws from (seed, epoch). A recipe may set "group_by_length" (less padding,
    # seeded per epoch by EpochSeededLengthGroupedSampler), which on lvit's tiny task lowered held-out place
    # accuracy from 94% to 35% (benchmarks/RESULTS.md): a record's length follows its answer there, so such batches
    # hold similar answers.
    kwargs.setdefault("train_sampling_strategy", "random")
    kwargs.update(
        projector_lr=recipe.projector_lr,
        vision_tower_lr=recipe.vision_tower_lr,
        compact_head=recipe.compact_head,
        group_by_modality=recipe.data.group_by_modality_length,
        max_tokens_per_batch=recipe.data.max_tokens_per_batch,
    )
    kwargs.update(
        remove_unused_columns=False,  # the collator needs the raw record columns
        dataset_kwargs={"skip_prepare_dataset": True},  # lvit tokenizes (exact masks) in its collator
        max_length=None,  # lvit enforces data.max_length itself, never cutting image tokens
    )
    if not check_device:
        # Validate the structure on a machine without the recipe's hardware (e.g. a bf16 recipe for
        # A100s checked on a laptop): device-dependent flags are checked by the real run.
        kwargs.update(bf16=False, fp16=False, tf32=None, use_cpu=True)
    try:
        return LlavaSFTConfig(**kwargs)
    except (ValueError, TypeError) as exc:
        raise LvitError(f"{recipe.source}: the training section is not valid: {exc}") from None
