"""The training data under several processes: checked once, by rank 0, and the same records on every rank.

`lvit.data.dataset.prepare` reads every record, checks every image (a header read per distinct image, on a
shared filesystem the slow part) and measures every sample. Under torchrun / accelerate each process would
do all of it, on every node at once, and each would log and judge on its own. `prepare_once` runs it on
global rank 0 only and broadcasts the outcome (`torch.distributed.broadcast_object_list`): the kept records'
indices and lengths, the records left out and the total, or rank 0's `LvitError`, which every rank then
raises (no rank waits forever for a rank that stopped). The other ranks read the records (parsing only:
no image is opened) and keep exactly rank 0's, in rank 0's order, so every rank's dataset is the same.
With one process it is `prepare`. The other ranks wait within the process group's timeout
(`training.ddp_timeout`, `TrainingArguments`' 1800 s by default), which a very large dataset's checks may need
raised (docs/multi-node.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lvit.data.dataset import Prepared, Skipped, prepare, training_dataset
from lvit.data.mixture import is_mixture, sources_of
from lvit.data.mixture_dataset import MixturePart, combine, prepare_mixture
from lvit.data.reader import read_all
from lvit.errors import LvitError

log = logging.getLogger(__name__)


@dataclass
class _Outcome:
    """What rank 0 sends: its `Prepared` without the dataset (rebuilt from `kept`) and the report."""

    kept: list[list[tuple[int, int]]]
    """Per source (one unless a mixture): (record index, length in tokens) of the records to train on, in dataset
    order."""
    dropped: list[Skipped]
    skipped: list[Skipped]
    totals: list[int]
    """Per source: the records read."""


@dataclass
class _Total:
    """The part of `lvit.data.check.Inspection` that `training_dataset` reads."""

    total: int


def _distributed():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _prepare(data, encoders, source: str) -> Prepared:
    """`prepare` for one source, `prepare_mixture` for a mixture. `encoders`: a `ConversationEncoder`, or template
    name -> encoder (a mixture whose sources differ in template)."""
    if not is_mixture(data):
        encoder = encoders if not isinstance(encoders, dict) else encoders[data.template]
        return prepare(data, encoder, source)
    if not isinstance(encoders, dict):
        encoders = {data.template: encoders}
    return prepare_mixture(data, encoders, source)


def prepare_once(data, encoders, source: str = "<recipe>") -> Prepared:
    """`prepare` (or `prepare_mixture`) on rank 0, its outcome shared with every rank (see the module docstring).
    On ranks other than 0 the returned `Prepared.report` is None (the report is rank 0's to print)."""
    dist = _distributed()
    if dist is None:
        return _prepare(data, encoders, source)
    prepared = None
    if dist.get_rank() == 0:
        try:
            prepared = _prepare(data, encoders, source)
            kept, totals = _kept(prepared, data)
            message = ("ok", _Outcome(kept, prepared.dropped, prepared.skipped, totals))
        except LvitError as exc:
            message = ("error", str(exc))
        except BaseException as exc:  # an lvit bug, a system error or Ctrl-C: stop every rank, say where it came from
            message = ("crash", f"preparing the data failed on rank 0: {type(exc).__name__}: {exc}")
            box = [message]
            dist.broadcast_object_list(box, src=0)
            raise
        box = [message]
    else:
        box = [None]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise LvitError(value)
    if kind == "crash":
        raise RuntimeError(value)
    if prepared is not None:
        return prepared
    return _rebuild(data, value, source)


def _kept(prepared: Prepared, data) -> tuple[list[list[tuple[int, int]]], list[int]]:
    table = prepared.dataset
    pairs = list(zip(table["index"], table["length"], strict=True))
    if prepared.plan is None:
        return [pairs], [prepared.total]
    by_source = [[pairs[r] for r in rows] for rows in _all_rows(table)]
    return by_source, list(prepared.plan.totals)


def _all_rows(table) -> list[list[int]]:
    rows: list[list[int]] = []
    for row, k in enumerate(table["source"]):
        while len(rows) <= k:
            rows.append([])
        rows[k].append(row)
    return rows


def _rebuild(data, outcome: _Outcome, where: str) -> Prepared:
    """The dataset of rank 0's kept records, from this rank's own reading of the data (no image opened)."""
    if not is_mixture(data):
        dataset = _rebuild_one(data.path, data.format, outcome.kept[0], outcome.totals[0])
        return Prepared(dataset, outcome.dropped, outcome.skipped, outcome.totals[0], None)
    sources = sources_of(data, where)
    parts = []
    for source, kept, total in zip(sources, outcome.kept, outcome.totals, strict=True):
        dataset = _rebuild_one(source.path, source.format, kept, total)
        parts.append(MixturePart(source, Prepared(dataset, [], [], total, None)))
    combined = combine(parts, data.samples_per_epoch)
    combined.dropped, combined.skipped = outcome.dropped, outcome.skipped
    return combined


def _rebuild_one(path, fmt: str, kept_pairs: list[tuple[int, int]], total: int):
    read = read_all(path, fmt)
    by_index = {record.index: record for record in read.records}
    missing = [index for index, _ in kept_pairs if index not in by_index]
    if missing or read.total != total:
        raise LvitError(
            f"{path}: this process reads {read.total} records, rank 0 read {total} (records "
            f"{missing[:5]} missing here): every node must see the same data file (a shared filesystem, or the "
            "same copy at the same path)."
        )
    kept = [(by_index[index], length) for index, length in kept_pairs]
    return training_dataset(_Total(read.total), kept)
