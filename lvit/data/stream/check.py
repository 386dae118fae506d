"""Checking streamed data without holding it: `lvit data check --recipe` and `--dry-run` on a `data.streaming` recipe,
and the first samples `lvit data preview` shows.

Each source's shards are read in file order, a chunk of samples at a time, through the same checks a streamed run
makes (`lvit.data.stream.source_stream.SampleChecker`): the counts, the problems (each with its shard and place)
and the lengths are kept, never the records, so memory stays flat however large the data.
"""

from __future__ import annotations

import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from itertools import islice

from lvit.data.mixture import Source
from lvit.data.report import histogram, image_token_summary, percentiles
from lvit.data.stream.dataset import streamed_sources
from lvit.data.stream.shards import RawSample, read_shard
from lvit.data.stream.source_stream import Problem, SampleChecker

_CHUNK = 512
_SHOWN = 20


def checked_samples(source: Source, kind: str, shards: list[str], encoder, limit: int | None = None) -> Iterator:
    """`(raw, row or Problem)` for the samples of a source in file order (at most `limit`), nothing skipped silently
    and nothing stopping: every problem comes back as a `Problem`."""
    checker = SampleChecker(replace(source, on_bad_record="skip"), None, encoder, None, report_image_tokens=True)
    raws = (raw for shard in shards for raw in read_shard(shard, kind))
    if limit is not None:
        raws = islice(raws, limit)
    while chunk := list(islice(raws, _CHUNK)):
        yield from zip(chunk, checker.check_many(chunk), strict=True)


@dataclass
class SourceCheck:
    """What one streamed source holds: counts, problems and lengths."""

    source: Source
    kind: str
    shards: int
    records: int = 0
    trainable: int = 0
    problems: list[dict] = field(default_factory=list)
    by_kind: Counter = field(default_factory=Counter)
    lengths: array.array = field(default_factory=lambda: array.array("i"))
    image_tokens: array.array = field(default_factory=lambda: array.array("i"))
    """Each image's tokens, where they depend on its size (AnyRes)."""

    def add(self, raw: RawSample, result) -> None:
        self.records += 1
        if isinstance(result, Problem):
            self.by_kind[result.kind] += 1
            entry = {"where": result.where, "id": result.rid, "kind": result.kind, "message": result.reason}
            self.problems.append(entry)
        else:
            self.trainable += 1
            self.lengths.append(result["length"])
            self.image_tokens.extend(result.get("image_tokens", ()))

    def to_json(self) -> dict:
        return {
            "name": self.source.name,
            "path": self.source.path,
            "kind": self.kind,
            "shards": self.shards,
            "records": self.records,
            "trainable": self.trainable,
            "problems_by_kind": dict(sorted(self.by_kind.items())),
            "lengths": {**percentiles(list(self.lengths)), "histogram": histogram(list(self.lengths))}
            if self.lengths
            else None,
            **({"image_tokens": image_token_summary(list(self.image_tokens))} if self.image_tokens else {}),
            "problems": self.problems,
        }


@dataclass
class StreamCheckReport:
    """`lvit data check --recipe` on streamed data: each source's `SourceCheck`."""

    parts: list[SourceCheck]
    recipe: str | None = None

    @property
    def ok(self) -> bool:
        return all(p.trainable > 0 and not p.problems for p in self.parts)

    def to_json(self) -> dict:
        return {"recipe": self.recipe, "ok": self.ok, "streaming": True, "sources": [p.to_json() for p in self.parts]}

    def format_text(self) -> str:
        lines = []
        for p in self.parts:
            lines.append(f"=== source {p.source.name!r}: {p.source.path} ({p.shards} {p.kind} shard(s)) ===")
            lines += [f"  {e['where']}: {e['message']} [{e['kind']}]" for e in p.problems[:_SHOWN]]
            if len(p.problems) > _SHOWN:
                lines.append(f"  ... and {len(p.problems) - _SHOWN} more")
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(p.by_kind.items())) or "none"
            lines.append(f"  records {p.records}, trainable {p.trainable}, problems: {kinds}")
            if p.lengths:
                ln = percentiles(list(p.lengths))
                spread = f"min {ln['min']} p50 {ln['p50']} p90 {ln['p90']} p99 {ln['p99']} max {ln['max']}"
                lines.append(f"  sequence length in tokens (image tokens included): {spread}")
            if p.image_tokens:
                t = percentiles(list(p.image_tokens))
                spread = f"min {t['min']} p50 {t['p50']} p90 {t['p90']} p99 {t['p99']} max {t['max']}"
                lines.append(
                    f"  image tokens per image (AnyRes: from each image's size), {len(p.image_tokens)}: {spread}"
                )
        verdict = "errors: a streamed run skips these (data.on_bad_record: skip) or stops on the first"
        lines.append("no errors" if self.ok else verdict)
        return "\n".join(lines)


def check_streamed(recipe, encoders: dict) -> StreamCheckReport:
    """Every sample of every source of a streamed recipe; see the module docstring. `encoders`: template ->
    `ConversationEncoder`."""
    parts = []
    for source, kind, shards in streamed_sources(recipe.data, recipe.source):
        part = SourceCheck(source, kind, len(shards))
        for raw, result in checked_samples(source, kind, shards, encoders[source.template]):
            part.add(raw, result)
        parts.append(part)
    return StreamCheckReport(parts, recipe.source)
