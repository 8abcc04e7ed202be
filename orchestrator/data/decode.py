"""Decoding one encoded image (PNG, JPEG, WebP, BMP, GIF, TIFF; any Pillow mode) into (H, W, C) uint8 with the
checks every reader shares: 16-bit scaled, transparency composited onto white, size limits, clear errors."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

from orchestrator.data.errors import DataError

MAX_PIXELS = 8192 * 8192  # image_folder refuses larger images rather than decoding GBs of pixels
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_8bit(im, path: Path):
    """A 16-bit grayscale image (mode I;16*, or mode I within 0..65535, as Pillow opens 16-bit PNG/PGM/TIFF) ->
    mode L scaled by 255/65535 (Pillow's own convert clips everything above 255 to white)."""
    from PIL import Image

    a = np.asarray(im).astype(np.int64)  # (H, W) int64
    if a.min() < 0 or a.max() > 65535:
        raise DataError(f"image {path} has 32-bit integer pixels (mode {im.mode}, range {a.min()}..{a.max()}) that "
                        "do not map to 0..255. Fix: save it as an 8- or 16-bit PNG")
    return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")


def to_array(im, path: Path, channels: int, size: int | None) -> np.ndarray:
    """An open PIL image -> (H, W) or (H, W, 3) uint8 (``size``: resize to (size, size) bilinear). 16-bit
    grayscale is scaled, transparency composited onto white (as pools do). Raises DataError for a zero-size,
    too large (over MAX_PIXELS) or float (mode F) image."""
    from PIL import Image

    w, h = im.size
    if w * h == 0:
        raise DataError(f"image {path} is empty ({w}x{h} pixels). Fix: delete or replace this file")
    if w * h > MAX_PIXELS:
        raise DataError(f"image {path} is {w}x{h} pixels, over the {MAX_PIXELS:,}-pixel limit (data.image_size "
                        "resizes only after decoding). Fix: downscale or delete it")
    if im.mode == "F":
        raise DataError(f"image {path} has 32-bit float pixels (mode F), which have no fixed 0..255 scale. "
                        "Fix: save it as an 8- or 16-bit PNG")
    if im.mode in SIXTEEN_BIT_MODES or im.mode == "I":
        im = to_8bit(im, path)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    im = im.convert("L" if channels == 1 else "RGB")
    if size:
        im = im.resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def decode_image(data: bytes | Path, channels: int, size: int | None, name: str | Path | None = None,
                 dims: list | None = None) -> np.ndarray:
    """Decode one image (its encoded bytes, or a file path) into (H, W, channels) uint8 (``size``: resized to
    (size, size), bilinear). ``dims``: a list that receives the image's own (height, width). Raises DataError
    naming the file (``name``, default the path) and the fix."""
    from PIL import Image, UnidentifiedImageError

    path = name if name is not None else data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS refuses those
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
                if dims is not None:
                    dims[:] = [im.size[1], im.size[0]]
                arr = to_array(im, path, channels, size)
    except Image.DecompressionBombError as e:
        raise DataError(f"image {path} is too large to decode ({e}). Fix: downscale or delete it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"corrupt or unreadable image {path}: {e}. Fix: delete or replace this file") from None
    return arr[..., None] if arr.ndim == 2 else arr


