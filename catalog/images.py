"""Image decoding and the one preprocessing step every stage shares (no torch here)."""

from __future__ import annotations

import hashlib
import io
import math

import numpy as np
from PIL import Image, UnidentifiedImageError

MODEL_IMAGE_SIZE = 256
# Refuse absurd images before decoding them fully (PIL's bomb check covers the rest).
MAX_IMAGE_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# Images are padded to a square before the resize: the longest side bounds that work too.
MAX_IMAGE_SIDE = math.isqrt(MAX_IMAGE_PIXELS)
# Only these decoders ever run: the API takes what its documentation promises, catalogs common
# raster formats too. Never PostScript/EPS/PDF (Pillow would start Ghostscript) or exotic plugins.
API_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
CATALOG_IMAGE_FORMATS = (*API_IMAGE_FORMATS, "BMP", "GIF", "TIFF")


class ImageDecodeError(ValueError):
    pass


def decode_image(data: bytes | str, formats: tuple[str, ...] = CATALOG_IMAGE_FORMATS) -> np.ndarray:
    """Bytes or a file path -> uint8 RGB array (H, W, 3). Transparency is flattened onto white."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data, formats=list(formats)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ImageDecodeError(f"image is {img.width}x{img.height}, over the {MAX_IMAGE_PIXELS:,}-pixel limit")
            if max(img.width, img.height) > MAX_IMAGE_SIDE:
                raise ImageDecodeError(f"image is {img.width}x{img.height}: its longest side is over the "
                                       f"{MAX_IMAGE_SIDE:,}-pixel limit")
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(canvas, rgba)
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except ImageDecodeError:
        raise
    except FileNotFoundError as exc:
        raise ImageDecodeError(f"image file not found: {exc.filename}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not a readable image (expected {', '.join(formats[:-1])} or {formats[-1]})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"not a readable image ({type(exc).__name__}: {exc})") from None


def to_model_image(image: np.ndarray, size: int = MODEL_IMAGE_SIZE) -> np.ndarray:
    """Any RGB image -> (size, size, 3) uint8.

    Product shots are not always square; padding with the border colour keeps the garment's
    proportions (a stretched dress reads as a different cut), then one resize.
    """
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    if h != w:
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).mean(axis=0)
        side = max(h, w)
        canvas = np.empty((side, side, 3), dtype=np.uint8)
        canvas[:] = border.round().astype(np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top : top + h, left : left + w] = image
        image = canvas
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), dtype=np.uint8)


def image_hash(image: np.ndarray) -> str:
    """Content hash of decoded pixels: the same picture re-encoded still hits the feature cache."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()
