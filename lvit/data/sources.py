"""Sources, the first step of `lvit.data`: the files and datasets lvit reads, as raw rows.

- JSON files (a list of records) and JSON Lines files (one record a line): each raw row keeps its
  line number (JSON Lines), and a line that is not valid JSON is reported with its line instead of
  ending the read (`read_json_rows`).
- Hugging Face `datasets` data: a `save_to_disk` folder (a Dataset, or a DatasetDict's `train`
  split), a folder of parquet / arrow files, or one such file (`HFSource`). The rows are in LLaVA's
  schema (a `conversations` column) or the chat schema (a `messages` column); their image, in an
  `image` / `images` column, is a path or an image embedded in the dataset (a `datasets.Image`
  feature: PNG/JPEG bytes, which is also how `datasets` stores PIL images). An embedded image is never
  decoded while reading: a row names it with an `EmbeddedImage` (the source, the row, the list item),
  whose bytes are read when a batch or a check needs them. The dataset stays a memory-mapped
  `datasets.Dataset`, its image column undecoded (`HFSource.images`), so the training dataset is
  selected from it (`lvit.data.dataset`) rather than copied.

`load_rows` reads any of them; `lvit.data.records` turns the rows into `Record`s.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

from lvit.errors import LvitError
from lvit.textfiles import decode, json_lines, parse_json, read_text

HF_SUFFIXES = (".parquet", ".arrow")
TEXT_COLUMNS = {"llava": "conversations", "chat": "messages"}
_CHUNK = 8192  # rows read per arrow slice


class Rows(NamedTuple):
    """What `load_rows` reads from a source."""

    container: str
    """`json` (a JSON / JSON Lines file) or `hf` (a Hugging Face dataset)."""
    schema: str
    """`llava` or `chat`."""
    raws: list
    """One raw record per row, as read (None for a JSON Lines line that is not valid JSON)."""
    lines: list[int | None]
    """The line of each row (JSON Lines), else None."""
    broken: list[tuple[int, int, str]]
    """`(row, line, message)` of each JSON Lines line that is not valid JSON."""


def load_rows(path: str | Path, fmt: str = "auto") -> Rows:
    """Read every row of a data source: a JSON / JSON Lines file, or a Hugging Face dataset (`fmt` `hf`, or a
    folder / .parquet / .arrow path). `fmt` `llava` or `chat` names the schema; `auto` detects it."""
    path = Path(path)
    if fmt == "hf" or is_hf_path(path):
        source = HFSource(path, None if fmt in ("auto", "hf") else fmt)
        raws = source.read_rows()
        return Rows("hf", source.schema, raws, [None] * len(raws), [])
    raws, lines, broken = read_json_rows(path)
    schema = fmt if fmt in ("llava", "chat") else detect_format(path, raws)
    return Rows("json", schema, raws, lines, broken)


def detect_format(path: str | Path, raws: list | None = None) -> str:
    """`hf` for dataset folders and parquet/arrow files; else `chat` or `llava` from the first record."""
    if is_hf_path(path):
        return "hf"
    for raw in raws or ():
        if isinstance(raw, dict):
            return "chat" if "messages" in raw and "conversations" not in raw else "llava"
    return "llava"


# ---------------------------------------------------------------------------------------------
# JSON and JSON Lines files


def read_json_rows(path: str | Path) -> tuple[list, list[int | None], list[tuple[int, int, str]]]:
    """`(raws, lines, broken)` of a JSON list or a JSON Lines file (see `Rows`).

    A JSON list that does not parse is an `LvitError` naming the file, line and column; a JSON Lines
    line that does not parse is one `broken` entry (its row is None), and the read goes on.
    """
    path = Path(path)
    if not path.is_file():
        read_text(path, "data file")  # the error that names it
    data = path.read_bytes()
    at = _LEAD.match(data).end()  # past a byte-order mark and white space, without copying the file
    if data[at : at + 1] in (b"[", b"{") and not _one_object_per_line(data, at):
        parsed = parse_json(decode(data, path), path, list, _NOT_A_LIST)
        return parsed, [None] * len(parsed), []
    raws: list = []
    lines: list[int | None] = []
    broken: list[tuple[int, int, str]] = []
    for lineno, raw, why in json_lines(data, path):
        raws.append(raw)
        lines.append(lineno)
        if why is not None:
            broken.append((len(raws) - 1, lineno, why))
    return raws, lines, broken


_NOT_A_LIST = (
    "a JSON list of records ([{...}, {...}]) or JSON Lines (one record per line); a file holding one object is "
    "neither: wrap it in [ ] or put each record on its own line"
)


_LEAD = re.compile(rb"(?:\xef\xbb\xbf)?\s*")


def _one_object_per_line(data: bytes, at: int) -> bool:
    """Whether a file whose text starts with `{` at `at` is JSON Lines (its first line is a whole object), not one
    object."""
    end = data.find(b"\n", at)
    first = data[at : end if end >= 0 else len(data)]
    if not first.startswith(b"{"):
        return False
    try:
        json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


def is_hf_path(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() or p.suffix in HF_SUFFIXES


class EmbeddedImage(str):
    """An image embedded in a row of a Hugging Face dataset (list item `item` of a list column).

    It is a string, so whatever names images by strings (messages, answer files, the training rows'
    `image_path`) names it readably: "the image embedded in row 3 (column 'images' item 0) of
    /data/ds". `read()` gives its encoded bytes."""

    __slots__ = ("source", "row", "item")
    source: HFSource
    row: int
    item: int | None

    def __new__(cls, source: HFSource, row: int, item: int | None = None):
        what = source.image_column_name if item is None else f"{source.image_column_name} item {item}"
        self = str.__new__(cls, f"the image embedded in row {row} ({what}) of {source.name}")
        self.source, self.row, self.item = source, row, item
        return self

    def __reduce__(self):
        return (EmbeddedImage, (self.source, self.row, self.item))

    def read(self) -> bytes:
        """The image's encoded bytes (PNG, JPEG...), read from the memory-mapped dataset."""
        return self.source.image_bytes(self)


