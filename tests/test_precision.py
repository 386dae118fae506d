"""Training precision (lvit.train.precision): fp32 master weights for what trains, bf16 compute under autocast.

A bf16 recipe (every paper recipe) trained as loaded updates bf16 weights with bf16 Adam state, and at
lr 2e-5 most of an update rounds away (docs/stack-notes.md#bf16-no-master-weights). Each method here
takes one optimizer step at lr 2e-5 on the tiny model three ways, from the same seed:

- `bf16`: `model.torch_dtype: bfloat16`, `training.bf16: true` (CPU autocast), what lvit does now;
- `bf16_no_masters`: the same with the up-cast disabled, i.e. lvit before fp32 masters;
- `fp32`: the fp32 reference, `model.torch_dtype: float32`, no autocast.

The projector's `linear_1.weight` is compared. To see the numbers:
`PYTHONPATH=$PWD python -m pytest -q -s tests/test_precision.py -k fraction` prints, per method, the
fraction of its entries one step changed with and without fp32 masters and the distance to the fp32 step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import lvit.train.build
import lvit.train.config
import lvit.train.run
from lvit.errors import LvitError

METHODS = ("align", "full", "lora", "qlora")
LR = 2.0e-5  # the paper's stage-2 lr and LLaVA-1.5's mm_projector_lr: the smallest step a recipe takes

# One Adam(W) step moves each entry by about lr * sign(grad) (the first step's m / sqrt(v) is g / |g|),
# so the bf16-compute step and the fp32 step differ where a tiny gradient's sign flips under bf16 rounding
# of the activations, and by the few entries whose |g| is near Adam's eps. Measured (torch 2.13 CPU):
# relative L2 of the update difference 0.077 (align), 0.072 (full), 0.079 (lora), 0.143-0.205 (qlora, varying
# with the batch; its 4-bit layers also compute in bf16), with the sign disagreeing on 0.17-1% of the entries.
# Each flipped sign adds (2 lr)^2, so 0.5% flips alone is 2 * sqrt(0.005) = 0.14. Without fp32 masters the
# distance is above 0.9 (most of the update is lost), so these tolerances separate the two by far.
UPDATE_REL_L2_TOL = {"align": 0.15, "full": 0.15, "lora": 0.15, "qlora": 0.3}
SIGN_AGREEMENT_MIN = {"align": 0.99, "full": 0.99, "lora": 0.99, "qlora": 0.98}
CHANGED_MIN = 0.99


@dataclass
class Step:
    """One optimizer step's effect on the projector's `linear_1.weight`, and the dtypes seen."""

    before: torch.Tensor
    after: torch.Tensor
    param_dtype: torch.dtype
    trainable_dtypes: set
    frozen_dtypes: set
    state_dtypes: set

    @property
    def update(self) -> torch.Tensor:
        return self.after - self.before

    @property
    def changed(self) -> float:
        return (self.after != self.before).float().mean().item()


def _recipe(tiny_recipe, method: str, dtype: str, **overrides):
    bf16 = dtype == "bfloat16"
    extra = {} if method == "align" else {"method": method}
    extra.update(overrides)
    if method in ("lora", "qlora"):
        # no dropout: the bf16 and fp32 runs then see the same network; compute dtype follows the weights
        extra["lora"] = {"r": 8, "alpha": 16, "dropout": 0.0, "compute_dtype": dtype}
    return tiny_recipe(
        "align" if method == "align" else "finetune",
        model={"torch_dtype": dtype},
        training={
            "bf16": bf16,
            "max_steps": 1,
            "learning_rate": LR,
            # no warmup: a warmup step trains at lr 0 (docs/stack-notes.md#warmup-fraction)
            "lr_scheduler_type": "constant",
            "optim": "adamw_torch",
        },
        **extra,
    )


def one_step(tiny_recipe, method: str, dtype: str, masters: bool = True) -> Step:
    """Build the trainer for the recipe and train one optimizer step; `masters=False` disables the up-cast."""
    with pytest.MonkeyPatch.context() as mp:
        if not masters:
            mp.setattr(lvit.train.build, "upcast_trainable", lambda model: 0)
        trainer = lvit.train.run.TrainingRun(_recipe(tiny_recipe, method, dtype)).setup().trainer
    named = dict(trainer.model.named_parameters())
    (param,) = [
        p for n, p in named.items() if p.requires_grad and "multi_modal_projector" in n and "linear_1.weight" in n
    ]
    before = param.detach().float().clone()
    trainer.train()
    state = trainer.optimizer.state
    return Step(
        before=before,
        after=param.detach().float().clone(),
        param_dtype=param.dtype,
        trainable_dtypes={p.dtype for p in named.values() if p.requires_grad},
        frozen_dtypes={p.dtype for p in named.values() if not p.requires_grad and p.is_floating_point()},
        state_dtypes={v.dtype for p in named.values() if p in state for k, v in state[p].items() if k != "step"},
    )


@pytest.fixture(scope="module", params=METHODS)
def steps(request, tiny_recipe) -> tuple[str, dict[str, Step]]:
    method = request.param
    return method, {
        "bf16": one_step(tiny_recipe, method, "bfloat16"),
        "bf16_no_masters": one_step(tiny_recipe, method, "bfloat16", masters=False),
        "fp32": one_step(tiny_recipe, method, "float32"),
    }


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_one_bf16_step_changes_the_projector_fraction(steps):
    method, s = steps
    bf16, before_fix, fp32 = s["bf16"], s["bf16_no_masters"], s["fp32"]
    print(
        f"\n{method}: fraction of projector linear_1.weight entries changed by one step at lr {LR}: "
        f"bf16 without fp32 masters {before_fix.changed:.1%}, with fp32 masters {bf16.changed:.2%}, "
        f"fp32 reference {fp32.changed:.2%}; update vs fp32 (relative L2): with masters "
        f"{_rel_l2(bf16.update, fp32.update):.3f}, without {_rel_l2(before_fix.update, fp32.update):.3f}"
    )
    assert bf16.changed >= CHANGED_MIN
    assert fp32.changed >= CHANGED_MIN
    # what lvit did before fp32 masters: most of the step rounds away (measured 6.4% changed, every method)
    assert before_fix.param_dtype == torch.bfloat16
    assert before_fix.changed < 0.5


def test_one_bf16_step_matches_the_fp32_step(steps):
    method, s = steps
    bf16, before_fix, fp32 = s["bf16"], s["bf16_no_masters"], s["fp32"]
    # same seed, same initial values up to bf16 rounding
    torch.testing.assert_close(bf16.before, fp32.before, rtol=2**-8, atol=0)
    assert _rel_l2(bf16.update, fp32.update) <= UPDATE_REL_L2_TOL[method], method
    assert (bf16.update.sign() == fp32.update.sign()).float().mean().item() >= SIGN_AGREEMENT_MIN[method]
    assert _rel_l2(before_fix.update, fp32.update) > 0.5  # the tolerance tells the two apart


def test_trainable_fp32_frozen_bf16_adam_state_fp32(steps):
    method, s = steps
    bf16 = s["bf16"]
    assert bf16.param_dtype == torch.float32
    assert bf16.trainable_dtypes == {torch.float32}
    assert bf16.frozen_dtypes == {torch.bfloat16}, f"{method}: frozen weights stay in model.torch_dtype"
    assert bf16.state_dtypes == {torch.float32}  # Adam's exp_avg / exp_avg_sq follow the fp32 masters


def test_under_deepspeed_lvit_leaves_the_dtypes_to_deepspeed(tiny_recipe):
    """DeepSpeed casts the module to bf16 and keeps fp32 partitions (docs/stack-notes.md#bf16-no-master-weights)."""
    recipe = _recipe(tiny_recipe, "align", "bfloat16")
    args = lvit.train.run.build_sft_config(recipe)
    args.deepspeed_plugin = object()  # what TrainingArguments holds under `accelerate launch` with DeepSpeed
    model, _ = lvit.train.run.build_model(recipe, args)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}


