"""Token-budget micro-batches (recipe key `data.max_tokens_per_batch`): each micro-batch holds as many samples
as fit a budget of tokens, instead of a fixed `per_device_train_batch_size`.

This CHANGES the samples per step (short samples come many to a micro-batch, long ones few), so the run learns
from other steps than a fixed-size run; `data.packing` only changes a micro-batch's layout. It is off by default.

How the batches are formed (lvit's own choices):
- The samples, shuffled by `seed`, fill micro-batches in that order: a sample joins the current micro-batch if
  the micro-batch's tokens (the sum of its samples' lengths, image tokens included) stay within the budget,
  else it starts the next one. A sample is never split; one longer than the budget is refused up front, by
  record id.
- The micro-batches are formed once per run (from `seed`), and each epoch visits them in an order drawn from
  (seed, epoch). The Trainer reads the number of micro-batches once, before the first epoch, so it must be
  the same every epoch (docs/stack-notes.md#trainer-batch-sampler); forming the batches anew each epoch would
  change it. Every sample comes once per epoch, and a resumed run draws the
  same micro-batches as the run it continues (accelerate's `skip_first_batches` skips the trained ones).
- An optimizer step is `gradient_accumulation_steps` micro-batches (the epoch's last step may have fewer). The
  loss stays a per-token mean over the whole step: transformers counts the trained tokens of all the step's
  micro-batches (`num_items_in_batch`) and TRL divides the summed token loss by that count, so a token weighs
  the same whichever micro-batch it is in (see the note above `build_sft_config` in `lvit/train/`).
- A mixture (`lvit.data.mixture`): the micro-batches are formed from its first epoch's draws, and each epoch visits
  those (the draws are made once for the run, since the Trainer needs the same count every epoch).
- One process only: with several, every rank must take the same number of steps, and accelerate's sharding
  would repeat micro-batches to even them out (docs/stack-notes.md#trainer-batch-sampler). Refused with a
  message (`lvit.train.config.build_sft_config`).
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

from lvit.errors import LvitError


def budget_batches(lengths: list[int], order: list[int], budget: int) -> list[list[int]]:
    """The indices of `order`, in that order, cut into micro-batches of at most `budget` tokens each
    (`lengths[i]`: sample i's tokens). Every length must be at most `budget`."""
    batches: list[list[int]] = []
    used = budget + 1  # no open micro-batch yet
    for i in order:
        n = lengths[i]
        if n > budget:
            raise ValueError(f"sample {i} has {n} tokens, over the budget of {budget}")
        if used + n > budget:
            batches.append([])
            used = 0
        batches[-1].append(i)
        used += n
    return batches


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Micro-batches of at most `budget` tokens (`budget_batches` over a `seed` shuffle), visited each epoch in
    an order drawn from (seed, epoch). `lengths[i]` and `ids[i]`: record i's tokens and id (for the error on a
    record longer than the budget). A batch sampler: pass it as a `DataLoader`'s `batch_sampler`."""

    def __init__(self, lengths: list[int], ids: list[str], budget: int, seed: int, pool: list[int] | None = None):
        if budget < 1:
            raise LvitError(f"data.max_tokens_per_batch must be at least 1, got {budget}.")
        pool = list(range(len(lengths))) if pool is None else list(pool)  # a mixture: its first epoch's draws
        over = [(ids[i], lengths[i]) for i in dict.fromkeys(pool) if lengths[i] > budget]
        if over:
            shown = ", ".join(f"{rid!r} ({n} tokens)" for rid, n in over[:5])
            raise LvitError(
                f"data.max_tokens_per_batch = {budget}: {len(over)} record(s) are longer than one micro-batch may "
                f"be, e.g. {shown}. A sample is never split: raise data.max_tokens_per_batch to at least "
                f"{max(n for _, n in over)}, or lower data.max_length (records are cut or dropped to it, "
                "see data.overlong)."
            )
        self.budget = budget
        self.seed = seed
        self.epoch = 0
        generator = torch.Generator()
        generator.manual_seed(seed)
        order = [pool[k] for k in torch.randperm(len(pool), generator=generator).tolist()]
        self.batches = budget_batches(list(lengths), order, budget)

    def samples_drawn(self, steps: int, accumulation: int) -> int:
        """The samples that `steps` optimizer steps of `accumulation` micro-batches drew (an epoch's last step
        may have fewer micro-batches)."""
        per_epoch = -(-len(self.batches) // accumulation)
        epochs, rest = divmod(steps, per_epoch)
        n_samples = sum(len(b) for b in self.batches)
        return epochs * n_samples + sum(len(b) for b in self._epoch_batches(epochs)[: rest * accumulation])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch + 1)  # + 1: not the stream that formed the batches
        return [list(self.batches[k]) for k in torch.randperm(len(self.batches), generator=generator).tolist()]

    def __iter__(self):
        return iter(self._epoch_batches(self.epoch))