class InlineImage(str):
    """An image whose encoded bytes come with its record (a sample of a streamed WebDataset shard or parquet file,
    `lvit.data.stream`). A string naming it ("image 'k.jpg' of sample 'k' in shard-0.tar"), as `EmbeddedImage` is;
    `read()` gives its bytes."""

    __slots__ = ("data",)
    data: bytes

    def __new__(cls, name: str, data: bytes):
        self = str.__new__(cls, name)
        self.data = data
        return self

    def __reduce__(self):
        return (InlineImage, (str(self), self.data))

    def read(self) -> bytes:
        return self.data


def is_embedded(image: object) -> bool:
    return isinstance(image, (EmbeddedImage, InlineImage))


class HFSource:
    """A Hugging Face dataset opened for reading: its rows as raw records, its images undecoded.

    Holds the memory-mapped `datasets.Dataset` (which pickles by file, not by content)."""

    def __init__(self, path: str | Path, schema: str | None = None):
        self.path = Path(path)
        self.dataset, self.name = open_dataset(path)
        columns = self.dataset.column_names
        if schema is None:
            found = [s for s, col in TEXT_COLUMNS.items() if col in columns]
            if not found:
                raise LvitError(
                    f"{path}: a dataset for lvit needs a 'conversations' column (LLaVA format) or a 'messages' "
                    f"column (chat format); its columns are {columns}. Rename yours with `dataset.rename_column`."
                )
            schema = found[0]
        elif TEXT_COLUMNS[schema] not in columns:
            raise LvitError(f"{path}: format {schema!r} needs a {TEXT_COLUMNS[schema]!r} column; columns: {columns}")
        self.schema = schema
        order = ("image", "images") if schema == "llava" else ("images", "image")
        self.image_column: str | None = next((c for c in order if c in columns), None)
        self.image_column_name = f"column {self.image_column!r}"  # how messages name it
        self._arrow = None

    def read_rows(self) -> list[dict]:
        """Every row as a raw record (LLaVA or chat schema), without decoding any image.

        The image field holds a path as stored, or an `EmbeddedImage`; lists stay lists (the chat
        schema's `images`)."""
        ds, image_col, schema = self.dataset, self.image_column, self.schema
        key = "image" if schema == "llava" else "images"
        keep = [c for c in (TEXT_COLUMNS[schema], "id", "system") if c in ds.column_names]
        arrow = ds.with_format("arrow")
        rows: list[dict] = []
        for start in range(0, len(ds), _CHUNK):
            table = arrow[start : start + _CHUNK]
            chunk = table.select(keep).to_pylist()
            if image_col is not None:
                images = self._image_values(table.column(image_col), start)
                for raw, image in zip(chunk, images, strict=True):
                    if schema == "llava" and isinstance(image, list):
                        image = image[0] if len(image) == 1 else (image or None)
                    if schema == "chat" and isinstance(image, str):
                        image = [image]
                    if image is not None:
                        raw[key] = image
            rows.extend(chunk)
        return rows

    def images(self):
        """The image column alone, as a `datasets.Dataset` whose images are not decoded (a `datasets.Image`
        feature with `decode=False` gives `{"bytes", "path"}`); None without an image column. Memory-mapped,
        nothing copied."""
        import datasets

        if self.image_column is None:
            return None
        column = self.dataset.select_columns([self.image_column])
        features = datasets.Features.from_dict(_undecoded(column.features.to_dict()))
        return datasets.Dataset(column.data, info=datasets.DatasetInfo(features=features))

    def image_bytes(self, image: EmbeddedImage) -> bytes:
        """The encoded bytes of an image embedded in this dataset."""
        if self._arrow is None:
            self._arrow = self.dataset.with_format("arrow")
        return embedded_bytes(self._arrow[image.row].column(self.image_column)[0].as_py(), image.item, image)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrow": None}

    def _image_values(self, column, start: int) -> list:
        import pyarrow as pa
        import pyarrow.compute as pc

        out: list = []
        row = start
        for chunk in column.chunks:
            n = len(chunk)
            if pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
                lengths = pc.list_value_length(chunk).to_pylist()
                flat = _flat_values(pc.list_flatten(chunk), self.image_column)
                pos = 0
                for i, length in enumerate(lengths):
                    if length is None:
                        out.append(None)
                        continue
                    items = flat[pos : pos + length]
                    pos += length
                    out.append([EmbeddedImage(self, row + i, j) if v is True else v for j, v in enumerate(items)])
            else:
                flat = _flat_values(chunk, self.image_column)
                out.extend(EmbeddedImage(self, row + i) if v is True else v for i, v in enumerate(flat))
            row += n
        return out


