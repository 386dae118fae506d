"""Checking, the third step of `lvit.data`: every problem of a dataset, before training.

`inspect_data` reads the whole dataset once (`lvit.data.records`), checks each record's image
once per distinct image (by default its header: it exists, is an image PIL can read and is not a
decompression bomb, `lvit.data.images.read_header`; with `decode`, a full decode, which also finds a
file cut off after its header), finds duplicate ids and,
given a recipe's encoder, measures every sample in tokens, image tokens included
(`ConversationEncoder.lengths`), and applies `data.max_length` / `data.overlong` to it. `check_data`
is `lvit data check`; `lvit.data.report.CheckReport` renders what it found. Training
(`lvit.data.dataset.prepare`) runs the same `inspect_data`, so what `lvit data check --recipe`
reports is what training does.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lvit.data.images import describe_image, image_exists, oriented_size, probe_image
from lvit.data.reader import ReadResult, read_all
from lvit.data.records import Record, RecordError, where_of
from lvit.data.report import CheckReport
from lvit.errors import LvitError
from lvit.model.encoder import conversation_encoder
from lvit.model.hub import resolve_source
from lvit.model.next import default_pinpoints
from lvit.model.processor import load_tokenizer
from lvit.model.towers import vision_config_of
from lvit.templates.conversation import Lengths


@dataclass
class Inspection:
    path: str
    format: str
    total: int
    parsed: list[Record]
    """Records whose conversation is valid (images not yet checked)."""
    usable: list[Record]
    """Records that can be trained on (no error), before the over-long policy."""
    problems: list[RecordError]
    lengths: Lengths | None = None
    """For `usable`, when an encoder was given."""
    max_length: int | None = None
    overlong: str | None = None
    truncated: list[Record] = field(default_factory=list)
    dropped: list[tuple[Record, str]] = field(default_factory=list)
    decoded: bool = False

    @property
    def errors(self) -> list[RecordError]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[RecordError]:
        return [p for p in self.problems if p.severity != "error"]

    @property
    def trainable(self) -> int:
        return len(self.usable) - (len(self.dropped) if self.overlong else 0)

    def max_length_needed(self) -> tuple[int, int] | None:
        """(the smallest data.max_length that keeps one record, the one that keeps every record) under the
        over-long policy; None without measured lengths."""
        lengths = self.lengths
        if lengths is None or not lengths.total:
            return None
        if self.overlong == "truncate":  # the image whole and one answer token
            need = [max(e, f + 1) for e, f in zip(lengths.image_end, lengths.first_trained, strict=True)]
        else:
            need = list(lengths.total)
        return min(need), max(need)


def inspect_data(
    path: str | Path,
    fmt: str = "auto",
    image_folder: str | Path | None = None,
    *,
    decode: bool = False,
    encoder=None,
    max_length: int | None = None,
    overlong: str = "truncate",
) -> Inspection:
    """Read and check every record of a dataset; see the module docstring."""
    with _gc_paused():
        return _inspect(path, fmt, image_folder, decode, encoder, max_length, overlong)


@contextmanager
def _gc_paused():
    """No cyclic garbage collection while millions of acyclic objects are made (a third of the time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _inspect(path, fmt, image_folder, decode, encoder, max_length, overlong) -> Inspection:
    read = read_all(Path(path), fmt)
    parsed = read.records
    usable, image_problems = check_record_images(read, image_folder, decode)
    problems = list(read.problems) + image_problems + duplicate_ids(parsed)
    insp = Inspection(str(path), read.format, read.total, parsed, usable, problems, decoded=decode)
    if encoder is not None:
        image_tokens_by_size(usable, encoder, image_folder)
        lengths = encoder.lengths([r.conversation for r in usable])
        if lengths.rejected:  # records the template rejects (e.g. plain: one caption per record)
            for i, message in lengths.rejected.items():
                record = usable[i]
                problems.append(
                    RecordError(record.where, message, "template", index=record.index, id=record.id, line=record.line)
                )
            keep = [i for i in range(len(usable)) if i not in lengths.rejected]
            insp.usable = [usable[i] for i in keep]
            lengths = lengths.select(keep)
        insp.lengths = lengths
        if max_length is not None:
            _apply_overlong(insp, max_length, overlong)
    problems.sort(key=lambda p: -1 if p.index is None else p.index)
    return insp


def image_tokens_by_size(records: list[Record], encoder, image_folder) -> None:
    """LLaVA-NeXT's AnyRes: each image's tokens from its size (its header), set on the records' conversations
    (`ConversationEncoder.sized`); nothing for an encoder whose counts are fixed."""
    if encoder.image_tokens_for_size is None:
        return
    sizes: dict = {}
    for record in records:
        got = [sizes.setdefault(i, oriented_size(i, image_folder)) for i in record.images]
        record.conversation = encoder.sized(record.conversation, got)


def check_record_images(
    read: ReadResult, image_folder: str | Path | None, decode: bool = False
) -> tuple[list[Record], list[RecordError]]:
    """Check the image of every record (and of invalid records that name one): `(records whose image is
    fine, problems)`. One header read (or, with `decode`, one full decode) per distinct image."""
    cache: dict[object, tuple | None] = {}

    def problem_of(image):
        if image in cache:
            return cache[image]
        if not image_exists(image, image_folder):
            found = ("image_missing", "error", f"image not found: {describe_image(image, image_folder)} "
                     "(check data.image_folder / --image-folder or the record's image path)")  # fmt: skip
        else:
            found = probe_image(image, image_folder, decode)
        cache[image] = found
        return found

    kept, problems = [], []
    for record in read.records:
        images = record.images
        found = [problem_of(image) for image in images]
        if all(f is None or f[1] == "warning" for f in found):
            kept.append(record)
        for n, f in enumerate(found, 1):
            if f is None:
                continue
            kind, severity, message = f
            if len(images) > 1:  # say which of the record's images
                message = f"image {n} of {len(images)}: {message}"
            problems.append(
                RecordError(
                    record.where, message, kind, index=record.index, id=record.id, line=record.line, severity=severity
                )
            )
    for index, (image, rid, line) in read.bad_images.items():
        found = problem_of(image)
        if found is not None:
            kind, severity, message = found
            where = where_of(index, rid, line)
            problems.append(RecordError(where, message, kind, index=index, id=rid, line=line, severity=severity))
    return kept, problems


def duplicate_ids(records: list[Record]) -> list[RecordError]:
    """A warning for each record whose id an earlier record has."""
    seen: dict[str, int] = {}
    problems = []
    for record in records:
        first = seen.setdefault(record.id, record.index)
        if first != record.index:
            problems.append(
                RecordError(
                    record.where,
                    f"id {record.id!r} is also the id of record #{first}; give every record its own id (skipped-record "
                    "files and answer files name records by id)",
                    "duplicate_id",
                    index=record.index,
                    id=record.id,
                    line=record.line,
                    severity="warning",
                )
            )
    return problems


def _apply_overlong(insp: Inspection, max_length: int, policy: str) -> None:
    insp.max_length, insp.overlong = max_length, policy
    lengths = insp.lengths
    for i, record in enumerate(insp.usable):
        n = lengths.total[i]
        if n <= max_length:
            continue
        reason = overlong_reason(n, lengths.image_end[i], lengths.first_trained[i], max_length, policy)
        if reason is None:
            insp.truncated.append(record)
            message = f"{n} tokens (image tokens included) > data.max_length {max_length}: truncated to {max_length}"
            severity = "warning"
        else:
            insp.dropped.append((record, reason))
            if policy == "error":
                message, severity = f"{reason}; data.overlong is 'error'", "error"
            else:
                message, severity = f"dropped: {reason}", "warning"
        insp.problems.append(
            RecordError(
                record.where,
                message + " (raise data.max_length, or shorten the record)",
                "too_long",
                index=record.index,
                id=record.id,
                line=record.line,
                severity=severity,
            )
        )


def overlong_reason(n: int, image_end: int, first_trained: int, max_length: int, policy: str) -> str | None:
    """Why a sample cannot be used as is under `policy`, or None if it can (possibly truncated).

    Truncation keeps the first `max_length` tokens; it never cuts through the image tokens and must
    leave at least one trained (answer) token, else the sample is dropped.
    """
    if n <= max_length:
        return None
    if policy in ("drop", "error"):
        return f"{n} tokens (image tokens included) > data.max_length {max_length}"
    if image_end > max_length:
        return f"its image ends at token {image_end} > data.max_length {max_length}; it cannot be cut there"
    if first_trained >= max_length:
        return f"no answer token would remain within data.max_length {max_length} ({n} tokens)"
    return None


def encoder_from_recipe(recipe, template: str | None = None):
    """The recipe's `ConversationEncoder` from its tokenizer and the vision tower's config only (no weights).

    `recipe`: a `lvit.recipe.schema.Recipe`; `lvit data check --recipe` reads it with
    `load_recipe(path, overrides, check_training=False)`."""

    lm = resolve_source(recipe.model.language_model, "model.language_model", recipe.source)
    vision = resolve_source(recipe.model.vision_tower, "model.vision_tower", recipe.source)
    tokenizer = load_tokenizer(lm)
    vision_config = vision_config_of(vision)
    pinpoints = None
    if recipe.model.architecture == "llava_next":  # AnyRes: each image's tokens from its size
        pinpoints = recipe.model.image_grid_pinpoints or default_pinpoints(vision_config.image_size)
    return conversation_encoder(template or recipe.data.template, tokenizer, vision_config, pinpoints)


def check_data(
    path: str | Path | None,
    fmt: str | None = None,
    image_folder: str | Path | None = None,
    recipe=None,
    decode: bool = False,
) -> CheckReport:
    """`lvit data check`: inspect a dataset, with the recipe's template, tokenizer and limits if given.

    With a recipe, `path`, `fmt` and `image_folder` default to its `data` section.
    """
    encoder = None
    max_length, overlong = None, "truncate"
    if recipe is not None:
        data = recipe.data
        path = path if path is not None else data.path
        image_folder = image_folder if image_folder is not None else data.image_folder
        fmt = fmt or getattr(data, "format", "auto")
        encoder = encoder_from_recipe(recipe)
        max_length, overlong = data.max_length, data.overlong
    if path is None:
        raise LvitError(
            "pass the data to check (a file or dataset folder), or --recipe to check the recipe's data.path"
        )
    insp = inspect_data(
        path,
        fmt or "auto",
        image_folder,
        decode=decode,
        encoder=encoder,
        max_length=max_length,
        overlong=overlong,
    )
    return CheckReport(insp, recipe.source if recipe is not None else None)
