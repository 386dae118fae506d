"""A mixture's training dataset: each source read, checked and measured on its own (`lvit.data.dataset.prepare`,
with the source's image folder, format, template and `on_bad_record`), then the sources' rows end to end in one
`datasets.Dataset` with a `source` column (the source's place in `data.sources`), and the `Plan` of what each
epoch draws from each (`lvit.data.mixture`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from lvit.data.dataset import Prepared, prepare
from lvit.data.mixture import Plan, Source, plan, sources_of
from lvit.errors import LvitError
from lvit.runs.files import MIXTURE_FILE

log = logging.getLogger(__name__)


@dataclass
class MixturePart:
    """One source's part of a mixture: its `Prepared` (the dataset of its kept records)."""

    source: Source
    prepared: Prepared


def prepare_mixture(data, encoders: dict, where: str = "<recipe>") -> Prepared:
    """Read, check and measure every source of `data` (`encoders`: template name -> `ConversationEncoder`), and
    combine them (`combine`). A source that cannot be trained on stops the run with its own checker's report."""
    sources = sources_of(data, where)
    parts = []
    for source in sources:
        try:
            prepared = prepare(source, encoders[source.template], where)  # a Source has the data keys prepare reads
        except LvitError as exc:
            raise LvitError(f"data source {source.name!r}: {exc}") from None
        parts.append(MixturePart(source, prepared))
    return combine(parts, data.samples_per_epoch)


def combine(parts: list[MixturePart], samples_per_epoch: int | None) -> Prepared:
    """The sources' datasets end to end with a `source` column, their skipped records named by source, and the
    `Plan` (`Prepared.plan`)."""
    import datasets

    tables, rows, indices, start = [], [], [], 0
    for k, part in enumerate(parts):
        table = part.prepared.dataset
        table = table.add_column("source", [k] * len(table))
        tables.append(table)
        rows.append(list(range(start, start + len(table))))
        indices.append(list(table["index"]))
        start += len(table)
    tables = _same_columns(tables, parts)
    dataset = datasets.concatenate_datasets(tables)
    sources = [part.source for part in parts]
    mixture = plan(sources, rows, indices, [part.prepared.total for part in parts], samples_per_epoch)
    skipped = [replace(s, source=p.source.name) for p in parts for s in p.prepared.skipped]
    dropped = [replace(s, source=p.source.name) for p in parts for s in p.prepared.dropped]
    total = sum(part.prepared.total for part in parts)
    return Prepared(dataset, dropped, skipped, total, None, plan=mixture)


def _same_columns(tables: list, parts: list[MixturePart]) -> list:
    """A source with embedded images (a Hugging Face dataset's `image` column) beside sources of files: the others
    get an empty `image` column of the same type, so the datasets concatenate."""
    with_images = [t for t in tables if "image" in t.column_names]
    if not with_images:
        return tables
    feature = with_images[0].features["image"]
    if any(t.features["image"] != feature for t in with_images):
        names = [p.source.name for p, t in zip(parts, tables, strict=True) if "image" in t.column_names]
        raise LvitError(
            f"data sources {names}: their embedded images are stored differently (one image against a list); "
            "convert one of them with `lvit data convert` so they match."
        )
    return [t if "image" in t.column_names else t.add_column("image", [None] * len(t), feature=feature) for t in tables]


def plan_summary(mixture: Plan) -> str:
    """The log lines that say what each epoch draws from each source."""
    lines = [f"data mixture: {mixture.samples_per_epoch} samples an epoch from {len(mixture.sources)} sources"]
    for entry in mixture.describe():
        repeats = f", each record {entry['repeats']:.2f}x" if entry["repeats"] else ""
        lines.append(
            f"  {entry['name']}: {entry['per_epoch']} of {entry['records']} records an epoch ({entry['share']:.1%}; "
            f"requested {entry['requested']}{repeats})"
        )
    return "\n".join(lines)


def write_plan(mixture: Plan, out, seed: int) -> None:
    """The run folder's `mixture.json`: the seed, the epoch's size and, per source, its file, records, draws an epoch
    and share (written before training; the draws themselves go to `mixture/` as each epoch starts)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entry = {"seed": seed, "samples_per_epoch": mixture.samples_per_epoch, "sources": mixture.describe()}
    (out / MIXTURE_FILE).write_text(json.dumps(entry, indent=1) + "\n", encoding="utf-8")
