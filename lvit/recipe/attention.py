"""Attention implementations that keep packed samples apart (`data.packing`), checked when a recipe is read."""

from lvit.errors import LvitError

# Attention implementations that confine attention to a sample when given packed position ids and no
# attention mask (docs/stack-notes.md#packed-position-ids): eager and sdpa through the mask transformers
# builds; the flash-attention kernels through their varlen path, which needs the whole batch in one row.
MASKED_ATTENTION = ("eager", "sdpa")
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
# lvit's own per-sample sdpa (`lvit.model.packed_attention`), which lvit sets on a model that packs; its name is
# defined here, below the model layer, so the recipe check and the kernel share it.
PACKED_SDPA = "lvit_packed_sdpa"


def check_attention(attn_implementation: str | None, where: str) -> None:
    """Refuse an attention implementation that packed rows would let attend across samples."""
    if attn_implementation in (*MASKED_ATTENTION, *VARLEN_ATTENTION, PACKED_SDPA):
        return
    raise LvitError(
        f"{where}: data.packing needs attention that keeps packed samples apart; the model uses "
        f"{attn_implementation!r}. Set model.attn_implementation to one of "
        f"{', '.join(MASKED_ATTENTION + VARLEN_ATTENTION)}, or data.packing=false "
        "(docs/stack-notes.md#packed-position-ids)."
    )
