"""The vision towers lvit takes (CLIP, SigLIP / SigLIP2 fixed resolution): their configs, CLS handling and image-
token counts."""

from __future__ import annotations

from lvit.errors import LvitError

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
