"""Batched generation with the templates of training: how answers are decoded, and decoding them.

A batch is left-padded and gives the same answers as one conversation at a time; prompts are
built with the run's template exactly as in training (`ConversationEncoder(..., for_generation=True)`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lvit.errors import LvitError
from lvit.infer.questions import images_of
from lvit.templates.conversation import Conversation
from lvit.templates.encoder import ConversationEncoder


@dataclass
class GenerationSettings:
    """How answers are decoded: greedy unless `temperature` > 0."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0

    def kwargs(self) -> dict:
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise LvitError(f"--temperature must be >= 0 and --top-p in (0, 1], got {self.temperature}, {self.top_p}")
        if self.max_new_tokens < 1:
            raise LvitError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False, "temperature": None, "top_p": None}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }


def _model_device_and_dtype(model) -> tuple[torch.device, torch.dtype]:
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    param = next(llava.model.vision_tower.parameters())
    return param.device, param.dtype


@contextmanager
def eval_mode(model):
    """Eval mode inside, each module's own train/eval mode restored after (a frozen tower may be in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def generate_batch(
    model,
    encoder: ConversationEncoder,
    image_loader,
    convs: list[Conversation],
    image_paths: list[str | list[str] | None],
    settings: GenerationSettings,
    streamer=None,
    image_inputs: dict | None = None,
) -> list[str]:
    """Answer the last user turn of each conversation in one `generate` call, left-padded.

    The caller puts the model in eval mode. `image_paths[i]` is conversation i's image, a list of them (one
    per placeholder, in order) or None. `image_inputs` (`ImageLoader.image_inputs`: `pixel_values`, and
    `image_sizes` for LLaVA-NeXT) may be passed instead of loading the images, one image per placeholder in the
    order of the conversations; the conversations then carry their images' token counts where those depend on the
    size (`ConversationEncoder.sized`).
    """
    tokenizer = encoder.tokenizer
    device, dtype = _model_device_and_dtype(model)
    if image_inputs is None:
        per_conv = [[image_loader.load(p) for p in images_of(entry)] for entry in image_paths]
        convs = [
            encoder.sized(c, [(i.height, i.width) for i in images]) for c, images in zip(convs, per_conv, strict=True)
        ]
        images = [image for images in per_conv for image in images]
        image_inputs = image_loader.image_inputs(images) if images else None
    encoded = encoder.encode_many(convs, for_generation=True)
    width = max(len(e.input_ids) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(e.input_ids)) + e.input_ids for e in encoded])
    attention = torch.tensor([[0] * (width - len(e.input_ids)) + [1] * len(e.input_ids) for e in encoded])
    kwargs = {}
    if image_inputs is not None:
        kwargs = {k: v.to(device) for k, v in image_inputs.items()}
        kwargs["pixel_values"] = kwargs["pixel_values"].to(dtype)
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        streamer=streamer,
        **settings.kwargs(),
        **kwargs,
    )
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, width:]]


def iter_answers(
    model,
    encoder: ConversationEncoder,
    image_loader,
    convs: list[Conversation],
    image_paths: list[str | list[str] | None],
    settings: GenerationSettings,
    batch_size: int = 16,
) -> Iterator[tuple[int, list[str]]]:
    """Answer the last user turn of each conversation (`image_paths[i]` is its image, or None), in
    batches with left padding.

    Yields `(start, answers)` per batch, in order; the model is put in eval mode and every module's
    train/eval mode is restored after.
    """
    with eval_mode(model):
        for start in range(0, len(convs), batch_size):
            answers = generate_batch(
                model,
                encoder,
                image_loader,
                convs[start : start + batch_size],
                image_paths[start : start + batch_size],
                settings,
            )
            yield start, answers
