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
from lvit.data.reader import read_all
from lvit.errors import LvitError

log = logging.getLogger(__name__)


@dataclass
class _Outcome:
    """What rank 0 sends: its `Prepared` without the dataset (rebuilt from `kept`) and the report."""

    kept: list[tuple[int, int]]
    """(record index, length in tokens) of the records to train on, in dataset order."""
    dropped: list[Skipped]
    skipped: list[Skipped]
    total: int


@dataclass
class _Total:
    """The part of `lvit.data.check.Inspection` that `training_dataset` reads."""

    total: int


def _distributed():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def prepare_once(data, encoder, source: str = "<recipe>") -> Prepared:
    """`prepare` on rank 0, its outcome shared with every rank (see the module docstring). On ranks other
    than 0 the returned `Prepared.report` is None (the report is rank 0's to print)."""
    dist = _distributed()
    if dist is None:
        return prepare(data, encoder, source)
    prepared = None
    if dist.get_rank() == 0:
        try:
            prepared = prepare(data, encoder, source)
            kept = list(zip(prepared.dataset["index"], prepared.dataset["length"], strict=True))
            message = ("ok", _Outcome(kept, prepared.dropped, prepared.skipped, prepared.total))
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
    return _rebuild(data, value)


def _rebuild(data, outcome: _Outcome) -> Prepared:
    """The dataset of rank 0's kept records, from this rank's own reading of the data (no image opened)."""
    read = read_all(data.path, getattr(data, "format", "auto"))
    by_index = {record.index: record for record in read.records}
    missing = [index for index, _ in outcome.kept if index not in by_index]
    if missing or read.total != outcome.total:
        raise LvitError(
            f"{data.path}: this process reads {read.total} records, rank 0 read {outcome.total} (records "
            f"{missing[:5]} missing here): every node must see the same data file (a shared filesystem, or the "
            "same copy at the same path)."
        )
    kept = [(by_index[index], length) for index, length in outcome.kept]
    dataset = training_dataset(_Total(read.total), kept)
    return Prepared(dataset, outcome.dropped, outcome.skipped, outcome.total, None)
