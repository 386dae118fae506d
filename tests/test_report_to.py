"""training.report_to: an integration whose package is missing stops the run before anything loads; TensorBoard
(the `tensorboard` extra) writes the training loss into the run folder."""

from __future__ import annotations

import importlib.util

import pytest

from lvit.errors import LvitError


def test_a_missing_integration_stops_the_run_before_any_model_loads(tiny_recipe, tmp_path, monkeypatch):
    import lvit.train.build
    from lvit.train.run import TrainingRun

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before training.report_to was checked")

    monkeypatch.setattr(lvit.train.build, "assemble", no_loading)
    find_spec = importlib.util.find_spec
    hidden = {"tensorboard", "tensorboardX"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else find_spec(name, *a))
    recipe = tiny_recipe(out_dir=tmp_path / "out", training={"report_to": ["tensorboard"]})
    with pytest.raises(LvitError) as info:
        TrainingRun(recipe).setup()
    assert str(info.value) == (
        "<tiny finetune recipe>: training.report_to names 'tensorboard', but its package (tensorboard or "
        'tensorboardX) is not installed: `pip install "lvit[tensorboard]"`, or set `training.report_to=none`.'
    )
    assert not (tmp_path / "out").exists()


def test_tensorboard_writes_the_training_loss_into_the_run_folder(tiny_recipe, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lvit.train.run import run

    out = tmp_path / "run"
    recipe = tiny_recipe("align", out_dir=out, training={"report_to": "tensorboard", "max_steps": 3})
    run(recipe)
    # the Trainer's default logging_dir: <output_dir>/runs/<date>_<host>
    (events,) = (out / "runs").glob("*/events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    losses = acc.Scalars("train/loss")
    assert [s.step for s in losses] == [1, 2, 3]  # logging_steps 1
    assert all(s.value > 0 for s in losses)
