"""Hugging Face `datasets` data: a `save_to_disk` folder, or parquet / arrow files.

The records come from a `conversations` column (LLaVA's schema) or a `messages` column (the chat
schema), and their image from an `image` / `images` column holding paths, or images embedded in
the dataset (a `datasets.Image` feature: PNG/JPEG bytes, which is also how `datasets` stores PIL
images). Embedded images are never decoded while reading: a record names its image with a short
reference string (row, column, dataset), and the image is read and decoded only when a batch needs
it (`read_embedded`), in the data-loader worker. The dataset is memory-mapped, so nothing is
held in memory either.
"""

from __future__ import annotations

import functools
from pathlib import Path

from lvit.errors import LvitError

EMBEDDED_PREFIX = "hf-embedded:"
HF_SUFFIXES = (".parquet", ".arrow")
TEXT_COLUMNS = {"llava": "conversations", "chat": "messages"}
_CHUNK = 8192  # rows read per arrow slice


def is_hf_path(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() or p.suffix in HF_SUFFIXES


def is_embedded(image: object) -> bool:
    return isinstance(image, str) and image.startswith(EMBEDDED_PREFIX)


def embedded_ref(source: str, row: int, column: str, item: int | None = None) -> str:
    """The string that names the image embedded in `row` (and list `item`) of `column` of `source`."""
    return f"{EMBEDDED_PREFIX}{row}:{column}:{'-' if item is None else item}:{source}"


def parse_embedded(ref: str) -> tuple[str, int, str, int | None]:
    row, column, item, source = ref[len(EMBEDDED_PREFIX) :].split(":", 3)
    return source, int(row), column, None if item == "-" else int(item)


def describe_embedded(ref: str) -> str:
    source, row, column, item = parse_embedded(ref)
    what = f"column {column!r}" if item is None else f"column {column!r} item {item}"
    return f"the image embedded in row {row} ({what}) of {source}"


def open_dataset(path: str | Path):
    """Open a dataset saved with `save_to_disk` (a Dataset, or one split of a DatasetDict), a
    folder of parquet/arrow files, or one such file. Returns `(dataset, source)`, where `source`
    names what can be reopened (in a data-loader worker) to read embedded images."""
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


def read_rows(path: str | Path, schema: str | None = None) -> tuple[str, list[dict]]:
    """Read every row as a raw record (LLaVA or chat schema) without decoding any image.

    Returns `(schema, rows)`. The image column's values become strings: a path as stored, or an
    embedded-image reference (`embedded_ref`); lists stay lists (the chat schema's `images`).
    """
    ds, source = open_dataset(path)
    columns = ds.column_names
    if schema is None:
        found = [s for s, col in TEXT_COLUMNS.items() if col in columns]
        if not found:
            raise LvitError(
                f"{path}: a dataset for lvit needs a 'conversations' column (LLaVA format) or a 'messages' column "
                f"(chat format); its columns are {columns}. Rename yours with `dataset.rename_column`."
            )
        schema = found[0]
    elif TEXT_COLUMNS[schema] not in columns:
        raise LvitError(f"{path}: format {schema!r} needs a {TEXT_COLUMNS[schema]!r} column; columns: {columns}")
    order = ("image", "images") if schema == "llava" else ("images", "image")
    image_col = next((c for c in order if c in columns), None)
    key = "image" if schema == "llava" else "images"
    keep = [c for c in (TEXT_COLUMNS[schema], "id", "system") if c in columns]
    arrow = ds.with_format("arrow")
    rows: list[dict] = []
    for start in range(0, len(ds), _CHUNK):
        table = arrow[start : start + _CHUNK]
        chunk = table.select(keep).to_pylist()
        if image_col is not None:
            images = _image_names(table.column(image_col), start, image_col, source)
            for raw, image in zip(chunk, images, strict=True):
                if schema == "llava" and isinstance(image, list):
                    image = image[0] if len(image) == 1 else (image or None)
                if schema == "chat" and isinstance(image, str):
                    image = [image]
                if image is not None:
                    raw[key] = image
        rows.extend(chunk)
    return schema, rows


def _image_names(column, start: int, name: str, source: str) -> list:
    import pyarrow as pa

    out: list = []
    row = start
    for chunk in column.chunks:
        n = len(chunk)
        if pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
            import pyarrow.compute as pc

            lengths = pc.list_value_length(chunk).to_pylist()
            flat = _flat_names(pc.list_flatten(chunk), name)
            pos = 0
            for i, length in enumerate(lengths):
                if length is None:
                    out.append(None)
                    continue
                items = flat[pos : pos + length]
                pos += length
                out.append([embedded_ref(source, row + i, name, j) if v is True else v for j, v in enumerate(items)])
        else:
            flat = _flat_names(chunk, name)
            out.extend(embedded_ref(source, row + i, name) if v is True else v for i, v in enumerate(flat))
        row += n
    return out


def _flat_names(array, name: str) -> list:
    """Per value: None (no image), a path string, or True (embedded bytes, to be referenced)."""
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


@functools.lru_cache(maxsize=8)
def _arrow_view(source: str):
    ds, _ = open_dataset(source)
    return ds.with_format("arrow")


def read_embedded(ref: str) -> bytes:
    """The encoded bytes of an embedded image (opened lazily, once per process)."""
    source, row, column, item = parse_embedded(ref)
    value = _arrow_view(source)[row].column(column)[0].as_py()
    if item is not None:
        value = value[item]
    if isinstance(value, dict):
        value = value.get("bytes")
    if not value:
        raise LvitError(f"{describe_embedded(ref)} holds no image bytes")
    return value