def test_report_lists_dtypes_per_module(tiny_recipe):
    from lvit.model.stages import format_report, report_modules

    recipe = _recipe(tiny_recipe, "qlora", "bfloat16")
    model, _ = lvit.train.run.build_model(recipe, lvit.train.run.build_sft_config(recipe))
    rows = {r.name: r for r in report_modules(model.get_base_model())}
    assert rows["model.vision_tower"].frozen_dtypes == ("bf16",) and rows["model.vision_tower"].trainable_dtypes == ()
    layers = rows["model.language_model.layers"]
    assert layers.trainable_dtypes == ("fp32",)  # LoRA A/B
    assert set(layers.frozen_dtypes) == {"bf16", "nf4"}  # norms; the 4-bit linears
    table = format_report(list(rows.values()))
    assert table.splitlines()[0].split()[-1] == "dtype"
    line = next(x for x in table.splitlines() if x.startswith("model.language_model.layers"))
    assert line.endswith("trains fp32; frozen bf16,nf4")


# --- the recipe's autocast against its weights' dtype (lvit.train.precision.training_precision) ---------------


def test_bf16_weights_without_a_precision_flag_get_bf16_autocast(tiny_recipe):
    recipe = _recipe(tiny_recipe, "full", "bfloat16")
    del recipe.training["bf16"]
    args = lvit.train.run.build_sft_config(recipe)
    assert args.bf16 is True and args.fp16 is False


