"""LLaVA-NeXT's AnyRes on the parts lvit assembles: a stock `LlavaNextForConditionalGeneration` and its
`LlavaNextProcessor`, from the `LlavaForConditionalGeneration` and `LlavaProcessor` of `lvit.model.assemble`.

LLaVA-NeXT ("LLaVA-NeXT: Improved reasoning, OCR, and world knowledge", Liu et al., January 2024;
github.com/LLaVA-VL/LLaVA-NeXT, `llava/model/llava_arch.py` and `llava/mm_utils.py`) sees an image at one of a set
of "pinpoint" resolutions: the one that keeps most of the image's pixels and wastes the least (`select best
resolution`), resized and padded to it, cut into tiles of the tower's size and encoded tile by tile, beside the
whole image at the tower's size. The tiles' features are laid out as the image, the padding's rows or columns
cut away (by the image's own aspect ratio), a learned `image_newline` vector closes every row, and the whole
image's features come first. transformers implements exactly this (`LlavaNextModel.pack_image_features`), so the
model lvit builds is the stock class: plain `from_pretrained` loads what lvit saves.

What lvit does here: the same tower, projector and language model moved into a `LlavaNextConfig` skeleton
(`image_grid_pinpoints`, the tower's feature layer and strategy), `image_newline` drawn as LLaVA-NeXT draws it
(normal, standard deviation 1 / sqrt(hidden size)), and the processor: `LlavaNextImageProcessor` (PIL) with the
tower's image size, mean and std and the pinpoints, and the tokenizer and chat template of the LLaVA processor.
`default_pinpoints`: LLaVA-NeXT's grid for CLIP-336 (336x672, 672x336, 672x672, 1008x336, 336x1008), in units of
the tower's image size for any other tower.
"""

from __future__ import annotations

import math

import torch

from lvit.errors import LvitError
from lvit.model.towers import has_cls_token


def default_pinpoints(image_size: int) -> list[list[int]]:
    """LLaVA-NeXT's pinpoint resolutions for a tower of `image_size` pixels: (height, width) pairs of 1x2, 2x1, 2x2,
    3x1 and 1x3 tiles (its `image_grid_pinpoints` for CLIP-336: `[[336, 672], [672, 336], [672, 672], [1008, 336],
    [336, 1008]]`)."""
    s = image_size
    return [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]


def image_tokens(height: int, width: int, vision_config, pinpoints: list[list[int]]) -> int:
    """The image tokens LLaVA-NeXT's AnyRes gives an image of `height` x `width` pixels (as it is loaded: EXIF
    orientation applied): the whole image's features, then the grid of its best-fit pinpoint's tiles with the
    padding's rows or columns cut away and a newline closing each row (`LlavaNextModel.pack_image_features`; the
    rounding is transformers' `unpad_image`). A tile yields one feature per patch (CLIP's class token is dropped,
    SigLIP has none: `lvit.model.towers.feature_select_strategy`)."""
    from transformers.image_processing_utils import select_best_resolution

    size = vision_config.image_size
    side = size // vision_config.patch_size
    best_height, best_width = select_best_resolution((height, width), pinpoints)
    rows, cols = best_height // size * side, best_width // size * side
    if width / height > cols / rows:  # wider than the grid: padding rows above and below
        kept = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - kept) // 2)
    else:
        kept = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - kept) // 2)
    return side * side + rows * (cols + 1)


def check_pinpoints(pinpoints, image_size: int, where: str) -> list[list[int]]:
    """Pinpoints as `[[height, width], ...]`, each side a multiple of the tower's image size (whole tiles)."""
    ok = (
        isinstance(pinpoints, list)
        and pinpoints
        and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) and v > 0 for v in p)
            for p in pinpoints
        )
    )
    if not ok:
        raise LvitError(f"{where}: image_grid_pinpoints should be a list of [height, width] pairs, got {pinpoints!r}.")
    uneven = [p for p in pinpoints if p[0] % image_size or p[1] % image_size]
    if uneven:
        raise LvitError(
            f"{where}: image_grid_pinpoints {uneven} are not whole tiles of the vision tower's {image_size} px; use "
            f"multiples of {image_size} (LLaVA-NeXT's grid for it: {default_pinpoints(image_size)})."
        )
    return [list(p) for p in pinpoints]


