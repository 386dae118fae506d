"""The training dataset: checked records as a `datasets.Dataset`, and the batch collator.

Records are read, checked and measured (token count, image tokens included) once, up front, by
the same `lvit.data.check.inspect_data` that `lvit data check` runs; the token ids themselves are
rebuilt in the collator, in the data-loader workers, together with the image decoding. So a large
dataset is neither held tokenized nor held as images in memory.

Records that cannot be trained on stop the run (`data.on_bad_record: error`, the default) with
the checker's report, or are left out (`skip`); every record left out, for any reason (invalid,
too long, an image that fails to decode mid-run), is written with its reason to
`skipped_records.jsonl` in the run folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lvit.data.check import CheckReport, inspect_data
from lvit.data.check import overlong_reason as _overlong_reason
from lvit.data.images import ImageLoader
from lvit.data.records import conversation_from_row
from lvit.errors import LvitError
from lvit.templates import IGNORE_INDEX, ConversationEncoder

log = logging.getLogger("lvit")

SKIPPED_FILE = "skipped_records.jsonl"
_SHOWN = 20  # problems listed in an error message


@dataclass
class Dropped:
    """A record left out as too long for data.max_length."""

    id: str
    index: int
    reason: str


@dataclass
class Skipped:
    """A record left out of training, for any reason; one line of `skipped_records.jsonl`."""

    id: str | None
    index: int | None
    kind: str
    reason: str


@dataclass
class Prepared:
    dataset: object
    """The `datasets.Dataset` to train on."""
    dropped: list[Dropped]
    """Left out as too long (data.overlong)."""
    skipped: list[Skipped]
    """Every record left out: invalid ones (data.on_bad_record: skip) and the `dropped` ones."""
    total: int
    report: CheckReport


def prepare(data, encoder: ConversationEncoder, source: str = "<recipe>") -> Prepared:
    """Read, check and measure the data named by a recipe's `data` section.

    Raises `LvitError` with the checker's report when a record cannot be trained on and
    `data.on_bad_record` is `error`, or a sample is too long and `data.overlong` is `error`.
    """
    import datasets

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
    if insp.total == 0:
        raise LvitError(f"{data.path}: no records (data.path in {source}).")
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

    skipped = []
    by_record: dict[int | None, list] = {}
    for p in bad:
        by_record.setdefault(p.index, []).append(p)
    for index, problems in by_record.items():
        skipped.append(Skipped(problems[0].id, index, problems[0].kind, "; ".join(p.reason for p in problems)))
    dropped_ids = {id(r) for r, _ in insp.dropped}
    dropped = [Dropped(r.id, r.index, reason) for r, reason in insp.dropped]
    skipped += [Skipped(d.id, d.index, "too_long", d.reason) for d in dropped]
    skipped.sort(key=lambda s: -1 if s.index is None else s.index)

    columns: dict[str, list] = {k: [] for k in ("id", "image_path", "roles", "texts", "system", "length", "index")}
    for record, n in zip(insp.usable, insp.lengths.total, strict=True):
        if id(record) in dropped_ids:
            continue
        row = record.to_row()
        row["length"] = min(n, data.max_length)
        row["index"] = record.index
        for key, value in row.items():
            columns[key].append(value)
    if not columns["id"]:
        if insp.dropped:
            raise LvitError(f"{data.path}: every record was dropped as too long for data.max_length={data.max_length}.")
        raise LvitError(f"{data.path}: no record can be trained on (data.path in {source}); see the problems above.")
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image_path": datasets.Value("string"),
            "roles": datasets.List(datasets.Value("string")),
            "texts": datasets.List(datasets.Value("string")),
            "system": datasets.Value("string"),
            "length": datasets.Value("int64"),
            "index": datasets.Value("int64"),
        }
    )
    dataset = datasets.Dataset.from_dict(columns, features=features)
    return Prepared(dataset, dropped, skipped, insp.total, report)


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


def prepare_dataset(data, encoder: ConversationEncoder, source: str = "<recipe>"):
    """Read, validate and measure the data named by a recipe's `data` section.

    Returns `(dataset, dropped)`: a `datasets.Dataset` with one row per trainable record (columns
    `id`, `image_path`, `roles`, `texts`, `system`, `length`, `index`) and the records left out
    because they are too long for `data.max_length` under the `data.overlong` policy (with
    `data.on_bad_record: skip`, the skipped invalid records too). Raises `LvitError` listing every
    invalid record (with its id) if there is any and `data.on_bad_record` is `error`.
    """
    prepared = prepare(data, encoder, source)
    extra = [Dropped(s.id, s.index, f"{s.kind}: {s.reason}") for s in prepared.skipped if s.kind != "too_long"]
    return prepared.dataset, sorted(prepared.dropped + extra, key=lambda d: d.index)


def overlong_reason(enc, max_length: int, policy: str) -> str | None:
    """Why an encoded sample cannot be used as is under `policy`, or None if it can (possibly truncated)."""
    return _overlong_reason(len(enc.input_ids), enc.image_end, enc.first_trained, max_length, policy)


def write_dropped(dropped: list[Dropped], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for d in dropped:
            f.write(json.dumps(asdict(d)) + "\n")


def write_skipped(skipped: list[Skipped], path: Path, append: bool = False) -> None:
    """Write `skipped_records.jsonl`: one `{"id", "index", "kind", "reason"}` line per record left out.

    `append` keeps the lines already there (a resumed run keeps what its first part recorded;
    `tidy_skipped` removes the repeats at the end)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w", encoding="utf-8") as f:
        for s in skipped:
            f.write(json.dumps(asdict(s)) + "\n")


