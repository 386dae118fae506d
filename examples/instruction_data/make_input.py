"""A folder of captioned images -> the JSON Lines input of `lvit data generate`.

    python make_input.py PHOTOS OUT.jsonl

Each image `NAME.png` (or .jpg/.jpeg/.webp) has its captions beside it in `NAME.txt`, one caption per line
(the layout many captioned-image collections use). An image without a caption file, or with an empty one, is
listed and left out. Each line written is `{"id", "image", "captions"}`; add `"boxes": [{"label", "bbox"}]`
if you have object boxes (`bbox` as [x1, y1, x2, y2], in pixels or normalised): the LLM then knows where
things are, as in the LLaVA paper.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def main(folder: Path, out: Path) -> None:
    rows, skipped = [], []
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES):
        caption_file = image.with_suffix(".txt")
        captions = [line.strip() for line in caption_file.read_text().splitlines()] if caption_file.is_file() else []
        captions = [c for c in captions if c]
        if not captions:
            skipped.append(image.name)
            continue
        rows.append({"id": image.stem, "image": image.name, "captions": captions})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} captioned images -> {out}")
    for name in skipped:
        print(f"  left out {name}: no captions in {Path(name).stem}.txt", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
