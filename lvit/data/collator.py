"""Batches: `LlavaCollator` turns training-dataset rows (`lvit.data.dataset`) into padded or packed tensors.

It runs in the data-loader workers: it decodes each row's images (from the files its `image_paths`
name, or from the encoded bytes a Hugging Face dataset's row carries in its `image` column) and
encodes each conversation with the recipe's template (`lvit.templates.encoder.ConversationEncoder`).
`pixel_values` stacks the batch's images in the order their image tokens come, row by row and, within a
row, placeholder by placeholder (what `LlavaForConditionalGeneration` expects: it fills the image-token
positions with the image features in that order); packed rows (`lvit.data.packing`) keep that rule, so the
images follow the packed layout.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import torch

from lvit.data.dataset import Skipped, append_skipped
from lvit.data.images import ImageLoader
from lvit.data.packing import pack
from lvit.data.records import conversation_from_row
from lvit.errors import UnreadableRecord
from lvit.templates.conversation import IGNORE_INDEX
from lvit.templates.encoder import ConversationEncoder

log = logging.getLogger(__name__)


class LlavaCollator:
    """Turns dataset rows into a batch: input_ids, attention_mask, labels, pixel_values (padded rows), or with
    `packing` input_ids, labels, position_ids, row_lengths, pixel_values (padding-free rows, `lvit.data.packing`:
    samples end to end, at most `max_tokens_per_row` tokens a row or the longest sample's length, `LONGEST`:
    rows of the longest sample, None: one row).

    Images are read and decoded here, in the data-loader workers. An image that fails to decode
    stops training with the record named, unless `skipped_file` is given (data.on_bad_record:
    skip): then the record is appended to that file and stays in its batch as a stand-in that
    trains nothing (`stand_in`): a blank image and labels all -100. The batch keeps its size and
    the model runs the same forward and backward, so a batch whose every image failed (a batch of
    one) is still a step, and under several processes every rank takes the same steps; its loss
    and gradients are zero (TRL's SFTTrainer divides the summed token loss by the trained tokens
    clamped to at least 1, so a step with no trained token is a finite zero, not 0/0). The
    collator holds no open files or datasets (the rows bring their images), so it pickles into
    worker processes.
    """

    def __init__(
        self,
        encoder: ConversationEncoder,
        image_loader: ImageLoader,
        pad_token_id: int,
        max_length: int,
        skipped_file: str | Path | None = None,
        packing: bool = False,
        max_tokens_per_row: int | str | None = None,
        by_source: list[tuple[ConversationEncoder, ImageLoader, bool]] | None = None,
        source_names: list[str] | None = None,
    ):
        self.encoder = encoder
        self.image_loader = image_loader
        self.by_source = by_source
        """A mixture: each source's encoder, image loader and whether it skips a bad record (its `on_bad_record`),
        by the rows' `source` column."""
        self.source_names = source_names
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.skipped_file = None if skipped_file is None else str(skipped_file)
        self.packing = packing
        self.max_tokens_per_row = max_tokens_per_row

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        per_record, stand_ins = [], set()
        for i, row in enumerate(rows):
            sources = images_of(row)
            loader = self.image_loader if self.by_source is None else self.by_source[row["source"]][1]
            try:
                loaded = [loader.load(source) for source in sources]
            except Exception as exc:  # a corrupt file found mid-run: say which record
                paths = row.get("image_paths") or [row["image_path"]]
                shown = repr(row["image_path"]) if len(paths) == 1 else f"among {paths!r}"
                message = f"cannot read image {shown}: {exc}"
                if self.skipped_file is None or not self._skips(row):
                    raise UnreadableRecord(f"record {row['id']!r}: {message}") from exc
                self._leave_out(row, message)
                loaded = [stand_in_image() for _ in sources]
                stand_ins.add(i)
            per_record.append(loaded)
        images = [image for loaded in per_record for image in loaded]
        encoded = self._encode(rows, [[(i.height, i.width) for i in loaded] for loaded in per_record])
        ids = [e.input_ids[: self.max_length] for e in encoded]
        labels = [
            [IGNORE_INDEX] * len(x) if i in stand_ins else e.labels[: self.max_length]
            for i, (e, x) in enumerate(zip(encoded, ids, strict=True))
        ]
        if self.packing:  # padding-free rows (lvit.data.packing); images in the packed reading order
            batch, layout = pack(ids, labels, self.max_tokens_per_row, self.pad_token_id)
            if images:
                packed = [image for row in layout for i in row for image in per_record[i]]
                batch.update(self.image_loader.image_inputs(packed))
            if self.by_source is not None:
                self._add_sources(batch, rows, [[(i, len(ids[i])) for i in row] for row in layout])
            return batch
        width = max(len(x) for x in ids)
        batch = {
            "input_ids": torch.tensor([x + [self.pad_token_id] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([x + [IGNORE_INDEX] * (width - len(x)) for x in labels]),
        }
        if images:
            batch.update(self.image_loader.image_inputs(images))
        if self.by_source is not None:
            self._add_sources(batch, rows, [[(i, len(x))] for i, x in enumerate(ids)])
        return batch

    def _skips(self, row: dict) -> bool:
        return self.by_source is None or self.by_source[row["source"]][2]

    def _encode(self, rows: list[dict], sizes: list[list[tuple[int, int]]]) -> list:
        """Each row encoded with its source's encoder (the recipe's for one source), in one call per encoder;
        `sizes`: each row's images as loaded, (height, width), for an encoder whose image tokens depend on them
        (LLaVA-NeXT's AnyRes, `ConversationEncoder.sized`)."""
        encoders = [self.encoder if self.by_source is None else self.by_source[r["source"]][0] for r in rows]
        convs = [e.sized(conversation_from_row(r), s) for e, r, s in zip(encoders, rows, sizes, strict=True)]
        if self.by_source is None:
            return self.encoder.encode_many(convs)
        encoded: list = [None] * len(rows)
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(id(self.by_source[row["source"]][0]), []).append(i)
        for members in groups.values():
            encoder = self.by_source[rows[members[0]]["source"]][0]
            conversations = [convs[i] for i in members]
            for i, e in zip(members, encoder.encode_many(conversations), strict=True):
                encoded[i] = e
        return encoded

    @staticmethod
    def _add_sources(batch: dict, rows: list[dict], layout: list[list[tuple[int, int]]]) -> None:
        """A mixture's batch says where each token and sample comes from: `label_sources` (the labels' shape: each
        position's source, -1 for filler) and `sample_sources` (each sample's source), for the loss per source
        (`lvit.train.source_stats`); neither reaches the model."""
        width = batch["labels"].size(1)
        per_row = []
        for row in layout:
            line = [rows[i]["source"] for i, n in row for _ in range(n)]
            per_row.append(line + [-1] * (width - len(line)))
        batch["label_sources"] = torch.tensor(per_row)
        batch["sample_sources"] = torch.tensor([row["source"] for row in rows])

    def _leave_out(self, row: dict, message: str) -> None:
        """List a record whose image fails in the skipped file and warn, once per record: the record comes up again
        every epoch, in a fresh worker process, so the file itself says whether it was met before."""
        key = (self.skipped_file, row["id"], row.get("index"))
        if key in _listed or _in_skipped_file(self.skipped_file, row["id"], row.get("index")):
            _listed.add(key)
            return
        log.warning(
            "record %r left out: %s (listed in %s; the run's end gives the count)",
            row["id"],
            message,
            self.skipped_file,
        )
        source = None if self.source_names is None else self.source_names[row["source"]]
        append_skipped(Skipped(row["id"], row.get("index"), "image_unreadable", message, source), self.skipped_file)
        _listed.add(key)


_listed: set[tuple] = set()  # (skipped file, id, index) of records this process has listed already


def _in_skipped_file(path: str, rid, index) -> bool:
    """Whether `skipped_records.jsonl` lists this record for a failed image already (read only when an image fails)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return False
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line being written by another worker
            continue
        if entry.get("kind") == "image_unreadable" and (entry.get("id"), entry.get("index")) == (rid, index):
            return True
    return False


def stand_in_image():
    """The image of a record left out mid-run: blank, so the step's forward and backward are those of any batch."""
    from PIL import Image

    return Image.new("RGB", (32, 32))


def images_of(row: dict) -> list:
    """What `ImageLoader.load` opens for each image of a training row, in the order of its placeholders."""
    paths = row.get("image_paths")
    inline = row.get("inline_images")
    if inline:  # a streamed sample's images come with it (lvit.data.stream)
        return [path if data is None else io.BytesIO(data) for path, data in zip(paths, inline, strict=True)]
    if paths and len(paths) > 1:  # several images: files (lvit reads one image per Hugging Face row)
        return list(paths)
    return [] if row["image_path"] is None else [image_of(row)]


def image_of(row: dict):
    """What `ImageLoader.load` opens for a training row: its embedded bytes (a Hugging Face dataset's row
    carries them in its `image` column, as a list for a list column), else the path `image_path` names."""
    value = row.get("image")
    if isinstance(value, list):  # a training record has one image
        value = value[0] if value else None
    if isinstance(value, dict):
        value = value.get("bytes")  # None: a datasets.Image that holds a path only
    if not value or isinstance(value, str):
        return row["image_path"]
    return io.BytesIO(value)
