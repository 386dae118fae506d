"""4-bit loading for QLoRA, and turning 4-bit layers back into ordinary ones for export.

Only the language model is quantized: it is loaded on its own, before assembly, so CLIP and the
projector never go through bitsandbytes (no skip-list to get wrong; see docs/stack-notes.md#bnb-skip-modules).
"""

from __future__ import annotations

import torch

# What stays out of 4-bit: the LM head (16-bit) and, in a whole LLaVA model, CLIP and the projector. The list
# replaces bitsandbytes' default one and matches full module paths (docs/stack-notes.md#bnb-skip-modules).
LM_SKIP = ("lm_head",)
LLAVA_SKIP = ("model.vision_tower", "model.multi_modal_projector", "lm_head")


def bnb_config(compute_dtype: torch.dtype = torch.bfloat16, skip: tuple[str, ...] = LM_SKIP):
    """The 4-bit config lvit loads with: QLoRA's (Dettmers et al., 2023) NF4 data type with double quantization,
    computing in `compute_dtype`; the modules `skip` names stay in 16/32 bit (`LM_SKIP` for a language model
    loaded on its own, `LLAVA_SKIP` for a whole LLaVA model)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(skip),
    )


def load_lm_4bit(source: str, dtype: torch.dtype, compute_dtype: torch.dtype, on_cpu: bool = False, **kwargs):
    """A causal LM with its linear layers in 4-bit NF4, on this process's GPU (or the CPU).

    bitsandbytes quantizes while loading onto the device, so the device is chosen here: this
    process's GPU, or the CPU when there is none or `on_cpu` (a recipe with training.use_cpu).
    """
    from transformers import AutoModelForCausalLM

    if torch.cuda.is_available() and not on_cpu:
        from accelerate import PartialState

        device_map = {"": PartialState().local_process_index}
    else:
        device_map = {"": "cpu"}
    lm = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, quantization_config=bnb_config(compute_dtype), device_map=device_map, **kwargs
    )
    disable_cpu_repacking(lm)
    return lm


def linear4bit_modules(model):
    import bitsandbytes as bnb

    return [(name, m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def disable_cpu_repacking(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference format.

    On CPUs with AVX512-BF16, the first no-grad forward of a `Linear4bit` (an eval step, a
    generation) repacks the weight into a format that has no backward; every later training step
    then gets wrong gradients with only a warning (docs/stack-notes.md#bnb-cpu-repacking). Returns the
    number of layers set.
    """
    layers = linear4bit_modules(model)
    for _, module in layers:
        module.support_avx512bf16_for_cpu = False
    return len(layers)


@torch.no_grad()
def dequantize_4bit_layers(model, dtype: torch.dtype = torch.float32) -> int:
    """Replace every 4-bit linear layer of `model` by an `nn.Linear` holding its dequantized weight.

    The new weights are exactly the values the 4-bit layer computed with, so an adapter trained on
    the 4-bit base merges into them without re-quantizing (merging into 4-bit weights re-quantizes and
    loses accuracy: docs/stack-notes.md#qlora-merge-dequantized). Returns the number of layers replaced.
    """
    import bitsandbytes.functional as bnbf

    layers = linear4bit_modules(model)
    for name, module in layers:
        weight = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
        linear = torch.nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device=weight.device, dtype=dtype
        )
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias.to(dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return len(layers)
