"""What the text-only LLM is told about each image: its captions and object boxes (the paper's "symbolic
representation", LLaVA paper Sec. 3, Table 1: captions, then `category: [x1, y1, x2, y2]` with coordinates
normalised to 0..1 and three decimals).

Two inputs:

- COCO annotation files: captions (`captions_*.json`: `images` with `id`, `file_name`, `width`, `height`;
  `annotations` with `image_id`, `caption`) and, optionally, instances (`instances_*.json`: `annotations`
  with `image_id`, `bbox` as pixel `[x, y, width, height]`, `category_id`, `iscrowd`; `categories` with `id`,
  `name`). Boxes become normalised `[x1, y1, x2, y2]` with their category names, as the paper fed them.
  The paper (Sec. 3) reads a box as one object: "each box encodes the object concept and its spatial
  location". A COCO crowd annotation (`iscrowd: 1`) is one box around many objects (a crowd of people, a row
  of cars), so sent as a plain `person` it is counted as one more person; it is sent as `person (a group)`,
  which keeps where the group is and says it is not one object. Images of the captions file without a
  caption are left out and counted; instances that match no captioned image at all (files from different
  splits) are an error, and many captioned images without boxes a warning.
- JSON Lines, one image per line: `{"image": path, "captions": [str] | str, "boxes": [{"label", "bbox"}],
  "id"?: str}`. `bbox` is `[x1, y1, x2, y2]`, normalised (all within 0..1) or in pixels (then divided by the
  image's size, read from its header). `id` defaults to the image path.

Every problem is collected with its record (file and line, or COCO image id) and reported together, before
any request is sent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from lvit.data.images import image_exists, resolve_image_path
from lvit.errors import LvitError
from lvit.textfiles import json_lines, read_json, read_text

log = logging.getLogger(__name__)
CAPTIONS_HEADER = "Captions:"
GROUP_SUFFIX = " (a group)"
# Above this share of captioned images without a box, the instances file is probably not the captions' split.
MANY_WITHOUT_BOXES = 0.1
BOXES_HEADER = "Objects (name: [x1, y1, x2, y2], coordinates from 0 to 1, origin at the top left):"


@dataclass
class Box:
    label: str
    bbox: tuple[float, float, float, float]

    def text(self) -> str:
        return f"{self.label}: [{', '.join(f'{v:.3f}' for v in self.bbox)}]"

    def area(self) -> float:
        return (self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1])


@dataclass
class ImageContext:
    """One image as the LLM sees it: no pixels, only words."""

    id: str
    image: str
    captions: list[str]
    boxes: list[Box] = field(default_factory=list)

    def text(self, max_boxes: int | None = None) -> str:
        """The context block sent to the LLM (captions, then boxes when there are any); with `max_boxes`, only
        that many boxes, the largest, in their order."""
        lines = [CAPTIONS_HEADER, *self.captions]
        boxes = self.boxes
        if max_boxes is not None and len(boxes) > max_boxes:
            keep = set(sorted(range(len(boxes)), key=lambda i: -boxes[i].area())[:max_boxes])
            boxes = [b for i, b in enumerate(boxes) if i in keep]
        if boxes:
            lines += ["", BOXES_HEADER, *(b.text() for b in boxes)]
        return "\n".join(lines)


def _fail(problems: list[str], source: str) -> None:
    if problems:
        listed = "\n".join(f"  {p}" for p in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise LvitError(f"{source}: {len(problems)} record(s) cannot be used:\n{listed}{more}")


def _read_coco_json(path: Path, what: str) -> dict:
    data = read_json(path, what, hint=f"; is it COCO's {what}?")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise LvitError(f"{path}: not a COCO {what} (expected an object with 'images' and 'annotations')")
    return data


def read_coco(captions_path: str | Path, instances_path: str | Path | None = None) -> list[ImageContext]:
    """Contexts from COCO caption (and instance) annotations, in the caption file's image order."""
    captions_path = Path(captions_path)
    caps = _read_coco_json(captions_path, "captions file")
    images = {}
    problems = []
    for img in caps.get("images") or []:
        try:
            images[img["id"]] = (str(img["file_name"]), float(img["width"]), float(img["height"]))
        except (KeyError, TypeError, ValueError):
            problems.append(f"image entry {img!r:.80}: needs id, file_name, width and height")
    texts: dict = {}
    for ann in caps["annotations"]:
        if not isinstance(ann, dict) or ann.get("image_id") not in images or not str(ann.get("caption", "")).strip():
            problems.append(f"caption annotation {ann!r:.80}: needs an image_id listed in 'images' and a caption")
            continue
        texts.setdefault(ann["image_id"], []).append(" ".join(str(ann["caption"]).split()))
    boxes: dict = {}
    elsewhere = 0
    if instances_path is not None:
        instances_path = Path(instances_path)
        inst = _read_coco_json(instances_path, "instances file")
        names = {c["id"]: c["name"] for c in inst.get("categories") or [] if isinstance(c, dict)}
        for ann in inst["annotations"]:
            image = images.get(ann.get("image_id")) if isinstance(ann, dict) else None
            if image is None or ann.get("image_id") not in texts:
                elsewhere += 1  # instances of images without captions: not used
                continue
            bbox, cat = ann.get("bbox"), ann.get("category_id")
            if cat not in names or not (isinstance(bbox, list) and len(bbox) == 4):
                problems.append(
                    f"{instances_path.name}: annotation {ann.get('id')!r} (image {ann.get('image_id')}): "
                    "needs a category_id listed in 'categories' and a bbox [x, y, width, height]"
                )
                continue
            _, w, h = image
            x, y, bw, bh = (float(v) for v in bbox)
            norm = (x / w, y / h, (x + bw) / w, (y + bh) / h)
            label = names[cat] + (GROUP_SUFFIX if ann.get("iscrowd") else "")
            boxes.setdefault(ann["image_id"], []).append(Box(label, tuple(min(1.0, max(0.0, v)) for v in norm)))
    _fail(problems, str(captions_path))
    uncaptioned = len(images) - len(texts)
    if uncaptioned:
        log.warning("%s: %d of %d images have no caption and are left out", captions_path, uncaptioned, len(images))
    if instances_path is not None and texts:
        _check_split(captions_path, instances_path, len(texts), len(boxes), elsewhere)
    out = [
        ImageContext(str(image_id), images[image_id][0], texts[image_id], boxes.get(image_id, []))
        for image_id in images
        if image_id in texts
    ]
    if not out:
        raise LvitError(f"{captions_path}: no image has a caption; is it COCO's captions_*.json?")
    return out