def to_next(model, processor, pinpoints: list[list[int]] | None = None, seed: int = 0):
    """`(LlavaNextForConditionalGeneration, LlavaNextProcessor)` holding `model`'s tower, projector and language
    model (the same modules, not copies) and a new `image_newline`; see the module docstring."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    config = model.config
    vision = config.vision_config
    pinpoints = check_pinpoints(pinpoints or default_pinpoints(vision.image_size), vision.image_size, "model")
    next_config = LlavaNextConfig(
        vision_config=vision,
        text_config=config.text_config,
        image_token_index=config.image_token_id,
        projector_hidden_act=config.projector_hidden_act,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=config.tie_word_embeddings,
        multimodal_projector_bias=config.multimodal_projector_bias,
    )
    with torch.device("meta"):
        out = LlavaNextForConditionalGeneration(next_config)
    out.model.vision_tower = model.model.vision_tower
    out.model.multi_modal_projector = model.model.multi_modal_projector
    out.model.language_model = model.model.language_model
    out.lm_head = model.lm_head
    hidden = config.text_config.hidden_size
    generator = torch.Generator().manual_seed(seed)
    newline = torch.randn(hidden, generator=generator) / math.sqrt(hidden)  # LLaVA-NeXT's init
    dtype = model.lm_head.weight.dtype
    out.model.image_newline = torch.nn.Parameter(newline.to(dtype))
    out.generation_config = model.generation_config
    out.config.dtype = config.dtype
    leftover = [n for n, p in [*out.named_parameters(), *out.named_buffers()] if p.is_meta]
    if leftover:
        raise RuntimeError(f"lvit bug: parameters left on the meta device in the LLaVA-NeXT model: {leftover[:5]}")
    return out, next_processor(processor, vision, pinpoints)


def next_processor(processor, vision_config, pinpoints: list[list[int]]):
    """The `LlavaNextProcessor` of a LLaVA processor: its tokenizer and chat template, a `LlavaNextImageProcessor`
    (PIL) with the tower's image size, mean and std, and the pinpoints."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    source = processor.image_processor
    size = vision_config.image_size
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(source.image_mean),
        image_std=list(source.image_std),
        image_grid_pinpoints=pinpoints,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=processor.tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        chat_template=processor.chat_template,
        num_additional_image_tokens=1 if has_cls_token(vision_config) else 0,
    )


# --- under LoRA / QLoRA: image_newline beside the adapter ----------------------------------------------------

NEWLINE_FILE = "image_newline.safetensors"
"""Where a LoRA / QLoRA NeXT run keeps its trained `image_newline`, beside its adapter: peft saves adapters and
`modules_to_save` modules, not a bare parameter of the model (`LlavaNextModel.image_newline`)."""


def stock_class(architecture: str):
    """The transformers class of a `model.architecture`."""
    import transformers

    return (
        transformers.LlavaNextForConditionalGeneration
        if architecture == "llava_next"
        else (transformers.LlavaForConditionalGeneration)
    )


def newline_of(model):
    """The `image_newline` parameter of a LLaVA-NeXT model or a peft model around one; None for LLaVA."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.model, "image_newline", None)


def save_newline(model, folder) -> None:
    """Write a peft-wrapped NeXT model's `image_newline` into `folder` (`NEWLINE_FILE`), as it trains (fp32)."""
    from pathlib import Path

    from safetensors.torch import save_file

    newline = newline_of(model)
    if newline is not None and hasattr(model, "peft_config"):
        save_file({"image_newline": newline.detach().cpu().contiguous()}, str(Path(folder) / NEWLINE_FILE))


def load_newline(model, folder) -> None:
    """Load `NEWLINE_FILE` from `folder` into a NeXT model (or a peft model around one), in the model's dtype."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(folder) / NEWLINE_FILE
    if not path.is_file():
        raise LvitError(
            f"{folder}: no {NEWLINE_FILE}; a LoRA / QLoRA LLaVA-NeXT run keeps its trained image_newline there, "
            "beside the adapter. Was the folder copied without it?"
        )
    newline = newline_of(model)
    with torch.no_grad():
        newline.copy_(load_file(str(path))["image_newline"].to(newline.dtype))
