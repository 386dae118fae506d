"""Training precision: fp32 master weights for what trains, 16-bit compute through autocast.

A recipe with `model.torch_dtype: bfloat16` (every paper recipe) loads its parts in bf16. Trained as
loaded, a single process would update bf16 weights with bf16 optimizer state, and AdamW's steps of about
`lr` per entry round away (docs/stack-notes.md#bf16-no-master-weights). LLaVA never trains this way: its
DeepSpeed runs keep fp32 master weights (github.com/haotian-liu/LLaVA, scripts/zero3.json with
`bf16.enabled`), and its first code loaded the model in fp32 and trained under bf16 autocast.

lvit does the same in every stage, method and launcher:

- every parameter that trains (the projector, the LM in `full`, LoRA A/B and peft's `modules_to_save`
  copy of the projector) is cast to fp32 after the stage is applied (`upcast_trainable`); the optimizer
  builds its state from these, so it is fp32 too (or the 8-bit optimizer's own scheme);
- frozen weights (CLIP, the LM under LoRA/QLoRA, 4-bit layers) stay in the recipe's dtype, so memory
  grows only by the trainable part;
- compute runs under the Trainer's mixed-precision autocast (`training.bf16` / `training.fp16`),
  which `training_precision` makes match the weights' dtype.

Under FSDP2, accelerate up-casts the trainable parameters as well, except for a model holding 4-bit
weights (QLoRA), which lvit's own up-cast covers; the mixed-precision policy then computes in bf16.
Under DeepSpeed, lvit leaves the dtypes to DeepSpeed, whose ZeRO optimizer keeps fp32 partitions
(`lvit.train.build.build_model`). tests/test_launch_configs.py checks what the shipped launch configs say.
"""

from __future__ import annotations

from typing import Any

from lvit.errors import LvitError

# model.torch_dtype -> the training flag that turns on autocast in that dtype
_AUTOCAST_FLAG = {"bfloat16": "bf16", "float16": "fp16"}


def training_precision(recipe) -> dict[str, Any]:
    """The `bf16` / `fp16` flags for the recipe's `SFTConfig`, checked against `model.torch_dtype`.

    16-bit weights need autocast in their own dtype: the trainable parameters are fp32 masters, and
    without autocast a 16-bit activation would meet an fp32 weight. So:

    - neither flag set: autocast matching the weights (bfloat16 -> `bf16: true`, float16 -> `fp16: true`).
      This is what SFTConfig's own default (`bf16: true`) already gives a bf16 recipe, made explicit and
      extended to float16; a float32 recipe keeps SFTConfig's default;
    - the matching flag set to false, or the other 16-bit flag set to true: an `LvitError` naming the keys.

    Returns the flags to set (empty when the recipe's own settings stand).
    """
    dtype = recipe.model.torch_dtype
    flag = _AUTOCAST_FLAG.get(dtype)
    if flag is None:  # fp32 weights: any autocast (or none) is consistent
        return {}
    other = "fp16" if flag == "bf16" else "bf16"
    training = recipe.training
    if training.get(other):
        raise LvitError(
            f"{recipe.source}: model.torch_dtype is {dtype} but training.{other} is true: {other} autocast over "
            f"{dtype} weights mixes two 16-bit formats. Set training.{flag}: true and training.{other}: false "
            f"(or model.torch_dtype: {'float16' if flag == 'bf16' else 'bfloat16'})."
        )
    if training.get(flag) is False:
        raise LvitError(
            f"{recipe.source}: model.torch_dtype is {dtype} but training.{flag} is false. lvit trains fp32 master "
            f"copies of the trainable weights and needs {flag} autocast for the {dtype} frozen ones. Set "
            f"training.{flag}: true, or model.torch_dtype: float32 to train without autocast."
        )
    return {flag: True, other: False}


def upcast_trainable(model) -> int:
    """Cast every parameter with `requires_grad` to fp32, in place; returns how many were cast.

    Covers peft's `modules_to_save` copy and LoRA A/B (already fp32 from peft). Frozen parameters keep
    their dtype. Call it after the stage is applied and adapters are added, before the optimizer exists.
    """
    import torch

    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast
