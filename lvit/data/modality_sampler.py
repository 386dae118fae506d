"""Modality-grouped sampling (recipe key `data.group_by_modality_length`): each optimizer step draws only
image records or only text-only records, as LLaVA-1.5 trains on its 665K mixture.

LLaVA-1.5 (github.com/haotian-liu/LLaVA, scripts/v1_5/finetune.sh: `--group_by_modality_length True`;
llava/train/llava_trainer.py, `get_modality_length_grouped_indices`) shuffles the image records and the
text-only records apart, cuts each into "megabatches" of one optimizer step's samples (per-device batch x
processes x accumulation), shuffles the order of the megabatches, and ends the epoch with the leftovers of
both kinds together. lvit does the same with two differences, both its own choices: the leftovers are only
the partial megabatches (LLaVA also puts each kind's last full one there), and a megabatch keeps its random
order inside (LLaVA sorts it by length and balances the per-rank chunks; lvit normalises the loss over the
whole global batch, so the step's gradient does not depend on how its samples are split).

So every step of an epoch is single-modality except at most one, among the last two (the leftovers: image
ones first, then text-only ones). The order depends only on (seed, epoch), so a resumed run draws the same
batches as the run it continues (as `lvit.data.length_sampler.EpochSeededLengthGroupedSampler` does for length
grouping).

Several processes: the sampler yields the global order; accelerate's data loader cuts it into per-device
batches and gives batch k to rank k mod world size (`BatchSamplerShard`), so the per-device batches of
one step, on all ranks, are exactly one megabatch.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


def modality_grouped_indices(has_image: list[bool], megabatch_size: int, generator: torch.Generator) -> list[int]:
    """Every index of `has_image` once, in megabatches of `megabatch_size` that hold one modality each,
    in random order; the partial megabatches of both modalities last (image ones first)."""
    if megabatch_size < 1:
        raise ValueError(f"megabatch_size must be at least 1, got {megabatch_size}")
    kinds = ([i for i, m in enumerate(has_image) if m], [i for i, m in enumerate(has_image) if not m])
    full: list[list[int]] = []
    leftovers: list[int] = []
    for indices in kinds:
        shuffled = [indices[k] for k in torch.randperm(len(indices), generator=generator).tolist()]
        cut = len(shuffled) - len(shuffled) % megabatch_size
        full += [shuffled[i : i + megabatch_size] for i in range(0, cut, megabatch_size)]
        leftovers += shuffled[cut:]
    order = torch.randperm(len(full), generator=generator).tolist()
    return [i for k in order for i in full[k]] + leftovers


class ModalityGroupedSampler(Sampler[int]):
    """Indices in single-modality megabatches (`modality_grouped_indices`), the same order for the same
    (seed, epoch). `has_image[i]`: whether record i has an image; `megabatch_size`: one optimizer step's
    samples over all processes."""

    def __init__(self, has_image: list[bool], megabatch_size: int, seed: int):
        self.has_image = list(has_image)
        self.megabatch_size = megabatch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.has_image)

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return iter(modality_grouped_indices(self.has_image, self.megabatch_size, generator))
