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


# Vision towers lvit assembles, by config `model_type` (the full checkpoint's or the vision-only one's): the
# vision model class and whether its sequence starts with a CLS token. CLIP has one; SigLIP has none (its
# pooled output comes from an attention-pooling head, not a token). SigLIP2's fixed-resolution checkpoints
# (google/siglip2-so400m-patch14-384 and the like) are `model_type: siglip` and load as SigLIP
# (docs/stack-notes.md#siglip-towers).
VISION_TOWERS = {
    "clip": ("CLIPVisionModel", True),
    "clip_vision_model": ("CLIPVisionModel", True),
    "siglip": ("SiglipVisionModel", False),
    "siglip_vision_model": ("SiglipVisionModel", False),
}


def has_cls_token(vision_config) -> bool:
    """Whether the tower's output sequence starts with a CLS token (CLIP) or holds only patches (SigLIP)."""
    entry = VISION_TOWERS.get(vision_config.model_type)
    if entry is None:
        raise LvitError(_unknown_tower(vision_config.model_type, "model.vision_tower"))
    return entry[1]


def feature_select_strategy(vision_config) -> str:
    """LLaVA's `vision_feature_select_strategy` for this tower: "default" drops the CLS token (CLIP), "full"
    keeps every position (SigLIP, which has no CLS token: all its positions are patches)."""
    return "default" if has_cls_token(vision_config) else "full"


def num_image_tokens(vision_config, strategy: str | None = None) -> int:
    """Image-token ids per image: the tower's patches, (H/p)*(W/p) (256 for ViT-L/14 at 224 px, 576 at
    336 px, 729 for SigLIP so400m/14 at 384 px), plus the CLS token when `strategy` is "full" on a tower
    that has one. `strategy` None: the tower's own (`feature_select_strategy`)."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    cls = 1 if has_cls_token(vision_config) else 0
    strategy = strategy or feature_select_strategy(vision_config)
    if strategy == "default" and not cls:
        raise LvitError(
            f"vision_feature_select_strategy 'default' drops a CLS token, and a {vision_config.model_type} tower "
            "has none (it would drop a patch); use 'full'."
        )
    return patches + cls - (1 if strategy == "default" else 0)


def _unknown_tower(model_type: str, where: str) -> str:
    return (
        f"{where}: a {model_type!r} checkpoint is not a vision tower lvit assembles; supported: CLIP and SigLIP / "
        "SigLIP2 fixed-resolution checkpoints (config model_type one of "
        f"{', '.join(sorted(VISION_TOWERS))}). SigLIP2 NaFlex checkpoints (model_type 'siglip2') need per-image "
        "patch masks that LlavaForConditionalGeneration does not pass: take the fixed-resolution SigLIP2 "
        "checkpoint of the same size (e.g. google/siglip2-so400m-patch14-384)."
    )


def vision_config_of(source: str, where: str = "model.vision_tower"):
    """The vision config of a tower checkpoint (a full CLIP / SigLIP model's `vision_config`, or a vision-only one)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    config = getattr(config, "vision_config", config)
    if config.model_type not in VISION_TOWERS:
        raise LvitError(_unknown_tower(config.model_type, where))
    return config


def load_vision_tower(source: str, dtype, where: str = "model.vision_tower", **extra):
    """The vision tower of `source` as its vision-only model class (`VISION_TOWERS`); a full CLIPModel /
    SiglipModel checkpoint loads too (its text tower is reported as unused and left out)."""
    import transformers
    from transformers.utils import logging as hf_logging

    config = vision_config_of(source, where)
    cls = getattr(transformers, VISION_TOWERS[config.model_type][0])
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return cls.from_pretrained(source, dtype=dtype, **extra)
    finally:
        hf_logging.set_verbosity(verbosity)


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
    if getattr(tokenizer, "image_token", None) not in (None, IMAGE_PLACEHOLDER):
        # A tokenizer that names an image token of its own (Gemma 3: `<image_soft_token>`) would make
        # `LlavaProcessor` expand that one instead of `<image>` (docs/stack-notes.md#tokenizer-image-token).
        tokenizer.image_token = IMAGE_PLACEHOLDER
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


def build_processor(image_processor, tokenizer, vision_config, template: str = "vicuna_v1"):
    """The LLaVA processor lvit saves: the tower's image-token count (checked against
    `num_image_tokens`) and the chat template that renders the training text (`template`: "auto" -> the
    LM's own chat template with the image placeholder handled, `lvit.chat_template`; else vicuna_v1's)."""
    from transformers import LlavaProcessor

    from lvit.chat_template import exported_chat_template

    strategy = feature_select_strategy(vision_config)
    chat_template = exported_chat_template(tokenizer) if template == "auto" else VICUNA_V1_CHAT_TEMPLATE
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        # The CLS token: the processor subtracts one for "default" (docs/stack-notes.md#processor-image-tokens)
        num_additional_image_tokens=1 if has_cls_token(vision_config) else 0,
        chat_template=chat_template,
    )
    if template == "auto":  # text-only users of the tokenizer (and servers that read its template) see the same
        tokenizer.chat_template = chat_template
    check_processor_image_tokens(processor, vision_config)
    return processor


def check_processor_image_tokens(processor, vision_config) -> None:
    """The processor expands `<image>` to as many tokens as the tower yields features, for an image of the
    size the image processor produces; refuse a tower whose processor crops to another size."""
    import numpy as np

    expected = num_image_tokens(vision_config)
    size = vision_config.image_size
    pixels = np.zeros((3, size, size), dtype=np.float32)
    got = len(processor.replace_image_token({"pixel_values": [pixels]}, 0))
    got //= len(processor.image_token)
    crop = _processed_size(processor.image_processor)
    if got != expected or (crop is not None and crop != size):
        raise LvitError(
            f"the vision tower ({vision_config.model_type}, {size} px, patch {vision_config.patch_size}) yields "
            f"{expected} image features but its image processor makes {crop} px images ({got} image tokens); "
            "the tower and its image processor must come from the same checkpoint."
        )


def _processed_size(image_processor) -> int | None:
    """The side of the square images the image processor outputs (its crop, else its fixed resize), if it says."""

    def height(size) -> int | None:  # a dict, or transformers' SizeDict
        value = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
        return None if value is None else int(value)

    crop, size = getattr(image_processor, "crop_size", None), getattr(image_processor, "size", None)
    if getattr(image_processor, "do_center_crop", False) and crop is not None and height(crop):
        return height(crop)
    return height(size) if size is not None else None


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
    `model.projector_from` (a stage-1 run folder). Nothing is frozen here; see `lvit.stages`.
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
        from lvit.quant import load_lm_4bit

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
        projector_hidden_act=_ACT[model_cfg.projector],
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
    from lvit.chat_template import LMChatTemplate

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
