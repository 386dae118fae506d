"""Assembling a stock `LlavaForConditionalGeneration` from a separate CLIP and language model.

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
from lvit.hub import resolve_source
from lvit.templates import IMAGE_PLACEHOLDER, VICUNA_V1_CHAT_TEMPLATE

log = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
_ACT = {"linear": "linear", "mlp2x_gelu": "gelu"}

IMAGE_PROCESSOR_BACKEND = "pil"
"""The CLIP image processor backend lvit trains, infers and exports with: PIL, as LLaVA (whose
`CLIPImageProcessor` in transformers 4.x was the PIL one). transformers 5 picks its torchvision
backend whenever torchvision is installed, whatever a saved config says; the two differ by up to
about 0.2 in normalised pixel units in a side-by-side check
(docs/stack-notes.md#image-processor-backend)."""


def num_image_tokens(vision_config) -> int:
    """Patch tokens per image with the CLS token dropped: (H/p)*(W/p), 256 for ViT-L/14 at 224 px."""
    return (vision_config.image_size // vision_config.patch_size) ** 2


def load_tokenizer(language_model: str):
    """The language model's tokenizer with LLaVA's image token and a pad token added if missing."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(language_model)
    additions = []
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        additions.append(IMAGE_PLACEHOLDER)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if additions:
        tokenizer.add_special_tokens({"additional_special_tokens": additions})
    tokenizer.padding_side = "right"
    if hasattr(tokenizer, "legacy"):
        # transformers 5.24 saves a Llama tokenizer without its `legacy` flag (not kept in `init_kwargs`),
        # so a legacy one reloads from the run or the export as non-legacy and tokenizes differently
        # (docs/stack-notes.md#llama-legacy-dropped-on-save); kept, it is written to tokenizer_config.json.
        tokenizer.init_kwargs["legacy"] = tokenizer.legacy
    check_round_trip(tokenizer, language_model)
    return tokenizer


def load_image_processor(source):
    """The PIL backend of the image processor saved at `source` (a hub id, or a model / run / export folder)."""
    from transformers import AutoImageProcessor
    from transformers.image_processing_backends import PilBackend

    image_processor = AutoImageProcessor.from_pretrained(source, backend=IMAGE_PROCESSOR_BACKEND)
    if not isinstance(image_processor, PilBackend):  # transformers falls back to another backend if it has no PIL one
        raise LvitError(
            f"{source}: its image processor ({type(image_processor).__name__}) has no PIL backend; "
            "lvit trains and runs LLaVA with the PIL CLIP image processor."
        )
    return image_processor


def load_processor(path):
    """A saved LLaVA processor with its image processor pinned to the PIL backend (`load_image_processor`).

    Not `AutoProcessor.from_pretrained(path, backend="pil")`: transformers 5.24 hands that keyword to
    the tokenizer too, which then reports `backend == "pil"` and saves it (docs/stack-notes.md#image-processor-backend).
    """
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    processor.image_processor = load_image_processor(path)
    return processor


def check_round_trip(tokenizer, source: str = "") -> None:
    """Refuse a tokenizer that tokenizes differently once saved and loaded back (as the run and the export
    save it): the model would be given other ids at inference than in training."""
    import tempfile

    from transformers import AutoTokenizer

    probe = (
        f"{tokenizer.bos_token or ''}A chat. USER: {IMAGE_PLACEHOLDER}\nWhat is it? ASSISTANT: a red  square"
        f"{tokenizer.eos_token or ''}USER: \n  Why?\tok ASSISTANT:"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        reloaded = AutoTokenizer.from_pretrained(tmp)
    before = tokenizer(probe, add_special_tokens=False)["input_ids"]
    after = reloaded(probe, add_special_tokens=False)["input_ids"]
    if before != after:
        raise LvitError(
            f"the tokenizer of {source or 'the language model'} ({type(tokenizer).__name__}) tokenizes differently "
            f"after save_pretrained and from_pretrained ({tokenizer.convert_ids_to_tokens(before)[:12]} ... becomes "
            f"{reloaded.convert_ids_to_tokens(after)[:12]} ...): a model trained with it would be given other ids "
            "by the saved run and the export. Save the tokenizer once (`AutoTokenizer.from_pretrained(...)."
            "save_pretrained(folder)`) and point model.language_model's tokenizer files at that folder."
        )


def build_processor(image_processor, tokenizer, vision_config):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        # CLIP's CLS token: the processor subtracts one for "default" (docs/stack-notes.md#processor-image-tokens)
        num_additional_image_tokens=1,
        chat_template=VICUNA_V1_CHAT_TEMPLATE,
    )


def assemble(
    model_cfg,
    source: str = "<recipe>",
    quantize_lm: bool = False,
    compute_dtype: str = "bfloat16",
    on_cpu: bool = False,
):
    """Load the recipe's vision tower and language model and join them into a LLaVA model.

    Returns `(model, processor)`. The projector is freshly initialised, or loaded from
    `model.projector_from` (a stage-1 run folder). Nothing is frozen here; see `lvit.stages`.
    With `quantize_lm`, the language model's linear layers (not its LM head, not CLIP, not the
    projector) are loaded in 4-bit NF4 with double quantization (QLoRA).
    """
    from transformers import (
        AutoModelForCausalLM,
        CLIPVisionModel,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )
    from transformers.utils import logging as hf_logging

    vision_src = resolve_source(model_cfg.vision_tower, "model.vision_tower", source)
    lm_src = resolve_source(model_cfg.language_model, "model.language_model", source)
    dtype = getattr(torch, model_cfg.torch_dtype)
    extra = {}
    if model_cfg.attn_implementation:
        extra["attn_implementation"] = model_cfg.attn_implementation

    # A full CLIPModel checkpoint loads into CLIPVisionModel; its text tower is reported as unused.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        vision = CLIPVisionModel.from_pretrained(vision_src, dtype=dtype, **extra)
    finally:
        hf_logging.set_verbosity(verbosity)
    image_processor = load_image_processor(vision_src)
    tokenizer = load_tokenizer(lm_src)
    if quantize_lm:
        from lvit.quant import load_lm_4bit

        lm = load_lm_4bit(lm_src, dtype, getattr(torch, compute_dtype), on_cpu=on_cpu, **extra)
    else:
        lm = AutoModelForCausalLM.from_pretrained(lm_src, dtype=dtype, **extra)
    if not hasattr(lm, "model") or not hasattr(lm, "lm_head"):
        raise LvitError(
            f"{source}: model.language_model {model_cfg.language_model!r} is a "
            f"{type(lm).__name__}, not a Llama-family causal LM with .model and .lm_head."
        )

    resize_embeddings(lm, len(tokenizer))
    # Only after resizing (docs/stack-notes.md#pad-token-after-resize).
    lm.config.pad_token_id = tokenizer.pad_token_id
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)

    config = LlavaConfig(
        vision_config=vision.config,
        text_config=lm.config,
        image_token_index=image_token_id,
        projector_hidden_act=_ACT[model_cfg.projector],
        vision_feature_layer=model_cfg.vision_feature_layer,
        vision_feature_select_strategy="default",
        image_seq_length=num_image_tokens(vision.config),
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
    leftover = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if leftover:
        raise RuntimeError(f"lvit bug: parameters left on the meta device after assembly: {leftover[:5]}")

    if model_cfg.projector_from:
        load_projector(model, model_cfg.projector_from, model_cfg.projector, source)
    processor = build_processor(image_processor, tokenizer, vision.config)
    return model, processor


def _gathered(params, modifier_rank=None):
    """Under DeepSpeed ZeRO-3 a partitioned weight reads as empty unless gathered."""
    from contextlib import nullcontext

    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def resize_embeddings(lm, size: int) -> None:
    """Grow the LM's input and output embeddings to `size` rows; new rows are the mean of the old.

    Deterministic on purpose (transformers' `mean_resizing` samples around the mean): a run's base
    model must be rebuilt bit for bit from its recipe when an adapter is merged into it.
    """
    with _gathered([lm.get_input_embeddings().weight]):
        old = lm.get_input_embeddings().weight.shape[0]
    if size == old:
        return
    if size < old:
        raise LvitError(
            f"the tokenizer has {size} tokens but the model's embeddings have {old} rows; lvit only adds tokens."
        )
    lm.resize_token_embeddings(size, mean_resizing=False)
    embeddings = {id(m): m for m in (lm.get_input_embeddings(), lm.get_output_embeddings()) if m is not None}
    weights = [m.weight for m in embeddings.values()]
    with _gathered(weights, modifier_rank=0), torch.no_grad():
        for weight in weights:
            weight[old:] = weight[:old].mean(dim=0, keepdim=True)


def new_projector(config, kind: str, dtype: torch.dtype):
    """A freshly initialised projector; for `linear`, `linear_2` is the frozen identity."""
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    projector = LlavaMultiModalProjector(config).to(dtype)
    if kind == "linear":
        with torch.no_grad():
            projector.linear_2.weight.copy_(torch.eye(config.text_config.hidden_size, dtype=dtype))
            projector.linear_2.bias.zero_()
        projector.linear_2.requires_grad_(False)
    return projector


def load_projector(model, run_dir: str, kind: str, source: str = "<recipe>") -> None:
    """Load a stage-1 run's projector (`lvit.runs.read_projector`) into `model`, checking type and shapes."""
    from lvit.runs import read_projector

    state, path = read_projector(run_dir, kind, source)
    target = model.model.multi_modal_projector
    expected = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        raise LvitError(
            f"{source}: the projector in {path} has shapes {got}, this model needs {expected} "
            "(different vision tower or language model than the stage-1 run?)."
        )
    dtype = next(target.parameters()).dtype
    target.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    log.info("projector initialised from %s", path)
