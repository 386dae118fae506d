"""LLaVA-NeXT's AnyRes on lvit's parts (`lvit.model.next`): the model lvit builds computes what a hand-written
reference of LLaVA-NeXT's AnyRes path computes (best-fit grid, tile order, unpadding by the image's aspect ratio,
a newline closing each row, the whole image first), for images of several aspect ratios, and the processor's
image-token counts are the reference's feature counts."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from lvit.errors import LvitError
from lvit.model.next import check_pinpoints, default_pinpoints, to_next
from lvit.recipe.schema import ModelSection

SIZES = [(40, 80), (80, 40), (60, 60), (30, 100), (100, 24)]  # (height, width): wide, tall, square, very wide, tall


def best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """LLaVA-NeXT's choice (llava/mm_utils.py, select_best_resolution): the pinpoint that keeps the most of the
    image's pixels once it is scaled to fit, then the one that wastes the least."""
    best, kept_most, waste_least = None, -1, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = pw * ph - kept
        if kept > kept_most or (kept == kept_most and waste < waste_least):
            best, kept_most, waste_least = (ph, pw), kept, waste
    return best


def reference_features(model, tiles: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """LLaVA-NeXT's AnyRes features of one image (llava/model/llava_arch.py, `spatial_unpad` with `anyres`), from
    its tiles as the processor cut them (the whole image first)."""
    config = model.config
    size, patch = config.vision_config.image_size, config.vision_config.patch_size
    side = size // patch
    hidden = model.model.vision_tower(tiles, output_hidden_states=True).hidden_states[config.vision_feature_layer]
    if config.vision_feature_select_strategy == "default":
        hidden = hidden[:, 1:]
    features = model.model.multi_modal_projector(hidden)
    dim = features.shape[-1]
    ph, pw = best_resolution(height, width, config.image_grid_pinpoints)
    rows, cols = ph // size, pw // size
    assert tiles.shape[0] == rows * cols + 1
    grid = (
        features[1:].reshape(rows, cols, side, side, dim).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, dim)
    )
    h, w = grid.shape[:2]
    if width / height > w / h:  # wider than the grid: padding rows above and below
        kept = int(height * (w / width))
        cut = (h - kept) // 2
        grid = grid[cut : h - cut]
    else:
        kept = int(width * (h / height))
        cut = (w - kept) // 2
        grid = grid[:, cut : w - cut]
    newline = model.model.image_newline.expand(grid.shape[0], 1, dim)
    return torch.cat([features[0], torch.cat([grid, newline], dim=1).reshape(-1, dim)])


@pytest.fixture(scope="module")
def next_model(tiny_parts):
    from lvit.model.assemble import assemble

    vision, lm = tiny_parts
    torch.manual_seed(0)
    llava, processor = assemble(ModelSection(vision_tower=str(vision), language_model=str(lm), projector="mlp2x_gelu"))
    model, next_processor = to_next(llava, processor)
    return model.eval(), next_processor


def test_the_next_forward_equals_llava_nexts_anyres_path(next_model):
    model, processor = next_model
    assert model.config.image_grid_pinpoints == default_pinpoints(32)
    embed = model.get_input_embeddings()
    for height, width in SIZES:
        image = Image.new("RGB", (width, height))
        image.putdata([((x * 7 + y) % 256, (x * y) % 256, (y * 5) % 256) for y in range(height) for x in range(width)])
        inputs = processor(text=["USER: <image>\nWhat is it? ASSISTANT:"], images=[image], return_tensors="pt")
        assert inputs["image_sizes"].tolist() == [[height, width]]
        ids = inputs["input_ids"][0]
        image_positions = (ids == model.config.image_token_id).nonzero().flatten()
        with torch.no_grad():
            tiles = inputs["pixel_values"][0]
            ph, pw = best_resolution(height, width, model.config.image_grid_pinpoints)
            tiles = tiles[: (ph // 32) * (pw // 32) + 1]
            expected = reference_features(model, tiles, height, width)
            assert len(image_positions) == expected.shape[0], (height, width)  # the processor's count
            embeds = embed(ids[None]).clone()
            embeds[0, image_positions] = expected
            hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
            want = model.lm_head(hidden)
            got = model(**inputs).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_image_newline_is_drawn_as_llava_next_draws_it(next_model):
    model, _ = next_model
    newline = model.model.image_newline.detach()
    hidden = model.config.text_config.hidden_size
    assert newline.shape == (hidden,)
    assert 0.5 / math.sqrt(hidden) < newline.std().item() < 1.5 / math.sqrt(hidden)


def test_pinpoints_must_be_whole_tiles():
    assert check_pinpoints([[32, 64]], 32, "r") == [[32, 64]]
    with pytest.raises(LvitError, match=r"not whole tiles of the vision tower's 32 px"):
        check_pinpoints([[32, 50]], 32, "r")
    with pytest.raises(LvitError, match="a list of \\[height, width\\] pairs"):
        check_pinpoints([[32]], 32, "r")


@pytest.mark.parametrize("seed", range(3))
def test_image_token_counts_and_training_ids_equal_the_processors(next_model, seed):
    """For images of many sizes, `image_tokens` is the processor's expansion of `<image>`, and the training ids (the
    conversation encoder given those counts) are `apply_chat_template` + the processor's ids."""
    import random

    from lvit.model.encoder import conversation_encoder
    from lvit.model.next import image_tokens
    from lvit.templates.conversation import Conversation

    model, processor = next_model
    config = model.config
    encoder = conversation_encoder("vicuna_v1", processor.tokenizer, config)
    rng = random.Random(seed)
    for _ in range(12):
        height, width = rng.randint(8, 200), rng.randint(8, 200)
        n = image_tokens(height, width, config.vision_config, config.image_grid_pinpoints)
        conv = Conversation([("user", "What is it?"), ("assistant", "A thing.")], has_image=True, image_tokens=(n,))
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A thing."}]},
        ]
        text = processor.apply_chat_template(messages)
        ids = processor(text=[text], images=[Image.new("RGB", (width, height))], return_tensors="pt")["input_ids"][0]
        assert int((ids == config.image_token_id).sum()) == n, (height, width)
        assert encoder.encode(conv).input_ids == ids.tolist(), (height, width)
        lengths = encoder.lengths([conv])
        assert (
            lengths.total == [len(ids)]
            and lengths.image_end[0] == int((ids == config.image_token_id).nonzero().max()) + 1
        )
