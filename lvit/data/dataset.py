"""The training dataset: validated records as a `datasets.Dataset`, and the batch collator.

Records are validated and measured (token count, image tokens included) once, up front, with
batched tokenization; the token ids themselves are rebuilt in the collator, in the data-loader
workers, together with the image decoding. So a large dataset is neither held tokenized nor held
as images in memory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lvit.data.images import ImageLoader, resolve_image_path
from lvit.data.records import conversation_from_row, read_records
from lvit.errors import LvitError
from lvit.templates import IGNORE_INDEX, ConversationEncoder

_CHUNK = 2048  # records per batched tokenizer call


@dataclass
class Dropped:
    id: str
    index: int
    reason: str


def prepare_dataset(data, encoder: ConversationEncoder, source: str = "<recipe>"):
    """Read, validate and measure the data named by a recipe's `data` section.

    Returns `(dataset, dropped)`: a `datasets.Dataset` with one row per trainable record (columns
    `id`, `image_path`, `roles`, `texts`, `system`, `length`) and the list of records left out
    because they are too long for `data.max_length` under the `data.overlong` policy.
    Raises `LvitError` listing every invalid record (with its id) if there is any.
    """
    import datasets

    parsed, problems, total = read_records(data.path)
    errors = [str(p) for p in problems]
    records = []
    for record in parsed:
        where = f"record #{record.index} (id {record.id!r})"
        try:
            encoder.template.pieces(record.conversation)  # template-specific checks (e.g. plain: one caption)
        except ValueError as exc:
            errors.append(f"{where}: {exc}")
            continue
        if record.image is not None and not resolve_image_path(record.image, data.image_folder).is_file():
            errors.append(
                f"{where}: image not found: {resolve_image_path(record.image, data.image_folder)} "
                "(check data.image_folder or the record's 'image')"
            )
            continue
        records.append(record)
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise LvitError(
            f"{data.path}: {len(errors)} of {total} records cannot be trained on "
            f"(data.path in {source}):\n  {shown}{more}\nFix or remove these records."
        )
    if not records:
        raise LvitError(f"{data.path}: no records (data.path in {source}).")

    kept, dropped = [], []
    for start in range(0, len(records), _CHUNK):
        chunk = records[start : start + _CHUNK]
        for record, enc in zip(chunk, encoder.encode_many([r.conversation for r in chunk]), strict=True):
            reason = overlong_reason(enc, data.max_length, data.overlong)
            if reason is None:
                row = record.to_row()
                row["length"] = min(len(enc.input_ids), data.max_length)
                kept.append(row)
            else:
                dropped.append(Dropped(record.id, record.index, reason))
    if dropped and data.overlong == "error":
        shown = "\n  ".join(f"record #{d.index} (id {d.id!r}): {d.reason}" for d in dropped[:20])
        raise LvitError(
            f"{data.path}: {len(dropped)} records exceed data.max_length={data.max_length} and "
            f"data.overlong is 'error' (in {source}):\n  {shown}\n"
            "Raise data.max_length, or set data.overlong to 'truncate' or 'drop'."
        )
    if not kept:
        raise LvitError(f"{data.path}: every record was dropped as too long for data.max_length={data.max_length}.")
    return datasets.Dataset.from_list(kept), dropped


def overlong_reason(enc, max_length: int, policy: str) -> str | None:
    """Why a sample cannot be used as is under `policy`, or None if it can (possibly truncated)."""
    n = len(enc.input_ids)
    if n <= max_length:
        return None
    if policy in ("drop", "error"):
        return f"{n} tokens (image tokens included) > data.max_length {max_length}"
    if enc.image_end > max_length:
        return f"its image ends at token {enc.image_end} > data.max_length {max_length}; it cannot be cut there"
    if enc.first_trained >= max_length:
        return f"no answer token would remain within data.max_length {max_length} ({n} tokens)"
    return None


def write_dropped(dropped: list[Dropped], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for d in dropped:
            f.write(json.dumps(asdict(d)) + "\n")


class LlavaCollator:
    """Turns dataset rows into a padded batch: input_ids, attention_mask, labels, pixel_values."""

    def __init__(self, encoder: ConversationEncoder, image_loader: ImageLoader, pad_token_id: int, max_length: int):
        self.encoder = encoder
        self.image_loader = image_loader
        self.pad_token_id = pad_token_id
        self.max_length = max_length

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        encoded = self.encoder.encode_many([conversation_from_row(r) for r in rows])
        ids = [e.input_ids[: self.max_length] for e in encoded]
        labels = [e.labels[: self.max_length] for e in encoded]
        width = max(len(x) for x in ids)
        batch = {
            "input_ids": torch.tensor([x + [self.pad_token_id] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([x + [IGNORE_INDEX] * (width - len(x)) for x in labels]),
        }
        images = []
        for row in rows:
            if row["image_path"] is not None:
                try:
                    images.append(self.image_loader.load(row["image_path"]))
                except Exception as exc:  # a corrupt file found mid-run: say which record
                    raise LvitError(f"record {row['id']!r}: cannot read image {row['image_path']!r}: {exc}") from exc
        if images:
            batch["pixel_values"] = self.image_loader.pixel_values(images)
        return batch
