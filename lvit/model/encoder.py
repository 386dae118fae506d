"""The conversation encoder of a LLaVA model: its template, its tokenizer, and as many image-token ids per image as
its vision tower yields. The one place lvit builds a `ConversationEncoder` (training, the data checks, inference,
export's self-check), so every one of them counts image tokens the same way."""

from __future__ import annotations

from functools import partial

from lvit.model.next import image_tokens
from lvit.model.towers import num_image_tokens
from lvit.templates.conversation import IMAGE_PLACEHOLDER
from lvit.templates.encoder import ConversationEncoder


def conversation_encoder(template, tokenizer, config, pinpoints: list[list[int]] | None = None) -> ConversationEncoder:
    """The encoder for `config`: a LLaVA config (a model's: its image token id and feature strategy), or a vision
    tower's config before assembly (the tokenizer's `<image>` id, the tower's own strategy). A LLaVA-NeXT config's
    encoder, or one given the `pinpoints` of a LLaVA-NeXT recipe, counts each image's tokens from its size
    (`image_tokens_for_size`)."""
    vision_config = getattr(config, "vision_config", config)
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    strategy = getattr(config, "vision_feature_select_strategy", None)
    encoder = ConversationEncoder(template, tokenizer, image_token_id, num_image_tokens(vision_config, strategy))
    if getattr(config, "model_type", None) == "llava_next":
        pinpoints = config.image_grid_pinpoints
    if pinpoints is not None:  # AnyRes: an image's tokens depend on its size
        encoder.image_tokens_for_size = partial(image_tokens, vision_config=vision_config, pinpoints=pinpoints)
    return encoder