def append_skipped(skipped: Skipped, path: str | Path) -> None:
    """Append one line (one `write`, O_APPEND: safe from several data-loader workers)."""
    line = (json.dumps(asdict(skipped)) + "\n").encode("utf-8")
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


class LlavaCollator:
    """Turns dataset rows into a padded batch: input_ids, attention_mask, labels, pixel_values.

    Images are read and decoded here, in the data-loader workers. An image that fails to decode
    stops training with the record named, unless `skipped_file` is given (data.on_bad_record:
    skip): then the record is left out of its batch and appended to that file. The collator holds
    no open files or datasets, so it pickles into worker processes.
    """

    def __init__(
        self,
        encoder: ConversationEncoder,
        image_loader: ImageLoader,
        pad_token_id: int,
        max_length: int,
        skipped_file: str | Path | None = None,
    ):
        self.encoder = encoder
        self.image_loader = image_loader
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.skipped_file = None if skipped_file is None else str(skipped_file)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images, kept = [], []
        for row in rows:
            if row["image_path"] is not None:
                try:
                    images.append(self.image_loader.load(row["image_path"]))
                except Exception as exc:  # a corrupt file found mid-run: say which record
                    message = f"cannot read image {row['image_path']!r}: {exc}"
                    if self.skipped_file is None:
                        raise LvitError(f"record {row['id']!r}: {message}") from exc
                    log.warning("record %r left out: %s (listed in %s)", row["id"], message, self.skipped_file)
                    append_skipped(Skipped(row["id"], row.get("index"), "image_unreadable", message), self.skipped_file)
                    continue
            kept.append(row)
        if not kept:
            raise LvitError(
                f"every image in a batch failed to decode ({', '.join(repr(r['id']) for r in rows)}); "
                "run `lvit data check --decode` on the data"
            )
        encoded = self.encoder.encode_many([conversation_from_row(r) for r in kept])
        ids = [e.input_ids[: self.max_length] for e in encoded]
        labels = [e.labels[: self.max_length] for e in encoded]
        width = max(len(x) for x in ids)
        batch = {
            "input_ids": torch.tensor([x + [self.pad_token_id] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([x + [IGNORE_INDEX] * (width - len(x)) for x in labels]),
        }
        if images:
            batch["pixel_values"] = self.image_loader.pixel_values(images)
        return batch
