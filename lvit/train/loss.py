"""The training loss with a compact LM head: logits only at the positions that carry a label.

Only answer tokens are trained (about a quarter of the positions of LLaVA data), yet a plain forward
projects every position onto the vocabulary. `compact_loss` asks the model for the logits of the labelled
positions only, through the public `logits_to_keep` argument of `LlavaForConditionalGeneration.forward`
with a boolean (batch, sequence) mask (docs/stack-notes.md#logits-to-keep-mask), and takes the
cross-entropy there. The loss is the summed token loss divided by `num_items_in_batch` (the trained tokens
of the whole optimizer step, counted by the Trainer), as TRL's `SFTTrainer.compute_loss` does
(see lvit/train/, the comment above `build_sft_config`), so a step's loss and gradients are those of full
scoring. Calling the model itself (not its backbone) keeps DDP, DeepSpeed and FSDP wrappers in the path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lvit.templates.conversation import IGNORE_INDEX


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean (batch, seq) mask of the positions whose next token is trained: position t predicts t+1."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def compact_loss(
    model, inputs: dict, num_items_in_batch=None, label_sources: torch.Tensor | None = None, n_sources: int = 0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`(loss, stats)`: the summed cross-entropy of the labelled tokens / `num_items_in_batch` (None: their
    count, at least 1); `stats` holds `tokens`, `correct` (top-1 hits) and `entropy` (summed), detached. With
    `label_sources` (a mixture: each position's source, the labels' shape) also `source_loss` and `source_tokens`
    (`n_sources` entries: the summed token loss and the trained tokens of each source), from the same per-token
    losses."""
    labels = inputs["labels"]
    keep = labelled_positions(labels)
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**model_inputs, logits_to_keep=keep, use_cache=False).logits  # (labelled positions, vocab)
    targets = labels[:, 1:][keep[:, :-1]].to(logits.device)
    if label_sources is None:
        token_loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    else:  # the same sum, from the per-token losses the sources' sums come from
        per_token = F.cross_entropy(logits.float(), targets, reduction="none")
        token_loss = per_token.sum()
    count = targets.numel() if num_items_in_batch is None else num_items_in_batch
    loss = token_loss / torch.as_tensor(count, device=token_loss.device).clamp(min=1)
    with torch.no_grad():
        logp = logits.float().log_softmax(-1)
        stats = {
            "tokens": torch.tensor(targets.numel(), device=logits.device),
            "correct": (logits.argmax(-1) == targets).sum(),
            "entropy": -(logp.exp() * logp).sum(),
        }
        if label_sources is not None:
            where = label_sources[:, 1:][keep[:, :-1]].to(logits.device)
            zeros = torch.zeros(n_sources, dtype=torch.float64, device=logits.device)
            stats["source_loss"] = zeros.index_add(0, where, per_token.detach().double())
            stats["source_tokens"] = zeros.index_add(0, where, torch.ones_like(where, dtype=torch.float64))
    return loss, stats
