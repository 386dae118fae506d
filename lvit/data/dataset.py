"""The training dataset, the last step of `lvit.data` before batches: checked records as a `datasets.Dataset`.

`prepare` reads, checks and measures the records (token count, image tokens included) once, up front,
with the same `lvit.data.check.inspect_data` that `lvit data check` runs, and keeps the records that can
be trained on as rows (`id`, `image_path`, `image_paths`, `roles`, `texts`, `system`, `length`, `index`;
`image_paths` lists every image of a record with several). The token ids are rebuilt by the collator
(`lvit.data.collator`), in the data-loader workers, together with the image decoding, so a large dataset
is neither held tokenized nor held as images in memory. For a Hugging Face dataset the rows also carry
the source's image column, undecoded (`image`: the encoded bytes): the training dataset is the source
dataset's kept rows selected (memory-mapped, not copied) beside lvit's columns, and the collator reads
each image's bytes from its row.

Records that cannot be trained on stop the run (`data.on_bad_record: error`, the default) with
the checker's report, or are left out (`skip`); every record left out, for any reason (invalid,
too long, an image that fails to decode mid-run), is written with its reason to
`skipped_records.jsonl` in the run folder.
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from lvit.data.check import Inspection, inspect_data
from lvit.data.records import Record
from lvit.data.report import CheckReport, nothing_to_train
from lvit.data.sources import EmbeddedImage
from lvit.errors import LvitError
from lvit.runs.files import SKIPPED_FILE
from lvit.templates.encoder import ConversationEncoder

log = logging.getLogger(__name__)

_SHOWN = 20  # problems listed in an error message


@dataclass
class Skipped:
    """A record left out of training, for any reason; one line of `skipped_records.jsonl`."""

    id: str | None
    index: int | None
    kind: str
    reason: str
    source: str | None = None
    """The source it belongs to, in a mixture (`data.sources`)."""

    def to_json(self) -> dict:
        out = asdict(self)
        if out["source"] is None:
            out.pop("source")
        return out


@dataclass
class Prepared:
    dataset: object
    """The `datasets.Dataset` to train on."""
    dropped: list[Skipped]
    """Left out as too long (data.overlong; kind `too_long`)."""
    skipped: list[Skipped]
    """Every record left out: invalid ones (data.on_bad_record: skip) and the `dropped` ones."""
    total: int
    report: CheckReport | None
    plan: object = None
    """A mixture's `lvit.data.mixture.Plan` (what each epoch draws from each source); None for one source."""


def prepare(data, encoder: ConversationEncoder, source: str = "<recipe>") -> Prepared:
    """Read, check and measure the data named by a recipe's `data` section.

    Raises `LvitError` with the checker's report when a record cannot be trained on and
    `data.on_bad_record` is `error`, or a sample is too long and `data.overlong` is `error`.
    """
    insp, report, bad = inspect_for_training(data, encoder, source)
    skipped = []
    by_record: dict[int | None, list] = {}
    for p in bad:
        by_record.setdefault(p.index, []).append(p)
    for index, problems in by_record.items():
        skipped.append(Skipped(problems[0].id, index, problems[0].kind, "; ".join(p.reason for p in problems)))
    dropped = [Skipped(r.id, r.index, "too_long", reason) for r, reason in insp.dropped]
    skipped += dropped
    skipped.sort(key=lambda s: -1 if s.index is None else s.index)

    dropped_ids = {id(r) for r, _ in insp.dropped}
    cap = data.max_length  # a truncated sample is max_length long
    kept = [(r, n if n <= cap else cap) for r, n in zip(insp.usable, insp.lengths.total, strict=True)]
    if dropped_ids:
        kept = [(r, n) for r, n in kept if id(r) not in dropped_ids]
    return Prepared(training_dataset(insp, kept), dropped, skipped, insp.total, report)


def inspect_for_training(data, encoder: ConversationEncoder, source: str = "<recipe>"):
    """`prepare`'s checks, without building the dataset (`lvit finetune --dry-run` runs them too):
    `(inspection, report, errors that are not too_long)`; raises `LvitError` as `prepare` does."""
    on_bad = getattr(data, "on_bad_record", "error")
    insp = inspect_data(
        data.path,
        getattr(data, "format", "auto"),
        data.image_folder,
        encoder=encoder,
        max_length=data.max_length,
        overlong=data.overlong,
    )
    report = CheckReport(insp, source)
    bad = [p for p in insp.errors if p.kind != "too_long"]
    bad_records = {p.index for p in bad}
    if bad and on_bad == "error":
        raise LvitError(bad_records_message(data.path, report, bad, len(bad_records), source))
    if data.overlong == "error" and insp.dropped:
        shown = "\n  ".join(f"{r.where}: {reason}" for r, reason in insp.dropped[:_SHOWN])
        raise LvitError(
            f"{data.path}: {len(insp.dropped)} records exceed data.max_length={data.max_length} and "
            f"data.overlong is 'error' (in {source}):\n  {shown}\n"
            "Raise data.max_length, or set data.overlong to 'truncate' or 'drop'."
        )
    if not insp.trainable:
        raise LvitError(f"{data.path} (data.path in {source}): {nothing_to_train(insp)}.")
    if insp.warnings:
        kinds = Counter(p.kind for p in insp.warnings)
        log.info(
            "%s: %d warning(s) (%s); `lvit data check %s --recipe %s` lists them",
            data.path,
            len(insp.warnings),
            ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())),
            data.path,
            source,
        )
    return insp, report, bad


