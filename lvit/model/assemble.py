"""Assembling a stock `LlavaForConditionalGeneration` from a separate vision tower (CLIP, SigLIP) and
language model (Llama, Qwen, Mistral, Gemma...).

transformers has no builder from separate parts, so lvit composes a `LlavaConfig`, builds the
LLaVA skeleton on the meta device (no memory) and moves the loaded parts into it. The result is
the stock class: everything lvit saves loads with plain `from_pretrained`, no lvit and no
`trust_remote_code`.

The paper's projector is one matrix W (plus bias). The stock projector is always two linears, so
`projector: linear` is expressed exactly as: `linear_1` = W (trained), activation = identity,
`linear_2` = identity matrix with zero bias, frozen forever. `mlp2x_gelu` (LLaVA-1.5) trains both.
"""

from __future__ import annotations

import logging

import torch

from lvit.errors import LvitError
from lvit.model.hub import resolve_source
from lvit.model.processor import build_processor, load_image_processor, load_tokenizer
from lvit.model.projector import ACTIVATIONS, load_projector, new_projector
from lvit.model.quant import load_lm_4bit
from lvit.model.towers import feature_select_strategy, load_vision_tower, num_image_tokens
from lvit.templates.chat_template import LMChatTemplate
from lvit.templates.conversation import IMAGE_PLACEHOLDER

log = logging.getLogger(__name__)


