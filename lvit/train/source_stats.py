"""The training loss per source of a mixture, logged beside the loss (`lvit_log.jsonl`, the plot, the summary).

The Trainer logs, every `logging_steps` steps, the mean over those steps of each step's loss, and a step's loss is
its summed token loss over its trained tokens N (`num_items_in_batch`, over every process). The compact head
(`lvit.train.loss.compact_loss`) has each token's loss, so each micro-batch adds, per source s, its summed token
loss S_s / N and its trained tokens T_s / N (N: the step's), and at a log:

- `loss/<s>` = sum(S_s / N) / sum(T_s / N): the source's per-token loss, each step weighed as the logged loss
  weighs it;
- `token_share/<s>` = sum(T_s / N) / (steps logged): the source's mean share of a step's trained tokens.

Since the shares of a step add up to 1, the shares of a log add up to 1 and sum_s share_s x loss_s is exactly the
logged `loss`. Also `samples/<s>` and `tokens/<s>` (the samples and trained tokens since the last log, every
process). A log gathers the sums from every process once (one all-reduce of a few numbers per source); the
per-token losses are there already, so the cost is one `index_add` per micro-batch (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch


class SourceStats:
    """Sums per source since the last log: `add` each micro-batch, `pop` at a log."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.sums = None  # (sources, 4): S/N, T/N, trained tokens, samples

    def add(self, source_loss: torch.Tensor, source_tokens: torch.Tensor, samples: torch.Tensor, num_items) -> None:
        n = len(self.names)
        count = source_tokens.sum() if num_items is None else torch.as_tensor(num_items, device=source_loss.device)
        count = count.double().clamp(min=1)
        counted = torch.bincount(samples.to(source_loss.device), minlength=n).double()
        row = torch.stack([source_loss / count, source_tokens / count, source_tokens, counted], dim=1)
        self.sums = row if self.sums is None else self.sums + row

    def pop(self, accelerator) -> dict[str, float]:
        """The log entries since the last log (`loss/<name>`, `token_share/<name>`, `samples/<name>`,
        `tokens/<name>`), summed over every process; {} when nothing was added. Every process must call it."""
        if self.sums is None:
            return {}
        sums = accelerator.reduce(self.sums, reduction="sum") if accelerator.num_processes > 1 else self.sums
        self.sums = None
        shares_total = float(sums[:, 1].sum())
        out: dict[str, float] = {}
        for name, (weighted_loss, weighted_tokens, tokens, samples) in zip(self.names, sums.tolist(), strict=True):
            if weighted_tokens > 0:
                out[f"loss/{name}"] = weighted_loss / weighted_tokens
            out[f"token_share/{name}"] = weighted_tokens / shares_total if shares_total > 0 else 0.0
            out[f"samples/{name}"] = int(round(samples))
            out[f"tokens/{name}"] = int(round(tokens))
        return out
