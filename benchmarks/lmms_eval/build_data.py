"""Write the tiny local POPE-style data set used by the lmms-eval task in this folder.

Creates 32x32 PNG images of simple shapes and a JSONL file of yes/no questions about them:

    <out>/images/*.png
    <out>/test.jsonl      one record a line: question_id, image (absolute path), question, answer

Default <out> is /tmp/lmms-data/tiny_pope (the path the task YAML reads). Needs only Pillow.

    python benchmarks/lmms_eval/build_data.py [--out /tmp/lmms-data/tiny_pope]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}

# (image name, shape, color) for each image: one shape on a white background.
IMAGES = [
    ("red_square", "square", "red"),
    ("blue_circle", "circle", "blue"),
    ("green_square", "square", "green"),
    ("red_circle", "circle", "red"),
]

# Two questions an image: one whose answer is yes, one no (balanced, as POPE is).
QUESTIONS = {
    "red_square": [("Is there a red square in the image?", "yes"), ("Is there a blue circle in the image?", "no")],
    "blue_circle": [("Is there a blue circle in the image?", "yes"), ("Is there a red square in the image?", "no")],
    "green_square": [("Is there a green square in the image?", "yes"), ("Is there a circle in the image?", "no")],
    "red_circle": [("Is there a red circle in the image?", "yes"), ("Is there a green square in the image?", "no")],
}


def draw(shape: str, color: str, size: int = 32) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    box = (6, 6, size - 7, size - 7)
    if shape == "square":
        d.rectangle(box, fill=COLORS[color])
    else:
        d.ellipse(box, fill=COLORS[color])
    return img


def build(out: Path) -> Path:
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for name, shape, color in IMAGES:
        path = (img_dir / f"{name}.png").resolve()
        draw(shape, color).save(path)
        for question, answer in QUESTIONS[name]:
            records.append({"question_id": len(records), "image": str(path), "question": question, "answer": answer})
    jsonl = out / "test.jsonl"
    with jsonl.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return jsonl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/lmms-data/tiny_pope"))
    args = ap.parse_args()
    jsonl = build(args.out)
    n = sum(1 for _ in jsonl.open())
    print(f"wrote {n} questions to {jsonl}")


if __name__ == "__main__":
    main()
