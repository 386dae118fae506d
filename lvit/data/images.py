"""Loading images for the vision tower: any common mode to RGB, EXIF orientation applied."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps


def resolve_image_path(path: str, image_folder: str | Path | None) -> Path:
    p = Path(path)
    if not p.is_absolute() and image_folder is not None:
        p = Path(image_folder) / p
    return p


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image, apply its EXIF orientation and convert it to RGB (alpha over white)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16/32-bit greyscale: scale to 8 bits instead of clipping
            import numpy as np

            arr = np.asarray(img, dtype=np.float64)
            hi = arr.max() or 1.0
            return Image.fromarray((arr * (255.0 / hi)).astype("uint8")).convert("RGB")
        return img.convert("RGB")


def pad_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad to a square with `fill`, the image centred (LLaVA-1.5's `image_aspect_ratio: pad`)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


class ImageLoader:
    """Loads a record's image and turns a batch of them into `pixel_values`."""

    def __init__(self, image_processor, image_folder: str | Path | None = None, aspect_ratio: str = "square"):
        self.image_processor = image_processor
        self.image_folder = image_folder
        self.aspect_ratio = aspect_ratio
        mean = getattr(image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
        self.fill = tuple(int(round(255 * m)) for m in mean)

    def load(self, path: str) -> Image.Image:
        img = load_rgb(resolve_image_path(path, self.image_folder))
        if self.aspect_ratio == "pad":
            img = pad_to_square(img, self.fill)
        return img

    def pixel_values(self, images: list[Image.Image]):
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]
