"""`lvit data convert`: between LLaVA JSON / JSON Lines, the chat format and Hugging Face datasets.

Records are read with `read_records` (any format) and written normalised: the `<image>`
placeholder at the start of the first human turn (`"<image>\\n{text}"`), a system prompt as a
first system turn. A record that cannot be read stops the conversion (listed), unless `skip_bad`.
Images embedded in a Hugging Face dataset are written as files into `<OUT stem>_images/` beside
OUT, named by record index, and the records point at them (relative to that folder).
"""

from __future__ import annotations

import json
from pathlib import Path

from lvit.data.reader import read_all
from lvit.data.records import Record
from lvit.data.sources import is_embedded
from lvit.errors import LvitError
from lvit.templates.conversation import Conversation, chat_messages

TARGETS = ("llava", "llava-jsonl", "chat")
_EXT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def to_llava(record: Record) -> dict:
    """A record in LLaVA's format (`id`, `image`?, `conversations`)."""
    conv = record.conversation
    turns = [{"from": "system", "value": conv.system}] if conv.system is not None else []
    for i, (role, text) in enumerate(conv.turns):
        if i == 0 and record.image is not None and not conv.images_inline:  # several: placeholders in the text
            text = f"<image>\n{text}" if text else "<image>"
        turns.append({"from": "human" if role == "user" else "gpt", "value": text})
    out: dict = {"id": record.id}
    if record.image is not None:
        out["image"] = record.image
    out["conversations"] = turns
    return out


def to_chat(record: Record) -> dict:
    """A record in the chat format (`id`, `messages` with content parts, `images`)."""
    conv = record.conversation
    messages = []
    if conv.system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": conv.system}]})
    if conv.images_inline:  # several images: each part where its placeholder is
        for m in chat_messages(Conversation(conv.turns, True)):
            parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
            messages.append({"role": m["role"], "content": parts})
        return {"id": record.id, "messages": messages, "images": record.images}
    for i, (role, text) in enumerate(conv.turns):
        parts = [{"type": "image"}] if i == 0 and record.image is not None else []
        if text:
            parts.append({"type": "text", "text": text})
        messages.append({"role": role, "content": parts})
    return {"id": record.id, "messages": messages, "images": record.images}


def convert(
    src: str | Path,
    out: str | Path,
    to: str | None = None,
    fmt: str = "auto",
    image_folder: str | Path | None = None,
    skip_bad: bool = False,
) -> dict:
    """Convert `src` (any format lvit reads) into `out`. `to`: `llava` (a JSON list), `llava-jsonl` or
    `chat` (JSON Lines if `out` ends in .jsonl, else a JSON list); default from `out`'s suffix.
    Returns a summary (records written, skipped, images written, the image folder to use)."""
    src, out = Path(src), Path(out)
    if to is None:
        to = "llava-jsonl" if out.suffix == ".jsonl" else "llava"
    if to not in TARGETS:
        raise LvitError(f"unknown target format {to!r}; use one of {', '.join(TARGETS)}")
    if out.resolve() == src.resolve():
        raise LvitError(f"{out}: the output would overwrite the input; choose another file")
    read = read_all(src, fmt)
    problems = read.problems
    if problems and not skip_bad:
        shown = "\n  ".join(str(p) for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise LvitError(
            f"{src}: {len(problems)} record(s) cannot be converted:\n  {shown}{more}\n"
            "Fix them, or pass --skip-bad to convert the rest."
        )
    records = read.records
    embedded = [r for r in records if r.image is not None and is_embedded(r.image)]
    images_dir = out.parent / f"{out.stem}_images"
    if embedded:
        images_dir.mkdir(parents=True, exist_ok=True)
        for record in records:
            if record.image is None:
                continue
            if is_embedded(record.image):
                record.image = _write_image(record.image.read(), images_dir, record.index)
            else:  # one image folder must serve both kinds
                base = Path(image_folder) if image_folder is not None else Path.cwd()
                absolute = [str((base / image).resolve()) for image in record.images]
                record.image = absolute if isinstance(record.image, list) else absolute[0]

    rows = [to_chat(r) if to == "chat" else to_llava(r) for r in records]
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = to == "llava-jsonl" or (to == "chat" and out.suffix == ".jsonl")
    with out.open("w", encoding="utf-8") as f:
        if lines:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            json.dump(rows, f, ensure_ascii=False, indent=1)
    return {
        "read": read.total,
        "written": len(rows),
        "skipped": [str(p) for p in problems],
        "images_written": len(embedded),
        "image_folder": str(images_dir) if embedded else (None if image_folder is None else str(image_folder)),
        "out": str(out),
        "format": to,
    }


def _write_image(data: bytes, folder: Path, index: int) -> str:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:  # the header only: no decoding
            ext = _EXT.get(img.format or "", f".{(img.format or 'img').lower()}")
    except Exception:
        ext = ".bin"  # kept as is; `lvit data check --decode` reports it
    name = f"{index:08d}{ext}"
    (folder / name).write_bytes(data)
    return name