def assemble(
    model_cfg,
    source: str = "<recipe>",
    quantize_lm: bool = False,
    compute_dtype: str = "bfloat16",
    on_cpu: bool = False,
    template: str = "vicuna_v1",
):
    """Load the recipe's vision tower and language model and join them into a LLaVA model.

    `template` (the recipe's `data.template`) picks the processor's chat template (`build_processor`).
    Returns `(model, processor)`. The projector is freshly initialised, or loaded from
    `model.projector_from` (a stage-1 run folder). Nothing is frozen here; see `lvit.model.stages`.
    With `quantize_lm`, the language model's linear layers (not its LM head, not CLIP, not the
    projector) are loaded in 4-bit NF4 with double quantization (QLoRA).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    vision_src = resolve_source(model_cfg.vision_tower, "model.vision_tower", source)
    lm_src = resolve_source(model_cfg.language_model, "model.language_model", source)
    dtype = getattr(torch, model_cfg.torch_dtype)
    extra = {}
    if model_cfg.attn_implementation:
        extra["attn_implementation"] = model_cfg.attn_implementation

    vision = load_vision_tower(vision_src, dtype, f"{source}: model.vision_tower", **extra)
    image_processor = load_image_processor(vision_src)
    tokenizer = load_tokenizer(lm_src)
    own_size = len(AutoTokenizer.from_pretrained(lm_src))  # before lvit's <image> / pad
    if quantize_lm:
        lm = load_lm_4bit(lm_src, dtype, getattr(torch, compute_dtype), on_cpu=on_cpu, **extra)
    else:
        lm = AutoModelForCausalLM.from_pretrained(lm_src, dtype=dtype, **extra)
    if not hasattr(lm, "model") or not hasattr(lm, "lm_head"):
        raise LvitError(
            f"{source}: model.language_model {model_cfg.language_model!r} is a "
            f"{type(lm).__name__}, not a causal LM with .model and .lm_head (Llama, Qwen2/3, Mistral, Gemma 2/3...)."
        )

    resize_embeddings(lm, len(tokenizer), own_size)
    # Only after resizing (docs/stack-notes.md#pad-token-after-resize).
    lm.config.pad_token_id = tokenizer.pad_token_id
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    strategy = feature_select_strategy(vision.config)
    n_image = num_image_tokens(vision.config, strategy)
    cls_note = "CLS token dropped" if strategy == "default" else "no CLS token"
    log.info(
        "vision tower %s: %d px, patch %d, %s -> %d image tokens per image (feature layer %s, strategy %s)",
        vision.config.model_type,
        vision.config.image_size,
        vision.config.patch_size,
        cls_note,
        n_image,
        model_cfg.vision_feature_layer,
        strategy,
    )

    config = LlavaConfig(
        vision_config=vision.config,
        text_config=lm.config,
        image_token_index=image_token_id,
        projector_hidden_act=ACTIVATIONS[model_cfg.projector],
        vision_feature_layer=model_cfg.vision_feature_layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=n_image,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    model.model.multi_modal_projector = new_projector(config, model_cfg.projector, dtype)
    model.generation_config = lm.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.dtype = dtype
    if model_cfg.attn_implementation:
        # LlavaForConditionalGeneration(config) resolves its own attention (sdpa) onto every sub-config, the LM's
        # and the tower's included (the same config objects): the recipe's choice is set again here
        model.set_attn_implementation(model_cfg.attn_implementation)
    leftover = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if leftover:
        raise RuntimeError(f"lvit bug: parameters left on the meta device after assembly: {leftover[:5]}")

    if model_cfg.projector_from:
        load_projector(model, model_cfg.projector_from, model_cfg.projector, source)
    processor = build_processor(image_processor, tokenizer, vision.config, template)
    if template == "auto":
        _stop_at_end_of_turn(model, tokenizer)
    return model, processor


def _stop_at_end_of_turn(model, tokenizer) -> None:
    """Generation stops at the token that ends an assistant turn in the LM's chat template (Llama 3's
    `<|eot_id|>` is not its tokenizer's EOS): add it to the generation config's EOS ids when missing."""
    end = LMChatTemplate(tokenizer).end_of_turn_id
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if end not in eos:
        model.generation_config.eos_token_id = [*eos, end] if eos else end
        token = tokenizer.convert_ids_to_tokens(end)
        log.info("generation stops at the chat template's end of turn %r (id %d) too", token, end)


def _gathered(params, modifier_rank=None):
    """Under DeepSpeed ZeRO-3 a partitioned weight reads as empty unless gathered."""
    from contextlib import nullcontext

    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def resize_embeddings(lm, size: int, own_size: int | None = None) -> None:
    """Give the tokens lvit added (ids `own_size` .. `size`-1: `<image>`, a pad token) embedding rows, each
    the mean of the rows of the tokenizer's own `own_size` tokens (None: the rows the model has).

    A padded vocabulary (more rows than tokenizer entries, e.g. Qwen2.5's 151,936 rows for 151,665 tokens,
    vocabularies rounded up to a multiple of 64 or 128): the added tokens take the spare rows right after
    the tokenizer's last entry (their ids are the next free ones), and the matrices keep their size, so
    the config's `vocab_size` stays the model's and every id stays below it. Rows are only added when the
    tokenizer outgrows the matrix (Vicuna: 32,000 rows, `<image>` and `<pad>` -> 32,002).

    Deterministic on purpose (transformers' `mean_resizing` samples around the mean): a run's base
    model must be rebuilt bit for bit from its recipe when an adapter is merged into it.
    """
    with _gathered([lm.get_input_embeddings().weight]):
        old = lm.get_input_embeddings().weight.shape[0]
    own = old if own_size is None else min(own_size, old)
    if size == own:
        return
    if size > old:
        lm.resize_token_embeddings(size, mean_resizing=False)
    else:
        log.info(
            "the language model's vocabulary is padded (%d rows for %d tokens): lvit's %d added token(s) take "
            "spare rows %d..%d",
            old,
            own,
            size - own,
            own,
            size - 1,
        )
    embeddings = {id(m): m for m in (lm.get_input_embeddings(), lm.get_output_embeddings()) if m is not None}
    weights = [m.weight for m in embeddings.values()]
    with _gathered(weights, modifier_rank=0), torch.no_grad():
        for weight in weights:
            weight[own:size] = weight[:own].mean(dim=0, keepdim=True)