def _check_split(captions_path, instances_path, captioned: int, with_boxes: int, elsewhere: int) -> None:
    if with_boxes == 0:
        raise LvitError(
            f"{instances_path}: none of its {elsewhere} annotations is of an image captioned in {captions_path}: "
            "are the two files from the same split (e.g. captions_train2017.json with instances_train2017.json)?"
        )
    without = captioned - with_boxes
    if without > MANY_WITHOUT_BOXES * captioned:
        log.warning(
            "%s: %d of %d captioned images have no box in %s and are sent with captions only; are the two files "
            "from the same split?", captions_path, without, captioned, instances_path,
        )  # fmt: skip
    elif without:
        log.info("%d of %d captioned images have no box in %s (captions only)", without, captioned, instances_path)


def read_jsonl(path: str | Path, image_folder: str | Path | None = None) -> list[ImageContext]:
    """Contexts from a JSON Lines file (one image per line, see the module's docstring)."""
    path = Path(path)
    out, problems, seen = [], [], set()
    for n, row, why in json_lines(read_text(path, "input file")):
        where = f"line {n}"
        if why is not None:
            problems.append(f"{where}: not valid JSON ({why})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not row["image"]:
            problems.append(f'{where}: needs "image": the image\'s path (relative to --image-folder)')
            continue
        rid = str(row.get("id", row["image"]))
        where = f"line {n} (id {rid!r})"
        if rid in seen:
            problems.append(f"{where}: the id appears on an earlier line; ids must be unique (add an 'id' field)")
            continue
        seen.add(rid)
        captions = row.get("captions")
        captions = [captions] if isinstance(captions, str) else captions
        if not (isinstance(captions, list) and captions and all(isinstance(c, str) and c.strip() for c in captions)):
            problems.append(f'{where}: needs "captions": a non-empty list of non-empty strings (or one string)')
            continue
        boxes, bad = _boxes(row.get("boxes", []), row["image"], image_folder)
        if bad:
            problems.append(f"{where}: {bad}")
            continue
        out.append(ImageContext(rid, row["image"], [" ".join(c.split()) for c in captions], boxes))
    _fail(problems, str(path))
    if not out:
        raise LvitError(f"{path}: no records")
    return out


def _boxes(raw, image: str, image_folder) -> tuple[list[Box], str | None]:
    if not isinstance(raw, list):
        return [], '"boxes" must be a list of {"label": str, "bbox": [x1, y1, x2, y2]}'
    boxes, size = [], None
    for i, b in enumerate(raw):
        bbox = b.get("bbox") if isinstance(b, dict) else None
        label = b.get("label") if isinstance(b, dict) else None
        if not isinstance(label, str) or not label.strip():
            return [], f'box {i}: needs "label", a non-empty string'
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            return [], f'box {i} ({label}): "bbox" must be four numbers [x1, y1, x2, y2]'
        x1, y1, x2, y2 = (float(v) for v in bbox)
        if x2 < x1 or y2 < y1 or min(bbox) < 0:
            return [], f"box {i} ({label}): bbox {bbox} needs 0 <= x1 <= x2 and 0 <= y1 <= y2 ([x1, y1, x2, y2])"
        if max(bbox) > 1:  # pixels: normalise by the image's size
            if size is None:
                size = _image_size(image, image_folder)
                if size is None:
                    return [], (
                        f"box {i} ({label}): bbox {bbox} is in pixels but the image cannot be read to get its "
                        "size; give normalised coordinates (0..1) or fix the image path / --image-folder"
                    )
            w, h = size
            x1, y1, x2, y2 = x1 / w, y1 / h, x2 / w, y2 / h
            if max(x2, y2) > 1.0 + 1e-6:
                return [], f"box {i} ({label}): bbox {bbox} reaches outside the {w}x{h} image"
        boxes.append(Box(" ".join(label.split()), (x1, y1, x2, y2)))
    return boxes, None


def _image_size(image: str, image_folder) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(resolve_image_path(image, image_folder)) as img:
            return img.size
    except (OSError, ValueError):
        return None


def check_images(contexts: list[ImageContext], image_folder: str | Path | None) -> None:
    """Every image must exist: the records written name them, and `lvit data check` / training open them."""
    missing = [c for c in contexts if not image_exists(c.image, image_folder)]
    if missing:
        listed = ", ".join(f"{c.id!r} ({resolve_image_path(c.image, image_folder)})" for c in missing[:3])
        raise LvitError(
            f"{len(missing)} of {len(contexts)} images not found, e.g. {listed}. Pass --image-folder, the folder "
            "the image paths are relative to (for COCO: the folder holding the file_name images, e.g. train2014)."
        )
