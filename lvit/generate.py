"""Greedy answers from a LLaVA model, built with the same template pieces as training."""

from __future__ import annotations

import torch

from lvit.templates import Conversation, ConversationEncoder


@torch.no_grad()
def generate_answers(
    model,
    encoder: ConversationEncoder,
    image_loader,
    convs: list[Conversation],
    image_paths: list[str | None],
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> list[str]:
    """Answer the last user turn of each conversation (greedy), in batches with left padding.

    Each conversation's turns end with the user turn to answer; `image_paths[i]` is its image
    (or None). Returns the decoded answers, stripped.
    """
    tokenizer = encoder.tokenizer
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    dtype = next(llava.model.vision_tower.parameters()).dtype
    answers: list[str] = []
    try:
        for start in range(0, len(convs), batch_size):
            chunk = convs[start : start + batch_size]
            paths = image_paths[start : start + batch_size]
            encoded = encoder.encode_many(chunk, for_generation=True)
            width = max(len(e.input_ids) for e in encoded)
            pad = tokenizer.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(e.input_ids)) + e.input_ids for e in encoded])
            attention = torch.tensor([[0] * (width - len(e.input_ids)) + [1] * len(e.input_ids) for e in encoded])
            kwargs = {}
            images = [image_loader.load(p) for p in paths if p is not None]
            if images:
                kwargs["pixel_values"] = image_loader.pixel_values(images).to(device=device, dtype=dtype)
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
                **kwargs,
            )
            for row in out[:, width:]:
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return answers
