"""One streamed source: its shards read in a seeded order, a bounded block of samples shuffled at a time, each sample
checked as `lvit data check` checks a record, and where it is (`state`) after every sample.

- The order (lvit's own, chosen so a resumed run continues at the very sample it stopped after): each epoch of the
  source shuffles its shards (seeded by the source and the epoch) and this reader takes every `parts`-th one from
  its `part` (a process and data-loader worker: `lvit.data.stream.dataset`). It reads `block` samples ahead (the
  bounded buffer, `data.shuffle_buffer`) and yields them in a permutation seeded by where the block starts. The
  state is (epoch, where the block starts, how many of it were taken): a resumed reader reopens the shard there,
  reads the same block and permutes it the same way. `block` 0: no shuffling at all (shards and samples in file
  order, every epoch). The source is endless: after its last shard the next epoch starts.
- The checks (`SampleChecker`), with the checker's reasons and kinds: the record's schema (LLaVA or chat), each
  image (found, and its header readable; an image cut off after its header is found when the collator decodes
  it, as for in-memory data), the template, and `data.max_length` under `data.overlong`. Duplicate ids are not
  looked for (that needs every id). A sample that fails is listed in `skipped_records.jsonl` with its shard and
  place (`data.on_bad_record: skip`, and over-long samples dropped), or stops the run (`error`): the steps done are
  saved and the same command resumes.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from lvit.data.check import overlong_reason
from lvit.data.dataset import Skipped, append_skipped
from lvit.data.images import describe_image, image_exists, oriented_size, probe_image
from lvit.data.mixture import Source
from lvit.data.normalise import normalise, normalise_chat
from lvit.data.records import RecordError
from lvit.data.sources import InlineImage
from lvit.data.stream.shards import RawSample, read_shard
from lvit.errors import BAD_RECORD_FIXES, LvitError, UnreadableRecord

log = logging.getLogger(__name__)
_WARNED = 5  # skipped samples each reader names in the log (all of them are in skipped_records.jsonl)
_UNSHUFFLED_BLOCK = 64  # data.shuffle_buffer 0: samples read ahead (in order) to check them in one tokenizer call


def rng(seed: int, *parts) -> np.random.Generator:
    return np.random.default_rng([seed % 2**32, zlib.crc32(repr(parts).encode())])


@dataclass
class Problem:
    """Why a streamed sample cannot be trained on."""

    raw: RawSample
    rid: str | None
    kind: str
    reason: str
    stop: bool = False
    """data.overlong: error."""

    @property
    def where(self) -> str:
        return f"{self.raw.where} (id {self.rid!r})" if self.rid is not None else self.raw.where


class SampleChecker:
    """A raw sample -> a training row (`lvit.data.dataset`'s columns, images inline), or None (skipped), or
    `UnreadableRecord` (the run stops)."""

    def __init__(
        self, source: Source, index: int | None, encoder, skipped_file: str | None, report_image_tokens: bool = False
    ):
        self.source, self.index, self.encoder = source, index, encoder
        self.skipped_file = skipped_file
        self.warned = 0
        self.report_image_tokens = report_image_tokens
        """The checks' rows carry each image's tokens (`image_tokens`, AnyRes) for their report; training's do not."""

    def check_many(self, raws: list[RawSample]) -> list:
        """Each sample's training row, or its `Problem` (reported by `report` when its turn comes); the template and
        the lengths measured for all of them at once (one tokenizer call)."""
        out: list = []
        parsed_at: list[tuple[int, object]] = []
        for raw in raws:
            problem, parsed = self._parse(raw)
            out.append(problem)
            if parsed is not None:
                parsed_at.append((len(out) - 1, parsed))
        if not parsed_at:
            return out
        lengths = self.encoder.lengths([p.conversation for _, p in parsed_at])
        cap, policy = self.source.max_length, self.source.overlong
        for j, (i, parsed) in enumerate(parsed_at):
            raw = raws[i]
            if j in lengths.rejected:
                out[i] = Problem(raw, parsed.id, "template", lengths.rejected[j])
                continue
            n = lengths.total[j]
            reason = overlong_reason(n, lengths.image_end[j], lengths.first_trained[j], cap, policy)
            if reason is not None:
                out[i] = Problem(raw, parsed.id, "too_long", reason, stop=policy == "error")
                continue
            row = parsed.to_row()
            row["length"], row["index"] = min(n, cap), raw.offset
            row["inline_images"] = [x.data if isinstance(x, InlineImage) else None for x in parsed.images]
            if self.index is not None:
                row["source"] = self.index
            if self.report_image_tokens and parsed.conversation.image_tokens:
                row["image_tokens"] = list(parsed.conversation.image_tokens)
            out[i] = row
        return out

    def _parse(self, raw: RawSample):
        """`(problem, None)` or `(None, record)`: the record's schema and its images (found, header readable)."""
        if raw.record is None:
            return Problem(raw, None, "invalid_json", raw.error), None
        record = raw.record
        norm = normalise_chat if "messages" in record else normalise
        try:
            parsed = norm(record, raw.offset, raw.line)
        except RecordError as exc:
            return Problem(raw, exc.id, exc.kind, exc.reason), None
        folder = self.source.image_folder
        for image in parsed.images:
            found = (
                ("image_missing", "error", f"image not found: {describe_image(image, folder)}")
                if not image_exists(image, folder)
                else probe_image(image, folder, decode=False)
            )
            if found is not None and found[1] == "error":
                return Problem(raw, parsed.id, found[0], found[2]), None
        if self.encoder.image_tokens_for_size is not None and parsed.images:  # AnyRes: tokens from each size
            sizes = [oriented_size(image, folder) for image in parsed.images]
            parsed.conversation = self.encoder.sized(parsed.conversation, sizes)
        return None, parsed

    def report(self, problem: Problem) -> None:
        """A sample that cannot be trained on, met in the stream: listed and skipped, or the run stops."""
        if problem.stop:
            raise UnreadableRecord(f"{problem.where}: {problem.reason} and data.overlong is 'error'")
        self._bad(problem.raw, problem.rid, problem.kind, problem.reason, always_skip=problem.kind == "too_long")

    def _bad(self, raw: RawSample, rid, kind: str, reason: str, always_skip: bool = False) -> None:
        where = f"{raw.where} (id {rid!r})" if rid is not None else raw.where
        if self.source.on_bad_record != "skip" and not always_skip:
            named = f"{where} of data source {self.source.name!r}"
            raise UnreadableRecord(f"{named}: {reason} [{kind}]; {BAD_RECORD_FIXES}")
        source = self.source.name if self.index is not None else None
        if self.skipped_file is not None:
            append_skipped(Skipped(rid, raw.offset, kind, f"{where}: {reason}", source), self.skipped_file)
        if self.warned < _WARNED:
            log.warning("%s left out: %s [%s]", where, reason, kind)
            self.warned += 1
        return None


class SourceStream:
    """The endless stream of one source's training rows for one reader (`part` of `parts`); see the module
    docstring. `state` is where it is after the last row it yielded; `resume(state)` before iterating."""

    def __init__(self, source: Source, shards: list[str], kind: str, seed: int, block: int, checker, part, parts):
        self.source, self.shards, self.kind = source, shards, kind
        self.seed, self.block, self.checker = seed, block, checker
        self.part, self.parts = part, parts
        self.state = {"epoch": 0, "shard": 0, "offset": 0, "taken": 0}
        self._reader = None  # (shard index, next offset, iterator) of the shard being read

    def resume(self, state: dict) -> None:
        self.state = dict(state)

    def mine(self, epoch: int) -> list[str]:
        """This reader's shards in `epoch`: every `parts`-th of the epoch's shard order, from `part`."""
        order = list(self.shards)
        if self.block > 0:
            order = [order[i] for i in rng(self.seed, "shards", self.source.name, epoch).permutation(len(order))]
        return order[self.part :: self.parts]

    def __iter__(self) -> Iterator[dict]:
        state = self.state
        epoch, shard, offset, taken = state["epoch"], state["shard"], state["offset"], state["taken"]
        empty, gave = 0, False  # epochs in a row that gave no row; whether this one gave one
        while True:
            mine = self.mine(epoch)
            if not mine:
                raise LvitError(
                    f"data source {self.source.name!r}: {len(self.shards)} shard(s) for {self.parts} readers "
                    "(processes x data-loader workers); each reader needs a shard of its own: split the data into more "
                    "shards, "
                    "or lower training.dataloader_num_workers."
                )
            block, end = self._read_block(mine, shard, offset)
            if not block:  # the epoch is over
                empty = 0 if gave else empty + 1
                if empty > 1:  # a whole epoch (the first may be a resumed part) without a row
                    raise LvitError(f"data source {self.source.name!r}: no sample of it can be trained on.")
                epoch, shard, offset, taken, gave = epoch + 1, 0, 0, 0, False
                self.state = {"epoch": epoch, "shard": 0, "offset": 0, "taken": 0}
                continue
            order = range(len(block))
            if self.block > 0:
                seeded = rng(self.seed, "block", self.source.name, epoch, self.part, shard, offset)
                order = seeded.permutation(len(block))
            checked = self.checker.check_many(block)
            for i in range(taken, len(block)):
                row = checked[order[i]]
                self.state = {"epoch": epoch, "shard": shard, "offset": offset, "taken": i + 1}
                if isinstance(row, Problem):
                    self.checker.report(row)
                else:
                    gave = True
                    yield row
            shard, offset, taken = end[0], end[1], 0
            self.state = {"epoch": epoch, "shard": shard, "offset": offset, "taken": 0}

    def _read_block(self, mine: list[str], shard: int, offset: int) -> tuple[list[RawSample], tuple[int, int]]:
        """Up to `block` samples (`_UNSHUFFLED_BLOCK` without shuffling) from (shard, offset) on, across shards; and
        where the next block starts."""
        size = self.block if self.block > 0 else _UNSHUFFLED_BLOCK
        out: list[RawSample] = []
        while len(out) < size and shard < len(mine):
            reader = self._reader
            if reader is None or reader[0] != (mine[shard], shard) or reader[1] != offset:
                reader = self._reader = [(mine[shard], shard), offset, read_shard(mine[shard], self.kind, offset)]
            sample = next(reader[2], None)
            if sample is None:
                self._reader = None
                shard, offset = shard + 1, 0
                continue
            out.append(sample)
            offset += 1
            reader[1] = offset
        return out, (shard, offset)
