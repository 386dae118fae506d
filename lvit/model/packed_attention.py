"""Attention over packed rows that costs what the samples cost apart: sdpa run sample by sample.

A packed row (`lvit.data.packing`) holds several samples end to end, each with positions from 0. transformers
keeps them apart with a block-diagonal mask, and sdpa (eager too) computes every block of it, the masked ones
included: four samples in one row cost about four times their attention apart (benchmarks/RESULTS.md,
"Packing at max_length 2048"). flash-attention's varlen kernel skips those blocks on a GPU; this is the same
idea for sdpa, on any device: the language model's attention runs `torch.nn.functional.scaled_dot_product_attention`
once per sample, causal, on that sample's span of the row, and no mask is built at all. Every sample then costs
its own attention and no more, so a micro-batch goes in one row, with no filler.

It is registered with transformers' `AttentionInterface` (the kernel) and `AttentionMaskInterface` (no mask for
an unpadded batch) under `PACKED_SDPA`, and set on the language model only (`use_packed_sdpa`). Anything that is
not a batch of whole unpadded rows (a padding mask, a KV cache, no position ids) goes to transformers' own sdpa
unchanged, so generation and padded evaluation behave exactly as with `sdpa`. Models whose attention sdpa does not
express per sample (a sliding window shorter than `data.max_length`, logit soft-capping) keep `sdpa` and its mask,
and so do toy models (hidden size below `MIN_HIDDEN_SIZE`), where a call per sample costs more than it saves.
How transformers takes a custom kernel: docs/stack-notes.md#custom-attention-interface. Sample bounds are where the
position ids stop counting up by one (as transformers' own packed detection reads
them, `masking_utils.find_packed_sequence_indices`). Checked against sdpa with the mask in `tests/test_packing.py`.
"""

from __future__ import annotations

from lvit.recipe.attention import PACKED_SDPA

# Below this hidden size a layer's attention is too little work for one sdpa call per sample to pay for its
# overhead (about 0.1 ms a call, forward and backward, on 2 CPU cores): the tests' 64-wide model trained 40%
# slower with it, the 512-wide benchmark model 1.3x faster (benchmarks/RESULTS.md, "Packing at max_length 2048").
MIN_HIDDEN_SIZE = 256
_registered = False


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: query/key/value [batch, heads, length, head_dim] ->
    (output [batch, length, heads, head_dim], None)."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    length = query.shape[2]
    if attention_mask is not None or position_ids is None or key.shape[2] != length or position_ids.shape[-1] != length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    rows = []
    for b, starts in enumerate(_sample_bounds(position_ids, query.shape[0])):
        spans = [
            torch.nn.functional.scaled_dot_product_attention(
                query[b : b + 1, :, s:e],
                key[b : b + 1, :, s:e],
                value[b : b + 1, :, s:e],
                dropout_p=dropout,
                scale=scaling,
                is_causal=True,
            )  # fmt: skip
            for s, e in zip(starts, starts[1:], strict=False)
        ]
        rows.append(spans[0] if len(spans) == 1 else torch.cat(spans, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


_bounds: tuple = (None, None)  # (the position ids last read, their bounds): every layer of a forward gets the same


def _sample_bounds(position_ids, batch: int) -> list[list[int]]:
    """Per row, where each sample starts (and the row's end), read from the position ids once per forward: every
    layer gets the same tensor, so the device-to-host read is not repeated per layer."""
    global _bounds
    import torch

    if _bounds[0] is not position_ids:
        positions, length = position_ids.expand(batch, -1), position_ids.shape[-1]
        starts = [[0, *((torch.diff(row) != 1).nonzero().flatten() + 1).tolist(), length] for row in positions]
        _bounds = (position_ids, starts)
    return _bounds[1]


def _packed_sdpa_mask(*args, attention_mask=None, **kwargs):
    """No mask for a batch without padding (the kernel reads the bounds from the position ids); sdpa's otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, _packed_sdpa_mask)
    _registered = True


def packed_sdpa_blocker(text_config, max_length: int, min_hidden_size: int = MIN_HIDDEN_SIZE) -> str | None:
    """Why the language model cannot use `PACKED_SDPA`, or would not gain from it (None: it can)."""
    if text_config._attn_implementation != "sdpa":
        return f"it runs {text_config._attn_implementation!r} attention, not sdpa"
    hidden = getattr(text_config, "hidden_size", None)
    if hidden is not None and hidden < min_hidden_size:
        return f"its hidden size {hidden} is below {min_hidden_size}: too little attention work to gain from it"
    window = getattr(text_config, "sliding_window", None)
    if window and getattr(text_config, "use_sliding_window", True) and window < max_length:
        return f"its sliding window ({window}) is shorter than data.max_length ({max_length})"
    if getattr(text_config, "attn_logit_softcapping", None):
        return "it soft-caps attention logits"
    return None


def use_packed_sdpa(model, max_length: int, min_hidden_size: int = MIN_HIDDEN_SIZE) -> str | None:
    """Switch the language model of a LLaVA model from sdpa to `PACKED_SDPA`; returns why not (None: switched)."""
    text_config = model.config.get_text_config()
    blocker = packed_sdpa_blocker(text_config, max_length, min_hidden_size)
    if blocker is None:
        register()
        model.set_attn_implementation({"text_config": PACKED_SDPA})
    return blocker


def plain_sdpa(config) -> None:
    """Before a model's config is saved: `sdpa` where training ran `PACKED_SDPA`, so what is saved loads anywhere."""
    for sub in (config, config.get_text_config()):
        if getattr(sub, "_attn_implementation_internal", None) == PACKED_SDPA:
            sub._attn_implementation_internal = "sdpa"