@pytest.mark.parametrize(
    ("dtype", "flags", "keys"),
    [
        ("bfloat16", {"bf16": False}, ("model.torch_dtype", "training.bf16")),
        ("bfloat16", {"bf16": True, "fp16": True}, ("model.torch_dtype", "training.fp16")),
        ("float16", {"bf16": True}, ("model.torch_dtype", "training.bf16")),
        ("float16", {"fp16": False}, ("model.torch_dtype", "training.fp16")),
    ],
)
def test_contradictory_precision_is_an_error_naming_the_keys(tiny_recipe, dtype, flags, keys):
    recipe = _recipe(tiny_recipe, "full", dtype)
    recipe.training.pop("bf16")
    recipe.training.update(flags)
    with pytest.raises(LvitError) as err:
        lvit.train.run.build_sft_config(recipe)
    for key in keys:
        assert key in str(err.value)
    assert "<tiny finetune recipe>" in str(err.value)


def test_float16_weights_without_a_flag_get_fp16_autocast(tiny_recipe):
    from lvit.train.precision import training_precision

    recipe = _recipe(tiny_recipe, "full", "float16")
    recipe.training.pop("bf16")
    assert training_precision(recipe) == {"fp16": True, "bf16": False}
    recipe = _recipe(tiny_recipe, "full", "float32")  # fp32 weights: the recipe's own flags stand
    assert training_precision(recipe) == {}


def test_evaluation_during_a_bf16_run_generates_under_autocast(tiny_recipe, shapes_data):
    """In-training evaluation generates with the live model: fp32 projector and LM, bf16 CLIP."""
    recipe = _recipe(tiny_recipe, "full", "bfloat16", eval={"data": str(shapes_data["test"]), "max_new_tokens": 2})
    trainer = lvit.train.run.TrainingRun(recipe).setup().train().trainer
    results = json.loads((Path(trainer.args.output_dir) / "eval" / "results.json").read_text())
    assert results["total"] == len(json.loads(shapes_data["test"].read_text())) and results["step"] == 1


# --- the export keeps what training kept ----------------------------------------------------------------------------


def _tensors(folder: Path, name: str = "*.safetensors") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob(name)):
        out.update(load_file(str(path)))
    return out


@pytest.mark.slow  # two runs and four exports, about 12 s
@pytest.mark.parametrize("method", ["full", "align"])
def test_fp32_and_projector_only_exports_keep_the_fp32_masters_bit_for_bit(tiny_recipe, tmp_path, method):
    """One bf16 step at lr 2e-5 moves every projector entry by about 2e-5, below bf16's resolution for most of them
    (docs/stack-notes.md#bf16-no-master-weights): the run folder keeps them in fp32, and so must `--dtype fp32` and
    `--projector-only`. Rounded to bf16 on the way, only a few percent of the entries would differ from the
    initial projector's."""
    from transformers import LlavaForConditionalGeneration

    from lvit.export.exporter import export

    recipe = _recipe(tiny_recipe, method, "bfloat16")
    run = lvit.train.run.run(recipe)
    saved = _tensors(run)
    prefix = "multi_modal_projector." if method == "full" else ""
    w = saved[f"{prefix}linear_1.weight"]
    assert w.dtype == torch.float32, "the run folder holds the projector's fp32 masters"
    initial = lvit.train.build.build_model(recipe, lvit.train.config.build_sft_config(recipe))[0]
    start = initial.model.multi_modal_projector.linear_1.weight.detach().float()
    assert (w != start).float().mean().item() > CHANGED_MIN and (w.bfloat16().float() != start).float().mean() < 0.5

    projector = export(run, tmp_path / "projector", projector_only=True)
    assert projector.dtype == "fp32"
    written = _tensors(tmp_path / "projector")
    assert written.keys() == {k[len(prefix) :] for k in saved if k.startswith(prefix)}
    for key, tensor in written.items():
        assert torch.equal(tensor, saved[prefix + key].float()), key

    export(run, tmp_path / "fp32", dtype="fp32")
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "fp32", dtype=torch.float32)
    exported = {k: v for k, v in model.state_dict().items() if "multi_modal_projector" in k or method == "full"}
    reloaded = LlavaForConditionalGeneration.from_pretrained(run, dtype=torch.float32) if method == "full" else None
    expected = (
        reloaded.state_dict() if method == "full" else {f"model.multi_modal_projector.{k}": v for k, v in saved.items()}
    )
    assert expected.keys() <= exported.keys()
    for key, tensor in expected.items():  # what trained is fp32 in the run; the frozen rest upcasts exactly
        assert torch.equal(exported[key], tensor.float()), key
