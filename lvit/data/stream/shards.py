"""Shards, as `data.streaming` reads them: which files a source is made of, and their samples one at a time.

A streamed source is a file, a folder or a glob (local, or any URL `fsspec` opens: `s3://`, `gs://`, `hf://`...)
of shards of one kind:
- JSON Lines (`.jsonl`): one record a line, in LLaVA's or the chat schema (a JSON list cannot be read a record at
  a time: `lvit data convert IN OUT.jsonl` turns it into JSON Lines);
- parquet (`.parquet`): one record a row, its image a path or embedded (`{"bytes", "path"}`, as `datasets` stores
  images), read a batch of rows at a time;
- WebDataset (`.tar`): one sample per key (`<key>.json` with the record, `<key>.jpg` / `.png` / `.webp`... its
  images, in the tar's order), read member by member.

`read_shard(shard, kind, start)` yields `RawSample`s from sample `start` of a shard (the samples before it are
passed over unparsed: lines, parquet row groups, tar members), so a resumed stream reopens a shard where it was.
A sample that cannot be parsed (a line or `.json` member that is not JSON) comes as a `RawSample` with its error,
not as an exception: the stream skips or stops on it, as `data.on_bad_record` says.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

from lvit.data.sources import InlineImage
from lvit.errors import LvitError

KINDS = {".jsonl": "jsonl", ".parquet": "parquet", ".tar": "webdataset"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_PARQUET_BATCH = 256


@dataclass
class RawSample:
    """One sample of a shard, unchecked: its place, its record (a dict) or why it has none, its inline images."""

    shard: str
    offset: int
    """Its place in the shard (0-based; a JSON Lines file's non-blank lines)."""
    record: dict | None
    error: str | None = None
    line: int | None = None
    """Its line (JSON Lines)."""
    key: str | None = None
    """Its key (WebDataset)."""

    @property
    def where(self) -> str:
        name = PurePosixPath(self.shard).name
        if self.key is not None:
            return f"sample {self.key!r} of {name}"
        return f"line {self.line} of {name}" if self.line is not None else f"row {self.offset} of {name}"


def list_shards(path: str) -> tuple[str, list[str]]:
    """`(kind, shards)` of a streamed source: a shard file, a folder of shards (sorted) or a glob."""
    import fsspec

    fs, _, found = fsspec.get_fs_token_paths(path)
    if len(found) == 1 and fs.isdir(found[0]):
        found = sorted(p for p in fs.find(found[0]) if PurePosixPath(p).suffix.lower() in (*KINDS, ".json"))
        if any(PurePosixPath(p).suffix.lower() != ".json" for p in found):  # beside shards: metadata files
            found = [p for p in found if PurePosixPath(p).suffix.lower() != ".json"]
    found = sorted(p for p in found if fs.exists(p))
    if not found:
        raise LvitError(f"{path}: no shard found (streaming reads .jsonl, .parquet or WebDataset .tar files).")
    suffixes = {PurePosixPath(p).suffix.lower() for p in found}
    if ".json" in suffixes:
        raise LvitError(
            f"{path}: a JSON list cannot be streamed (it is parsed whole); convert it to JSON Lines "
            "(`lvit data convert IN OUT.jsonl`), or train without data.streaming."
        )
    unknown = suffixes - set(KINDS)
    if unknown or len(suffixes) > 1:
        raise LvitError(
            f"{path}: streaming reads shards of one kind (.jsonl, .parquet or .tar); found "
            f"{', '.join(sorted(suffixes))}."
        )
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    shards = found if protocol in ("file", "local") else [fs.unstrip_protocol(p) for p in found]
    return KINDS[suffixes.pop()], shards


def read_shard(shard: str, kind: str, start: int = 0) -> Iterator[RawSample]:
    """The samples of one shard from sample `start` (see the module docstring)."""
    if kind == "jsonl":
        yield from _jsonl(shard, start)
    elif kind == "parquet":
        yield from _parquet(shard, start)
    else:
        yield from _webdataset(shard, start)


def _open(shard: str, mode: str = "rb"):
    import fsspec

    return fsspec.open(shard, mode, **({"encoding": "utf-8", "errors": "replace"} if "b" not in mode else {}))


def _jsonl(shard: str, start: int) -> Iterator[RawSample]:
    offset = 0
    with _open(shard, "rt") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if offset >= start:
                try:
                    yield RawSample(shard, offset, json.loads(line), line=number)
                except json.JSONDecodeError as exc:
                    yield RawSample(shard, offset, None, f"not valid JSON ({exc})", line=number)
            offset += 1


def _parquet(shard: str, start: int) -> Iterator[RawSample]:
    import pyarrow.parquet as pq

    with _open(shard) as f:
        table = pq.ParquetFile(f)
        offset = 0
        for group in range(table.num_row_groups):
            rows = table.metadata.row_group(group).num_rows
            if offset + rows <= start:  # a whole row group before the start: not read
                offset += rows
                continue
            for batch in table.iter_batches(batch_size=_PARQUET_BATCH, row_groups=[group]):
                for row in batch.to_pylist():
                    if offset >= start:
                        yield RawSample(shard, offset, _inline_row(row, shard, offset))
                    offset += 1


def _inline_row(row: dict, shard: str, offset: int) -> dict:
    """A parquet row with its embedded images (`{"bytes", "path"}`) as `InlineImage`s."""
    for column in ("image", "images"):
        value = row.get(column)
        items = value if isinstance(value, list) else [value]
        if not any(isinstance(v, dict) for v in items):
            continue
        out = []
        for n, item in enumerate(items):
            if isinstance(item, dict) and item.get("bytes") is not None:
                name = f"image {n} of row {offset} of {PurePosixPath(shard).name}"
                out.append(InlineImage(name, item["bytes"]))
            else:
                out.append(item.get("path") if isinstance(item, dict) else item)
        row[column] = out if isinstance(value, list) else out[0]
    return row


def _webdataset(shard: str, start: int) -> Iterator[RawSample]:
    import tarfile

    offset = -1
    key, members = None, []
    with _open(shard) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            path = PurePosixPath(member.name)
            name_key = str(path.parent / path.name.split(".", 1)[0])
            if name_key != key:
                if key is not None and offset >= start:
                    yield _sample(shard, offset, key, members)
                key, members, offset = name_key, [], offset + 1
            if offset >= start:  # a sample before the start: its members are passed over unread
                members.append((path.name.split(".", 1)[1] if "." in path.name else "", tar.extractfile(member).read()))
        if key is not None and offset >= start:
            yield _sample(shard, offset, key, members)


def _sample(shard: str, offset: int, key: str, members: list[tuple[str, bytes]]) -> RawSample:
    """A WebDataset sample: its `.json` record, its images in the tar's order (as the record's images, replacing the
    names the record may give them; a record with no image member keeps its own image paths)."""
    texts = [data for ext, data in members if ext.lower() == "json"]
    name = PurePosixPath(shard).name
    if len(texts) != 1:
        return RawSample(shard, offset, None, f"{len(texts)} .json members (one holds the record)", key=key)
    try:
        record = json.loads(texts[0].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return RawSample(shard, offset, None, f"its .json member is not valid JSON ({exc})", key=key)
    if not isinstance(record, dict):
        return RawSample(shard, offset, None, "its .json member is not a JSON object (a record)", key=key)
    images = [
        InlineImage(f"image {key}.{ext} of {name}", data)
        for ext, data in members
        if "." + ext.lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS
    ]
    if images:
        field = "images" if "messages" in record else "image"
        record[field] = images if (len(images) > 1 or field == "images") else images[0]
    record.setdefault("id", key)
    return RawSample(shard, offset, record, key=key)
