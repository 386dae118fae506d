"""Token-budget micro-batches (`data.max_tokens_per_batch`, lvit/data/token_budget.py)."""

from __future__ import annotations

import random

import pytest
from conftest import assert_resumed_steps_match

from lvit.data.token_budget import TokenBudgetBatchSampler, budget_batches
from lvit.errors import LvitError


def _lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, 50) for _ in range(n)]


@pytest.mark.parametrize("budget", [50, 64, 200])
def test_every_micro_batch_is_within_budget_and_every_sample_comes_once_an_epoch(budget):
    lengths = _lengths(97)
    sampler = TokenBudgetBatchSampler(lengths, [f"r{i}" for i in range(97)], budget, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert all(sum(lengths[i] for i in b) <= budget for b in batches)
        assert sorted(i for b in batches for i in b) == list(range(97))


def test_batches_are_filled_in_order_up_to_the_budget():
    # in order: 30 | 30+20 | 40+10 (the 10 would fit the first batch, but a batch closes when one does not fit)
    assert budget_batches([30, 30, 20, 40, 10], [0, 1, 2, 3, 4], 50) == [[0], [1, 2], [3, 4]]
    with pytest.raises(ValueError, match="over the budget"):
        budget_batches([30, 60], [0, 1], 50)


def test_the_order_depends_only_on_seed_and_epoch():
    lengths = _lengths(60)
    ids = [str(i) for i in range(60)]

    def order(seed, epoch):
        s = TokenBudgetBatchSampler(lengths, ids, 80, seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(1, 0) == order(1, 0) and order(1, 2) == order(1, 2)
    assert order(1, 0) != order(1, 1)  # a new order each epoch
    assert order(1, 0) != order(2, 0)
    # the micro-batches themselves are the same every epoch (the Trainer reads their count once)
    assert sorted(map(sorted, order(1, 0))) == sorted(map(sorted, order(1, 1)))


def test_a_record_longer_than_the_budget_is_refused_by_id():
    with pytest.raises(LvitError, match=r"'long-one' \(90 tokens\).*at least 90"):
        TokenBudgetBatchSampler([10, 90, 20], ["a", "long-one", "b"], 64, seed=0)
    with pytest.raises(LvitError, match="at least 1"):
        TokenBudgetBatchSampler([1], ["a"], 0, seed=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data": {"max_tokens_per_batch": 512, "group_by_modality_length": True}}, "cannot be combined"),
        (
            {"data": {"max_tokens_per_batch": 512}, "training": {"train_sampling_strategy": "group_by_length"}},
            "cannot be combined",
        ),
        (
            {"data": {"max_tokens_per_batch": 512}, "training": {"train_sampling_strategy": "batch_rebalance"}},
            "cannot be combined",
        ),
        ({"data": {"max_tokens_per_batch": 512}}, "global_batch_size: null"),
        ({"data": {"max_tokens_per_batch": 0}, "global_batch_size": ...}, "at least 1"),
    ],
)
def test_recipe_refuses_conflicting_options(tiny_recipe, overrides, message):
    with pytest.raises(LvitError, match=message):
        tiny_recipe(**overrides)


def test_more_than_one_process_is_refused(tiny_recipe):
    from lvit.train.config import build_sft_config

    recipe = tiny_recipe(data={"max_tokens_per_batch": 512}, global_batch_size=...)
    build_sft_config(recipe, num_processes=1, check_device=False)
    with pytest.raises(LvitError, match="one process only"):
        build_sft_config(recipe, num_processes=2, check_device=False)


@pytest.mark.parametrize("packing, accumulation", [(False, 1), (True, 2)])
def test_a_training_run_takes_its_steps_from_the_budget_batches(tiny_recipe, tmp_path, packing, accumulation):
    """One epoch: the trainer's micro-batches are the sampler's (each within budget, each sample once) and the
    logged optimizer steps are the budget micro-batches, `accumulation` to a step."""
    from lvit.train.run import TrainingRun

    budget = 600
    recipe = tiny_recipe(
        out_dir=tmp_path / "run",
        data={"max_tokens_per_batch": budget, "packing": packing},
        global_batch_size=...,
        training={
            "max_steps": ...,
            "num_train_epochs": 1,
            "gradient_accumulation_steps": accumulation,
            "logging_steps": 1,
        },
    )
    run = TrainingRun(recipe).setup()
    trainer = run.trainer
    sampler = trainer.token_budget
    lengths = trainer.train_dataset["length"]
    assert 2 < len(sampler) < len(lengths)  # the budget makes micro-batches of several samples, of varying sizes
    assert len({len(b) for b in sampler.batches}) > 1
    loader = trainer.get_train_dataloader()
    sampler.set_epoch(0)
    batches = list(loader)
    expected = list(sampler)
    if packing:  # padding-free rows: their real tokens (row_lengths: without the filler)
        real = [int(b["row_lengths"].sum()) for b in batches]
    else:
        assert [len(b["input_ids"]) for b in batches] == [len(b) for b in expected]
        real = [int(b["attention_mask"].sum()) for b in batches]
    assert real == [sum(lengths[i] for i in b) for b in expected] and max(real) <= budget
    run.train()
    steps = [e for e in run.history_entries() if "loss" in e]
    assert trainer.state.global_step == len(steps) == -(-len(sampler) // accumulation)
    assert sampler.samples_drawn(trainer.state.global_step, accumulation) == len(lengths)  # one epoch
    assert sampler.samples_drawn(1, accumulation) == sum(len(b) for b in expected[:accumulation])


def test_a_record_over_the_budget_stops_the_run_before_training(tiny_recipe, tmp_path):
    from lvit.train.run import TrainingRun

    recipe = tiny_recipe(out_dir=tmp_path / "run", data={"max_tokens_per_batch": 40}, global_batch_size=...)
    with pytest.raises(LvitError, match=r"data.max_tokens_per_batch = 40: \d+ record\(s\) are longer .* e\.g\. '"):
        TrainingRun(recipe).setup()


def test_a_resumed_run_draws_the_same_micro_batches(tiny_recipe, tmp_path):
    """4 steps in one go vs 2 steps, then a run resumed from checkpoint-2: steps 3-4 see the same micro-batches
    (the same trained-token counts) and reach the same losses."""

    def recipe(out):
        return tiny_recipe(
            out_dir=out,
            data={"max_tokens_per_batch": 600},
            global_batch_size=...,
            training={"gradient_accumulation_steps": 1, "max_steps": 4, "save_strategy": "steps", "save_steps": 2},
        )

    assert_resumed_steps_match(recipe, tmp_path)
