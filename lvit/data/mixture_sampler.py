"""A mixture's epochs (`lvit.data.mixture.Plan`): which records each epoch draws, in which order, recorded.

Each epoch's draws depend only on (seed, epoch): every process computes the same ones, and a resumed run draws
the same as the run it continues (the Trainer then skips the batches already trained). The draws of all sources
are laid out in one order (`MixtureSampler`): a stratified shuffle (`stratified_positions`: random, and every
stretch of the epoch holds each source in its share to within a sample, so a step's records come from the sources
in their shares); or grouped by modality (`data.group_by_modality_length`) or by length
(`training.group_by_length`) exactly as without a mixture, over the epoch's draws. The token budget
(`data.max_tokens_per_batch`) forms its micro-batches once per run, from the first epoch's draws
(`first_epoch_rows`).

With `record_to`, each epoch's draws are written as they are made, one line per source of
`mixture/epoch-<E>.jsonl` in the run folder: `{"source", "ids", "indices"}` (the records' ids and their places
in the source's file, in draw order). A resumed run writes the same lines; if they differ (the data changed
under the run) it says so.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path

import torch
from torch.utils.data import Sampler

from lvit.data.mixture import Plan
from lvit.data.modality_sampler import modality_grouped_indices
from lvit.runs.files import MIXTURE_FOLDER

log = logging.getLogger(__name__)

RECORD_FOLDER = MIXTURE_FOLDER


def _generator(seed: int, *parts) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + zlib.crc32(repr(parts).encode())) % (2**63))
    return generator


def epoch_rows(plan: Plan, seed: int, epoch: int) -> list[list[int]]:
    """Per source, the training dataset's rows that `epoch` draws (see `lvit.data.mixture`)."""
    out = []
    for s, (rows, n, fixed) in enumerate(zip(plan.rows, plan.per_epoch, plan.fixed, strict=True)):
        if fixed:
            out.append(list(rows))
            continue
        # positions [epoch*n, (epoch+1)*n) of an endless run of permutations of the source's rows
        start, drawn = epoch * n, []
        cycle, offset = divmod(start, len(rows))
        while len(drawn) < n:
            perm = torch.randperm(len(rows), generator=_generator(seed, "source", s, cycle)).tolist()
            take = perm[offset : offset + n - len(drawn)]
            drawn += [rows[k] for k in take]
            cycle, offset = cycle + 1, 0
        out.append(drawn)
    return out


def first_epoch_rows(plan: Plan, seed: int) -> list[int]:
    """Every row the first epoch draws, source by source (repeats included)."""
    return [r for rows in epoch_rows(plan, seed, 0) for r in rows]


def stratified_positions(counts: list[int], generator: torch.Generator) -> list[int]:
    """A random order of the draws of several sources (`counts[s]` each, laid out source by source) in which every
    stretch holds each source in its share, to within a sample: source s's j-th draw (in a random order of its
    draws) lands at a uniformly random place in the j-th of `counts[s]` equal slices of the epoch. So the first
    10,000 samples of an epoch hold each source's share to within 1/10,000, and the order is random within it."""
    total = sum(counts)
    keys, start = [], 0
    for n in counts:
        if n:
            within = torch.randperm(n, generator=generator)
            jitter = torch.rand(n, generator=generator, dtype=torch.float64)
            keys.append(((torch.arange(n, dtype=torch.float64) + jitter) * (total / n), start + within))
        start += n
    places = torch.cat([k for k, _ in keys])
    draws = torch.cat([d for _, d in keys])
    return draws[torch.argsort(places, stable=True)].tolist()


class MixtureSampler(Sampler[int]):
    """The rows of each epoch's draws in one order: `arrange` `random`, `modality` (`has_image`, one optimizer
    step's samples `step_size`) or `length` (`lengths`, `step_size` the per-device batch)."""

    def __init__(
        self,
        plan: Plan,
        seed: int,
        arrange: str = "random",
        *,
        has_image: list[bool] | None = None,
        lengths: list[int] | None = None,
        step_size: int = 1,
        ids: list[str] | None = None,
        indices: list[int] | None = None,
        record_to: str | Path | None = None,
    ):
        self.plan, self.seed, self.arrange = plan, seed, arrange
        self.has_image, self.lengths, self.step_size = has_image, lengths, step_size
        self.ids, self.indices = ids, indices
        self.record_to = None if record_to is None else Path(record_to)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.plan.samples_per_epoch

    def order(self, epoch: int) -> list[int]:
        by_source = epoch_rows(self.plan, self.seed, epoch)
        drawn = [r for rows in by_source for r in rows]
        generator = _generator(self.seed, "order", epoch)
        if self.arrange == "modality":
            positions = modality_grouped_indices([self.has_image[r] for r in drawn], self.step_size, generator)
        elif self.arrange == "length":
            from transformers.trainer_pt_utils import get_length_grouped_indices

            lengths = [self.lengths[r] for r in drawn]
            positions = get_length_grouped_indices(lengths, self.step_size, generator=generator)
        else:
            positions = stratified_positions([len(rows) for rows in by_source], generator)
        if self.record_to is not None:
            self._record(epoch, by_source)
        return [drawn[k] for k in positions]

    def __iter__(self):
        return iter(self.order(self.epoch))

    def _record(self, epoch: int, by_source: list[list[int]]) -> None:
        lines = []
        for source, rows in zip(self.plan.sources, by_source, strict=True):
            ids, indices = [self.ids[r] for r in rows], [self.indices[r] for r in rows]
            entry = {"source": source.name, "ids": ids, "indices": indices}
            lines.append(json.dumps(entry) + "\n")
        text = "".join(lines)
        path = self.record_to / f"epoch-{epoch}.jsonl"
        if path.is_file():
            if path.read_text(encoding="utf-8") != text:
                log.warning(
                    "%s: this epoch's draws differ from the ones recorded when it was first trained (the data changed "
                    "under the run?); the new draws are recorded",
                    path,
                )
            else:
                return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def read_epoch(run_folder: str | Path, epoch: int) -> dict[str, list]:
    """A run's recorded draws of one epoch: source name -> the record ids drawn (in draw order)."""
    path = Path(run_folder) / RECORD_FOLDER / f"epoch-{epoch}.jsonl"
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        out[entry["source"]] = entry["ids"]
    return out