def embedded_bytes(value, item: int | None = None, where: object = "the image") -> bytes:
    """The encoded bytes in an undecoded image value: raw bytes, or a `datasets.Image` `{"bytes", "path"}`
    (list item `item` of a list column). `where` names the image in the error."""
    if item is not None and isinstance(value, list):
        value = value[item] if item < len(value) else None
    if isinstance(value, dict):
        value = value.get("bytes")
    if not value:
        raise LvitError(f"{where} holds no image bytes")
    return value


def _undecoded(feature):
    """A `Features.to_dict()` mapping with every `datasets.Image` set to `decode=False`."""
    if isinstance(feature, dict):
        if feature.get("_type") == "Image":
            return {**feature, "decode": False}
        return {key: _undecoded(value) for key, value in feature.items()}
    if isinstance(feature, list):
        return [_undecoded(value) for value in feature]
    return feature


def _flat_values(array, name: str) -> list:
    """Per value: None (no image), a path string, or True (embedded bytes)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = array.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return array.to_pylist()
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return [True if v else None for v in array.is_valid().to_pylist()]
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        valid = array.is_valid().to_pylist()
        has_bytes = pc.is_valid(pc.struct_field(array, "bytes")).to_pylist()
        paths = pc.struct_field(array, "path").to_pylist() if t.get_field_index("path") >= 0 else [None] * len(array)
        return [
            None if not ok else (True if b else (p or None)) for ok, b, p in zip(valid, has_bytes, paths, strict=True)
        ]
    raise LvitError(
        f"column {name!r} has type {t}; lvit reads image paths (strings) or images (a datasets.Image feature, "
        "or raw bytes)"
    )


def open_dataset(path: str | Path):
    """Open a dataset saved with `save_to_disk` (a Dataset, or one split of a DatasetDict), a
    folder of parquet/arrow files, or one such file. Returns `(dataset, name)`, where `name` is the
    resolved path messages name it by."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise LvitError(f"data not found: {p}")
    if p.is_dir():
        if (p / "dataset_dict.json").is_file():
            splits = list(datasets.load_from_disk(str(p)))
            split = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
            if split is None:
                raise LvitError(
                    f"{p} is a DatasetDict with splits {splits} and none is 'train'; point the data path at "
                    f"one split's folder, e.g. {p / splits[0]}"
                )
            p = p / split
        if (p / "state.json").is_file():
            return datasets.load_from_disk(str(p)), str(p.resolve())
        files = sorted(p.glob("*.parquet"))
        if files:
            return datasets.Dataset.from_parquet([str(f) for f in files]), str(p.resolve())
        files = sorted(p.glob("*.arrow"))
        if files:
            return datasets.concatenate_datasets([_from_arrow(f) for f in files]), str(p.resolve())
        raise LvitError(
            f"{p} is a folder but not a dataset: expected a `save_to_disk` folder (state.json) or parquet/arrow "
            "files in it"
        )
    if p.suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(p)), str(p.resolve())
    if p.suffix == ".arrow":
        return _from_arrow(p), str(p.resolve())
    raise LvitError(f"{p}: not a Hugging Face dataset (a save_to_disk folder, .parquet or .arrow file)")


def _from_arrow(path: Path):
    import datasets

    try:
        return datasets.Dataset.from_file(str(path))  # the streaming format save_to_disk writes
    except Exception:
        return datasets.load_dataset("arrow", data_files=str(path), split="train")
