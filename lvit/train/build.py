"""The model a recipe trains (assembled, frozen for its stage, adapters, fp32 masters) and the collator's packing
options."""

from __future__ import annotations

import logging

from lvit.data.packing import LONGEST
from lvit.model.adapters import add_lora
from lvit.model.assemble import assemble
from lvit.model.next import to_next
from lvit.model.packed_attention import PACKED_SDPA, use_packed_sdpa
from lvit.model.stages import apply_stage
from lvit.recipe.attention import VARLEN_ATTENTION, check_attention
from lvit.recipe.schema import Recipe
from lvit.train.precision import upcast_trainable

log = logging.getLogger(__name__)


def packing_options(recipe: Recipe, model) -> dict:
    """The collator's packing arguments for this recipe and model; refuses attention that would mix samples.

    The row layout follows the attention kernel (benchmarks/RESULTS.md, "Packing at max_length 2048"):
    - flash-attention varlen and lvit's packed sdpa (`lvit.model.packed_attention`) cost each sample its own
      attention wherever it sits: one row per micro-batch, no filler (flash reads sample bounds from one row
      only, so it always gets one);
    - eager computes every masked block of a row: rows no longer than the micro-batch's longest sample, so no
      row costs more attention than a row of the padded batch (measured: 1.46x rows of `max_length`);
    - sdpa where the packed kernel does not run (a toy model, a short sliding window): rows of at most
      `max_length` under transformers' block mask, lvit's layout before the packed kernel;
    - `data.max_tokens_per_row` overrides both (a row still holds the longest sample it gets)."""
    data = recipe.data
    if not data.packing:
        return {}

    # the implementation the language model runs with
    attn = model.config.get_text_config()._attn_implementation
    check_attention(attn, f"{recipe.source}: model.attn_implementation")
    if attn in VARLEN_ATTENTION:
        row = None
    elif data.max_tokens_per_row is not None:
        row = data.max_tokens_per_row
    else:
        row = {PACKED_SDPA: None, "sdpa": data.max_length}.get(attn, LONGEST)
    shown = {None: "the whole micro-batch in one row", LONGEST: "rows of at most the micro-batch's longest sample"}
    log.info("packing: %s (%s attention)", shown.get(row, f"rows of at most {row} tokens"), attn)
    return {"packing": True, "max_tokens_per_row": row}


def build_model(recipe: Recipe, args):
    """The recipe's LLaVA model, frozen for its stage, with adapters for lora/qlora and fp32 masters.

    Returns `(model, processor)`; the model is a `PeftModel` for lora/qlora. Seeds first: the
    projector's (and adapters') initialisation is part of the run.
    """
    import transformers

    transformers.set_seed(args.seed)
    model, processor = assemble(
        recipe.model,
        recipe.source,
        quantize_lm=recipe.method == "qlora",
        compute_dtype=recipe.lora.compute_dtype,
        on_cpu=args.use_cpu,
        template=recipe.data.template,
    )
    if recipe.model.architecture == "llava_next":  # AnyRes (lvit/model/next.py)
        model, processor = to_next(model, processor, recipe.model.image_grid_pinpoints, seed=args.seed)
    if recipe.data.packing:
        blocker = use_packed_sdpa(model, recipe.data.max_length)
        if blocker is not None and model.config.get_text_config()._attn_implementation not in VARLEN_ATTENTION:
            log.info("packing: lvit's packed sdpa is not used (%s); rows are budgeted instead", blocker)
    apply_stage(
        model,
        recipe.stage,
        recipe.model.projector,
        train_lm=recipe.method == "full",
        train_tower=recipe.vision_tower_lr is not None,
    )
    if recipe.method != "full":
        model = add_lora(model, recipe.lora, recipe.model.projector)
    if args.deepspeed_plugin is None:
        # fp32 masters for what trains, the rest stays in model.torch_dtype (lvit.train.precision). DeepSpeed keeps
        # its own: its engine casts the module to bf16 (and checks that a ZeRO-Init model's parameters are
        # bf16) and its ZeRO optimizer holds fp32 partitions of the weights and Adam state (DeepSpeed
        # source: deepspeed/runtime/engine.py, `_configure_distributed_model`; docs/code-docs/source/zero3.rst).
        upcast_trainable(model)
        if recipe.vision_tower_lr is not None and recipe.method == "full":
            # the tower's frozen last layer still runs, on the fp32 output of its trained layers: one dtype for all
            model.model.vision_tower.float()
    return model, processor
