"""Loading images for the vision tower: any common mode to RGB, EXIF orientation applied.

An image is a file path (absolute, or relative to the image folder), an image embedded in a
Hugging Face dataset (`lvit.data.sources.EmbeddedImage`, made by `read_records`), or the encoded
bytes a training row carries (as a file object); it is only read and decoded when a batch or a
check needs it.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps

from lvit.data.sources import EmbeddedImage, is_embedded

# Modes with an alpha channel (or a transparent palette entry): composited over white.
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# 16-bit (and 32-bit integer) greyscale: scaled to 8 bits from the full 16-bit range, not clipped.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def resolve_image_path(path: str, image_folder: str | Path | None) -> Path:
    p = Path(path)
    if not p.is_absolute() and image_folder is not None:
        p = Path(image_folder) / p
    return p


def describe_image(image: str | EmbeddedImage, image_folder: str | Path | None) -> str:
    """How an image is named in messages: its resolved path, or which dataset row holds it."""
    return str(image) if is_embedded(image) else str(resolve_image_path(image, image_folder))


def open_image_source(image, image_folder: str | Path | None):
    """What `PIL.Image.open` takes for an image: a path (resolved), an embedded image's bytes as a file
    object, or a file object as is."""
    if is_embedded(image):
        return io.BytesIO(image.read())
    if isinstance(image, (str, Path)):
        return resolve_image_path(image, image_folder)
    return image


def load_rgb(path) -> Image.Image:
    """Open an image (path or file object), apply its EXIF orientation and convert it to RGB.

    Transparency is composited over white; 16-bit greyscale is scaled (not clipped) to 8 bits;
    palette, 1-bit, greyscale and CMYK images are converted by PIL.
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in _WIDE_MODES:
        import numpy as np

        scaled = np.clip(np.asarray(img).astype(np.float64), 0, 65535) / 257.0  # 65535 -> 255
        return Image.fromarray(np.rint(scaled).astype("uint8")).convert("RGB")
    if img.mode == "F":
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        if arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype("uint8")).convert("RGB")
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


def mean_fill(image_processor) -> tuple[int, ...]:
    """The padding colour for `pad`: the processor's mean, as LLaVA computes it.

    Source: LLaVA `llava/train/train.py` and `llava/mm_utils.py`:
    `expand2square(image, tuple(int(x*255) for x in processor.image_mean))` (truncated, not rounded).
    """
    mean = getattr(image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
    return tuple(int(m * 255) for m in mean)


class ImageLoader:
    """Loads a record's image and turns a batch of them into `pixel_values`.

    Holds only the processor and settings (no open files or datasets), so it pickles into
    data-loader worker processes.
    """

    def __init__(self, image_processor, image_folder: str | Path | None = None, aspect_ratio: str = "square"):
        self.image_processor = image_processor
        self.image_folder = image_folder
        self.aspect_ratio = aspect_ratio
        self.fill = mean_fill(image_processor)

    def load(self, image) -> Image.Image:
        """An image (a path, an `EmbeddedImage` or a file object) in RGB, padded for `pad`."""
        img = load_rgb(open_image_source(image, self.image_folder))
        if self.aspect_ratio == "pad":
            img = pad_to_square(img, self.fill)
        return img

    def pixel_values(self, images: list[Image.Image]):
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def image_inputs(self, images: list[Image.Image]) -> dict:
        """The model's image inputs: `pixel_values`, and `image_sizes` where the processor gives them (LLaVA-NeXT's
        AnyRes: each image's tiles, and its size)."""
        out = self.image_processor(images=images, return_tensors="pt")
        return {k: out[k] for k in ("pixel_values", "image_sizes") if k in out}


# ---------------------------------------------------------------------------------------------
# checking images (lvit data check, training's up-front checks)


def image_exists(image: str | EmbeddedImage, image_folder: str | Path | None) -> bool:
    """Whether an image can be found: a regular file (one stat), or an embedded image (always)."""
    if is_embedded(image):
        return True
    return os.path.isfile(resolve_image_path(image, image_folder))


def oriented_size(image, image_folder: str | Path | None) -> tuple[int, int]:
    """(height, width) of an image as it is loaded (EXIF orientation applied), from its header alone."""
    with Image.open(open_image_source(image, image_folder)) as img:
        width, height = img.size
        if img.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated a quarter turn
            width, height = height, width
    return height, width


def read_header(source) -> tuple[str | None, tuple[int, int]]:
    """An image's format and size from its header alone (`PIL.Image.open` reads no pixel data): the cheap
    check. It finds a file that is not an image PIL can read (random bytes, text, an HTML error page) and a
    decompression bomb; a file cut off after its header (a truncated download) needs the full decode."""
    with Image.open(source) as img:
        return img.format, img.size


def probe_image(
    image: str | EmbeddedImage, image_folder: str | Path | None, decode: bool = True
) -> tuple[str, str, str] | None:
    """Decode an image fully, as training would (or, with `decode=False`, read its header only:
    `read_header`); returns None if it is fine, else `(kind, severity, message)`. Never raises for a bad
    file (a decompression bomb included)."""
    where = describe_image(image, image_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            source = open_image_source(image, image_folder)
            if decode:
                load_rgb(source)
            else:
                read_header(source)
            return None
        except Image.DecompressionBombWarning as exc:
            return (
                "image_too_large",
                "warning",
                f"image {where} is very large ({exc}); it decodes, slowly and with a lot of memory, into a "
                "few hundred pixels: downscale it",
            )
        except Image.DecompressionBombError as exc:
            return (
                "image_too_large",
                "error",
                f"image {where} is too large to decode safely ({exc}); PIL refuses it as a possible "
                "decompression bomb: downscale it, or remove the record",
            )
        except FileNotFoundError:
            return ("image_missing", "error", f"image not found: {where} (check the image folder or the path)")
        except Image.UnidentifiedImageError:
            return (
                "image_unreadable",
                "error",
                f"image {where} is not an image file PIL can read (wrong file, or an unsupported format): "
                "replace it with a PNG or JPEG",
            )
        except OSError as exc:
            if "truncated" in str(exc):
                return ("image_truncated", "error", f"image {where} is truncated ({exc}): re-download or re-encode it")
            if isinstance(exc, PermissionError):
                return ("image_unreadable", "error", f"image {where} cannot be opened ({exc}): fix its permissions")
            return ("image_corrupt", "error", f"image {where} is corrupt ({exc}): re-download or re-encode it")
        except Exception as exc:  # PIL raises SyntaxError, ValueError, struct.error... for broken files
            return (
                "image_corrupt",
                "error",
                f"image {where} is corrupt ({type(exc).__name__}: {exc}): re-download or re-encode it",
            )
