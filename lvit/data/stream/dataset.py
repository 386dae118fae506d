"""`data.streaming: true`: the training data read as it is trained on, never whole in memory.

`StreamedData` is a `torch.utils.data.IterableDataset` of training rows (the in-memory dataset's columns, images
inline): every process and data-loader worker is one reader (`part` of `parts`) that takes its own shards of every
source (`lvit.data.stream.source_stream`), and a mixture's sources are interleaved by weight (`mix_sources`): a
source's j-th draw comes at a seeded random moment within the j-th of its equal slices of the stream, so after
any number of draws each source has had its share to within one draw, and the order is random within that.
Sources are endless (each starts its next epoch when it runs out), so the shares hold however long the run;
`training.max_steps` sets its length.

Where every reader is (`state_dict`: each source's place and the interleaving's) goes into every checkpoint
through torchdata's `StatefulDataLoader` (`lvit.train.trainer`), which saves and restores it per worker, so a
resumed run continues at the sample after the last one trained, in the same order. Resuming needs the same
processes and workers as the run it continues.

Why lvit reads the shards itself rather than through `datasets`' streaming or the `webdataset` package: their
shuffle buffers are lost on resume (`datasets.IterableDataset.state_dict`'s documentation says so), so a resumed
run would not see the samples the stopped one would have; and a sample whose JSON does not parse ends their
stream, where lvit skips it and lists it. The files are opened with `fsspec` (local or object storage), parquet
read with `pyarrow`, tar shards with the standard library.
"""

from __future__ import annotations

import copy
import os

import torch

from lvit.data.mixture import Source, sources_of
from lvit.data.stream.shards import list_shards
from lvit.data.stream.source_stream import SampleChecker, SourceStream, rng
from lvit.errors import LvitError

_CHUNK = 1024  # the seeded moments of a source's draws, made this many at a time


def streamed_sources(data, where: str = "<recipe>") -> list[tuple[Source, str, list[str]]]:
    """`(source, kind, shards)` of each source of a streamed recipe, checked: shards found, one kind each, and amounts
    a stream can draw (a weight per source; counts, fractions and first/last need the whole source)."""
    sources = sources_of(data, where)
    out = []
    for source in sources:
        if source.count is not None or source.fraction is not None:
            raise LvitError(
                f"{where}: data.streaming draws sources by weight; source {source.name!r} sets a count or fraction, "
                "which needs the whole source. Give each source a weight instead, or train without data.streaming."
            )
        kind, shards = list_shards(source.path)
        out.append((source, kind, shards))
    if len(sources) > 1 and any(s.weight is None for s in sources):
        raise LvitError(
            f"{where}: a streamed mixture interleaves its sources by weight; give every source of data.sources a "
            "weight."
        )
    return out


def check_readers(sources: list[tuple[Source, str, list[str]]], processes: int, workers: int, where: str) -> None:
    """Every reader (process x data-loader worker) needs a shard of each source: refused before any model loads."""
    readers = processes * max(1, workers)
    few = [(s.name, len(shards)) for s, _, shards in sources if len(shards) < readers]
    if few:
        shown = ", ".join(f"{name!r} has {n}" for name, n in few)
        raise LvitError(
            f"{where}: data.streaming gives each of the {readers} readers ({processes} process(es) x "
            f"{max(1, workers)} data-loader worker(s)) shards of its own, and {shown}. Split the data into at least "
            f"{readers} shards, or lower training.dataloader_num_workers."
        )


class StreamedData(torch.utils.data.IterableDataset):
    """The streamed training rows of a recipe's data; see the module docstring. `encoders`: template ->
    `ConversationEncoder`; `block`: `data.shuffle_buffer`; `skipped_file`: where skipped samples are listed."""

    def __init__(self, data, encoders: dict, seed: int, skipped_file=None, where: str = "<recipe>", sources=None):
        super().__init__()
        self.sources = sources if sources is not None else streamed_sources(data, where)
        """`(source, kind, shards)` of each source (`streamed_sources`; given when the caller listed them already)."""
        self.encoders = encoders
        self.seed, self.block = seed, data.shuffle_buffer
        self.skipped_file = None if skipped_file is None else str(skipped_file)
        self.mixture = len(self.sources) > 1 or data.sources is not None
        weights = [s.weight or 1.0 for s, _, _ in self.sources]
        total = sum(weights)
        self.shares = [w / total for w in weights]
        self._state: dict | None = None
        self._loaded: dict | None = None

    @property
    def names(self) -> list[str]:
        return [s.name for s, _, _ in self.sources]

    def state_dict(self) -> dict:
        return copy.deepcopy(self._state) if self._state is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._loaded = copy.deepcopy(state) if state else None

    def __iter__(self):
        part, parts = reader_part()
        loaded = self._loaded
        if loaded and loaded.get("parts") != parts:
            raise LvitError(
                f"data.streaming: the checkpoint's data position was saved by {loaded.get('parts')} readers (processes "
                f"x data-loader workers), this run has {parts}; resume with the same processes and "
                "training.dataloader_num_workers."
            )
        streams = []
        for k, (source, kind, shards) in enumerate(self.sources):
            index = k if self.mixture else None
            checker = SampleChecker(source, index, self.encoders[source.template], self.skipped_file)
            stream = SourceStream(source, shards, kind, self.seed, self.block, checker, part, parts)
            if loaded:
                stream.resume(loaded["sources"][k])
            streams.append(stream)
        drawn = list(loaded["drawn"]) if loaded else [0] * len(streams)
        iters = [iter(s) for s in streams]
        for k in mix_sources(self.shares, self.seed, part, drawn):
            row = next(iters[k])
            drawn[k] += 1
            self._state = {"parts": parts, "drawn": list(drawn), "sources": [dict(s.state) for s in streams]}
            yield row


def mix_sources(shares: list[float], seed: int, part: int, drawn: list[int]):
    """The source of each next draw, endlessly, from `drawn` draws of each so far: source s's j-th draw comes at
    `(j + u) / shares[s]`, u seeded by (seed, part, s, j), the earliest first (see the module docstring)."""
    if len(shares) == 1:
        while True:
            yield 0
    chunks: dict[tuple[int, int], list[float]] = {}

    def moment(s: int, j: int) -> float:
        key = (s, j // _CHUNK)
        if key not in chunks:
            if len(chunks) > 4 * len(shares):  # keep only the chunks in use
                chunks.clear()
            chunks[key] = rng(seed, "mix", part, s, key[1]).random(_CHUNK).tolist()
        return (j + chunks[key][j % _CHUNK]) / shares[s]

    drawn = list(drawn)
    while True:
        k = min(range(len(shares)), key=lambda s: moment(s, drawn[s]))
        drawn[k] += 1
        yield k


def reader_part() -> tuple[int, int]:
    """`(part, parts)`: this reader (process x data-loader worker) among all of them."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    worker = torch.utils.data.get_worker_info()
    workers, wid = (worker.num_workers, worker.id) if worker is not None else (1, 0)
    return rank * workers + wid, world * workers