def training_dataset(insp: Inspection, kept: list[tuple[Record, int]]):
    """The `datasets.Dataset` of the `kept` records (each with its length in tokens).

    lvit's columns, in memory. From a Hugging Face dataset with embedded images: lvit's columns for every
    row of the source (rows left out hold blanks) beside the source's image column, undecoded, then the
    kept rows selected; so the images are neither copied nor decoded."""
    import datasets

    source = next((r.image.source for r, _ in kept if isinstance(r.image, EmbeddedImage)), None)
    images = source.images() if source is not None else None
    n_rows = len(kept) if images is None else insp.total
    columns: dict[str, list] = {
        "id": [""] * n_rows,
        "image_path": [None] * n_rows,
        "image_paths": [[]] * n_rows,
        "roles": [[]] * n_rows,
        "texts": [[]] * n_rows,
        "system": [None] * n_rows,
        "length": [0] * n_rows,
        "index": [-1] * n_rows,
    }
    for i, (record, length) in enumerate(kept):
        row = record.to_row()
        row["length"] = length
        row["index"] = record.index
        at = i if images is None else record.index  # the row of a Hugging Face dataset is the record's index
        for key, value in row.items():
            columns[key][at] = value
    dataset = datasets.Dataset.from_dict(columns, features=_features())
    if images is None:
        return dataset
    column = source.image_column
    if column != "image":
        images = images.rename_column(column, "image")
    dataset = datasets.concatenate_datasets([dataset, images], axis=1)
    rows = [record.index for record, _ in kept]
    if len(rows) == insp.total:
        return dataset
    # A fingerprint from the rows' bytes: `datasets` would hash the list item by item (seconds for 1M rows).
    digest = hashlib.sha256(source.name.encode() + array.array("q", rows).tobytes()).hexdigest()[:32]
    return dataset.select(rows, new_fingerprint=f"lvit-rows-{digest}")  # the row numbers, kept in memory


def _features():
    import datasets

    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "image_path": datasets.Value("string"),
            "image_paths": datasets.List(datasets.Value("string")),
            "roles": datasets.List(datasets.Value("string")),
            "texts": datasets.List(datasets.Value("string")),
            "system": datasets.Value("string"),
            "length": datasets.Value("int64"),
            "index": datasets.Value("int64"),
        }
    )


def bad_records_message(path, report: CheckReport, bad: list, n_records: int, source: str) -> str:
    """The error training stops with: the checker's problem lines and counts by kind."""
    lines = report.format_problems(bad, limit=_SHOWN)
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(Counter(p.kind for p in bad).items()))
    shown = "\n  ".join(lines)
    return (
        f"{path}: {n_records} of {report.inspection.total} records cannot be trained on (data.path in {source}):\n"
        f"  {shown}\nProblems by kind: {kinds}.\nFix or remove these records (`lvit data check {path} --recipe "
        f"{source}` lists them all), or set data.on_bad_record: skip to train on the rest (each skipped record is "
        f"listed with its reason in {SKIPPED_FILE} in the run folder)."
    )


def write_skipped(skipped: list[Skipped], path: Path, append: bool = False) -> None:
    """Write `skipped_records.jsonl`: one `{"id", "index", "kind", "reason"}` line per record left out.

    `append` keeps the lines already there (a resumed run keeps what its first part recorded;
    `tidy_skipped` removes the repeats at the end)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w", encoding="utf-8") as f:
        for s in skipped:
            f.write(json.dumps(s.to_json()) + "\n")


def append_skipped(skipped: Skipped, path: str | Path) -> None:
    """Append one line (one `write`, O_APPEND: safe from several data-loader workers)."""
    line = (json.dumps(skipped.to_json()) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def tidy_skipped(path: Path) -> int:
    """Drop repeated lines from `skipped_records.jsonl` (a record whose image fails is met once per epoch and
    worker) and return how many records it lists; 0 when there is no file."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = list(dict.fromkeys(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()))
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)
