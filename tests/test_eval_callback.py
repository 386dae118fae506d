"""Evaluation during training (a recipe's `eval:` section): what it writes, and that it never changes training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

import lvit.eval.callback
from lvit.errors import LvitError
from lvit.infer.answers import generate_file
from lvit.infer.generation import GenerationSettings
from lvit.infer.load import load_model
from lvit.infer.questions import read_questions

MAX_NEW = 4


def eval_section(shapes_data, **extra) -> dict:
    return {"data": str(shapes_data["test"]), "metric": "exact_match", "max_new_tokens": MAX_NEW, **extra}


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    state = json.loads(next(run_dir.glob("checkpoint-*/trainer_state.json")).read_text())
    return [(e["step"], e["loss"], e["grad_norm"]) for e in state["log_history"] if "loss" in e]


@pytest.fixture(scope="module")
def full_run_with_eval(tiny_recipe, shapes_data, tmp_path_factory) -> Path:
    from lvit.train.run import run

    out = tmp_path_factory.mktemp("eval-full") / "run"
    return run(
        tiny_recipe(
            "finetune",
            out_dir=out,
            eval=eval_section(shapes_data, every_n_steps=2),
            training={"max_steps": 5, "learning_rate": 3e-3},
        )
    )


def test_results_and_answers_in_the_run_folder(full_run_with_eval, shapes_data):
    run_dir = full_run_with_eval
    questions = read_questions(shapes_data["test"])
    for folder, step in ((run_dir / "eval" / "step-2", 2), (run_dir / "eval" / "step-4", 4), (run_dir / "eval", 5)):
        results = json.loads((folder / "results.json").read_text())
        rows = [json.loads(line) for line in (folder / "answers.jsonl").read_text().splitlines()]
        assert results["step"] == step and results["metric"] == "exact_match" and results["total"] == len(questions)
        assert [r["id"] for r in rows] == [q.id for q in questions]
        assert results["correct"] == sum(r["answer"].lower() == r["reference"].lower() for r in rows)
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == ["answers.jsonl", "results.json", "step-2", "step-4"]


def test_final_evaluation_matches_the_saved_model(full_run_with_eval, shapes_data, tmp_path):
    """The end-of-training answers are what `lvit generate` gives with the saved run."""
    questions = read_questions(shapes_data["test"])
    rows = generate_file(
        load_model(full_run_with_eval, device="cpu"),
        questions,
        tmp_path / "a.jsonl",
        shapes_data["images"],
        GenerationSettings(MAX_NEW),
        progress=False,
    )
    saved = [json.loads(line) for line in (full_run_with_eval / "eval" / "answers.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in saved] == [rows[q.id]["answer"] for q in questions]


def test_qlora_training_is_unchanged_by_evaluation(tiny_recipe, shapes_data, tmp_path, monkeypatch):
    """Same seed, same data: identical losses, gradient norms and adapter weights with and without an
    evaluation after every step; no 4-bit layer is repacked into bitsandbytes' CPU inference format."""
    from lvit.train.run import run

    checked = []
    evaluate = lvit.eval.callback.EvalCallback.evaluate

    def evaluate_and_check(self, model, *args, **kwargs):
        from lvit.model.quant import linear4bit_modules

        result = evaluate(self, model, *args, **kwargs)
        layers = linear4bit_modules(model)
        assert layers and all(not m.support_avx512bf16_for_cpu for _, m in layers)
        assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for _, m in layers)
        assert model.training  # back in training mode
        checked.append(result["step"])
        return result

    monkeypatch.setattr(lvit.eval.callback.EvalCallback, "evaluate", evaluate_and_check)

    def train(name, **extra):
        return run(
            tiny_recipe(
                "finetune",
                out_dir=tmp_path / name,
                method="qlora",
                lora={"r": 8, "alpha": 16},  # dropout 0.05: the random state matters too
                training={"optim": "adamw_torch", "max_steps": 3, "save_strategy": "steps", "save_steps": 3},
                **extra,
            )
        )

    plain = train("plain")
    evaluated = train("evaluated", eval=eval_section(shapes_data, every_n_steps=1))
    assert checked == [1, 2, 3]
    assert losses(evaluated) == losses(plain) and len(losses(plain)) == 3
    a = load_file(str(plain / "adapter_model.safetensors"))
    b = load_file(str(evaluated / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert json.loads((evaluated / "eval" / "results.json").read_text())["total"] == 16


def test_eval_inputs_are_checked_before_any_model_loads(tiny_recipe, shapes_data, tmp_path):
    from lvit.train.run import run

    bogus_model = {"vision_tower": str(tmp_path / "no-clip")}
    with pytest.raises(LvitError, match=r"eval\.data = .*nope\.json.*file not found"):
        run(tiny_recipe(out_dir=tmp_path / "a", model=bogus_model, eval={"data": str(tmp_path / "nope.json")}))
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps([{"id": "q", "conversations": [{"from": "human", "value": "Hi?"}]}]))
    with pytest.raises(LvitError, match="1 question.s. have no reference answer"):
        run(tiny_recipe(out_dir=tmp_path / "b", model=bogus_model, eval={"data": str(questions)}))
    with pytest.raises(LvitError, match=r"eval\.metric"):
        tiny_recipe(eval={"data": str(questions), "metric": "bleu"})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
