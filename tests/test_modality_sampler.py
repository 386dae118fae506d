"""Modality-grouped sampling (`data.group_by_modality_length`, `lvit/data/modality_sampler.py`)."""

from __future__ import annotations

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from conftest import assert_resumed_steps_match
from torch.utils.data import BatchSampler

from lvit.data.modality_sampler import ModalityGroupedSampler, modality_grouped_indices
from lvit.errors import LvitError


def _has_image(n_image: int, n_text: int, seed: int = 0) -> list[bool]:
    """A mixture in a random (fixed) order, like LLaVA-1.5's 665K: image and text-only records interleaved."""
    flags = [True] * n_image + [False] * n_text
    order = torch.randperm(len(flags), generator=torch.Generator().manual_seed(seed)).tolist()
    return [flags[i] for i in order]


def _steps(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


@pytest.mark.parametrize(
    ("n_image", "n_text", "size"),
    [(40, 13, 4), (37, 11, 8), (32, 16, 8), (50, 0, 8), (0, 9, 4), (3, 2, 8), (45, 7, 6)],
)
def test_every_step_is_one_modality_but_one_of_the_last_two_and_each_sample_comes_once(n_image, n_text, size):
    has_image = _has_image(n_image, n_text)
    order = modality_grouped_indices(has_image, size, torch.Generator().manual_seed(1))
    assert sorted(order) == list(range(len(has_image)))  # each sample exactly once
    steps = _steps(order, size)
    mixed = [k for k, step in enumerate(steps) if len({has_image[i] for i in step}) > 1]
    assert len(mixed) <= 1 and all(k >= len(steps) - 2 for k in mixed), mixed
    if n_image % size + n_text % size <= size:  # the leftovers fit in one step: only the last may mix
        assert all(k == len(steps) - 1 for k in mixed)
    # every full megabatch of each kind is there: no step but the leftovers is partial or mixed
    full = (n_image // size) + (n_text // size)
    assert all(len({has_image[i] for i in step}) == 1 and len(step) == size for step in steps[:full])


def test_the_order_is_random_and_depends_only_on_seed_and_epoch():
    has_image = _has_image(40, 24)
    a, b = ModalityGroupedSampler(has_image, 8, seed=3), ModalityGroupedSampler(has_image, 8, seed=3)
    assert list(a) == list(b) and len(a) == 64
    a.set_epoch(1)
    assert list(a) != list(b)  # a new order each epoch
    b.set_epoch(1)
    assert list(a) == list(b)  # a resumed run (a new sampler, set to the epoch) draws the same order
    assert list(ModalityGroupedSampler(has_image, 8, seed=100)) != list(b)
    # not the records' own order: the steps' modalities are shuffled, not all image steps first
    kinds = [has_image[step[0]] for step in _steps(list(a), 8)[:-2]]
    assert kinds != sorted(kinds, reverse=True)


@pytest.mark.parametrize(("processes", "per_device", "accumulation"), [(2, 2, 2), (4, 1, 3), (2, 4, 1)])
def test_across_ranks_each_step_is_one_megabatch(processes, per_device, accumulation):
    """Through accelerate's batch sharding (what the Trainer's prepared data loader uses), the micro-batches of
    one optimizer step on all ranks together are one single-modality megabatch, and the ranks share the epoch."""
    has_image = _has_image(61, 23)
    size = per_device * processes * accumulation
    sampler = ModalityGroupedSampler(has_image, size, seed=0)
    order = list(sampler)
    ranks = [
        list(BatchSamplerShard(BatchSampler(sampler, per_device, drop_last=False), processes, rank))
        for rank in range(processes)
    ]
    n_steps = len(order) // size
    for step in range(n_steps):
        micro = range(step * accumulation, (step + 1) * accumulation)
        together = sorted(i for batches in ranks for k in micro for i in batches[k])
        assert together == sorted(order[step * size : (step + 1) * size])
    seen = [i for batches in ranks for batch in batches for i in batch]
    assert set(seen) == set(range(len(has_image)))  # (the last step may repeat a few to even the ranks out)


def test_the_sampler_rejects_an_empty_megabatch():
    with pytest.raises(ValueError, match="at least 1"):
        modality_grouped_indices([True], 0, torch.Generator())


def test_recipe_refuses_two_batch_orders(tiny_recipe):
    with pytest.raises(LvitError, match="data.group_by_modality_length orders the batches itself"):
        tiny_recipe(data={"group_by_modality_length": True}, training={"train_sampling_strategy": "group_by_length"})


def test_trainer_uses_it_and_its_batches_are_single_modality(tiny_recipe, tmp_path):
    """`LlavaTrainer` with the recipe key: its data loader's steps are image-only or text-only (the shapes data:
    48 image records, 5 text-only; 2 per device x 2 accumulation = steps of 4)."""
    from lvit.train.run import TrainingRun

    recipe = tiny_recipe(
        out_dir=tmp_path / "run",
        data={"group_by_modality_length": True},
        global_batch_size=4,
        training={"per_device_train_batch_size": 2},
    )
    trainer = TrainingRun(recipe).setup().trainer
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, ModalityGroupedSampler) and sampler.megabatch_size == 4
    batches = list(trainer.get_train_dataloader())
    image_tokens = trainer.model.config.image_token_id
    kinds = [bool((batch["input_ids"] == image_tokens).any(dim=1).all()) for batch in batches]
    text = [not bool((batch["input_ids"] == image_tokens).any()) for batch in batches]
    steps = [(kinds[k] and kinds[k + 1]) or (text[k] and text[k + 1]) for k in range(0, len(batches) - 2, 2)]
    assert all(steps) and any(text)  # every step but the leftovers one modality, and text-only steps exist


@pytest.mark.slow
def test_a_resumed_run_draws_the_same_steps(tiny_recipe, tmp_path):
    """4 steps in one go vs 2 steps, then a run resumed from checkpoint-2: steps 3-4 see the same batches
    (the same trained-token counts) and reach the same losses."""

    def recipe(out):
        return tiny_recipe(
            out_dir=out,
            data={"group_by_modality_length": True},
            global_batch_size=4,
            training={"per_device_train_batch_size": 2, "max_steps": 4, "save_strategy": "steps", "save_steps": 2},
        )

    assert_resumed_steps_match(recipe, tmp_path)
