"""A synthetic image-instruction task whose answers need the image: a coloured shape on a canvas.

Each image shows one shape of one of four colours in one of four places, on a light, noisy
background. Questions ask for the colour or the place, so text alone answers at chance (1/4).
The data is written in LLaVA's JSON format with PNG files on disk, so the real data path runs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
PLACES = ("left", "right", "top", "bottom")
SHAPES = ("square", "circle")
QUESTIONS = {"colour": "What colour is the shape?", "place": "Where is the shape?"}
CHANCE = 1 / 4


def draw(colour: str, place: str, shape: str, size: int, rng: random.Random):
    from PIL import Image, ImageDraw

    bg = tuple(rng.randint(200, 250) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    s = size // 3 + rng.randint(-1, 1)
    cx = {"left": size // 4, "right": 3 * size // 4}.get(place, size // 2) + rng.randint(-1, 1)
    cy = {"top": size // 4, "bottom": 3 * size // 4}.get(place, size // 2) + rng.randint(-1, 1)
    box = (cx - s // 2, cy - s // 2, cx + s // 2, cy + s // 2)
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLOURS[colour])
    return img


def write_shapes_data(
    root: str | Path, n_train: int = 600, n_test: int = 100, size: int = 32, seed: int = 0
) -> dict[str, Path]:
    """Write images and four LLaVA JSON files under `root`.

    - `captions.json`: stage-1 records (a brief-description instruction, the caption as answer);
    - `instruct.json`: stage-2 records, two-turn conversations (colour, then place), plus a share
      of text-only records;
    - `test.json`: held-out images (never trained on), one question per record, answer in `gpt`.
    Returns the paths by name, and `images` for the image folder.
    """
    rng = random.Random(seed)
    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    captions, instruct, test = [], [], []
    for i in range(n_train + n_test):
        colour, place, shape = rng.choice(list(COLOURS)), rng.choice(PLACES), rng.choice(SHAPES)
        name = f"{i:05d}.png"
        draw(colour, place, shape, size, rng).save(images / name)
        answers = {"colour": colour, "place": place}
        if i >= n_train:
            for kind, question in QUESTIONS.items():
                test.append(
                    {
                        "id": f"test-{i}-{kind}",
                        "image": name,
                        "conversations": [
                            {"from": "human", "value": f"<image>\n{question}"},
                            {"from": "gpt", "value": answers[kind]},
                        ],
                    }
                )
            continue
        captions.append(
            {
                "id": f"cap-{i}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": "Give a brief description of the image.\n<image>"},
                    {"from": "gpt", "value": f"a {colour} {shape} on the {place}"},
                ],
            }
        )
        order = ["colour", "place"] if rng.random() < 0.5 else ["place", "colour"]
        conv = []
        for t, kind in enumerate(order):
            question = QUESTIONS[kind]
            conv += [
                {"from": "human", "value": f"<image>\n{question}" if t == 0 else question},
                {"from": "gpt", "value": answers[kind]},
            ]
        instruct.append({"id": f"ins-{i}", "image": name, "conversations": conv})
        if i % 10 == 0:  # a share of text-only records, as in LLaVA's mixtures
            instruct.append(
                {
                    "id": f"txt-{i}",
                    "conversations": [
                        {"from": "human", "value": "What colours can a shape have here?"},
                        {"from": "gpt", "value": "red, green, blue or yellow"},
                    ],
                }
            )
    paths = {"captions": root / "captions.json", "instruct": root / "instruct.json", "test": root / "test.json"}
    for key, records in (("captions", captions), ("instruct", instruct), ("test", test)):
        paths[key].write_text(json.dumps(records, indent=1))
    paths["images"] = images
    return paths


def question_kind(record_id: str) -> str:
    """ "colour" or "place" for a held-out record id (`test-<i>-<kind>`)."""
    return record_id.rsplit("-", 1)[-1]


def corpus() -> list[str]:
    """Text the tiny tokenizer should know for this task."""
    words = [*COLOURS, *PLACES, *SHAPES, *QUESTIONS.values(), "a on the", "Give a brief description of the image."]
    return [" ".join(words)] * 3
