"""The real offline images the demo pool mixes in beside the target task (orchestrator.demo.pool): glyphs
rendered from the machine's TrueType fonts, Debian icon-theme PNGs, crops of bundled photos, and scikit-learn's
8x8 handwritten digits, each with the augmentations the pool's docstring lists, plus the PNG/JPEG encoder and the
affine warp they share. Every function takes its ``np.random.Generator``: the same stream gives the same images.
"""
from __future__ import annotations

import glob
import hashlib
import io
import math
import string
from pathlib import Path

import numpy as np

GLYPH_SIZE = 64
PHOTO_SIZE = 64
NOTMNIST_CHARS = "ABCDEFGHIJ"
OTHER_CHARS = string.ascii_uppercase[10:] + string.ascii_lowercase + string.digits + "&?@#%$"
FONT_DIRS = ("/usr/share/fonts/truetype",)
EXCLUDED_FONTS = {"cmex10", "cmsy10", "LastResortHE-Regular"}  # ASCII codes mapped to symbols / placeholders
ICON_DIRS = ("/usr/share/icons",)

# ---------------------------------------------------------------- image helpers


def encode_image(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    """Encode (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 as PNG or JPEG (quality 90) bytes."""
    from PIL import Image

    arr = arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def affine(im, angle: float, scale: float, dx: float, dy: float, fill=0, resample=None):
    """Rotate ``im`` (PIL image) by ``angle`` degrees and scale it about its centre, then shift by (dx, dy) px;
    same size out, uncovered pixels ``fill``."""
    from PIL import Image

    w, h = im.size
    t = math.radians(angle)
    a, b, d, e = math.cos(t) / scale, math.sin(t) / scale, -math.sin(t) / scale, math.cos(t) / scale
    ox, oy = w / 2 + dx, h / 2 + dy  # the output position of the input centre
    coeffs = (a, b, w / 2 - a * ox - b * oy, d, e, h / 2 - d * ox - e * oy)
    return im.transform((w, h), Image.AFFINE, coeffs, resample=resample or Image.BILINEAR, fillcolor=fill)


# ---------------------------------------------------------------- glyphs


def find_fonts() -> list[Path]:
    """Usable TrueType fonts: Debian's, then matplotlib's; one per (family, style), Latin letters present."""
    from PIL import ImageFont

    paths = [Path(p) for d in FONT_DIRS for p in sorted(glob.glob(f"{d}/**/*.ttf", recursive=True))]
    try:
        import matplotlib

        paths += sorted(Path(matplotlib.get_data_path(), "fonts", "ttf").glob("*.ttf"))
    except ImportError:
        pass
    fonts, seen = [], set()
    for p in paths:
        if p.stem in EXCLUDED_FONTS:
            continue
        try:
            font = ImageFont.truetype(str(p), 40)
        except OSError:
            continue
        if font.getname() not in seen and len(_supported_chars(font, NOTMNIST_CHARS)) == len(NOTMNIST_CHARS):
            seen.add(font.getname())
            fonts.append(p)
    return fonts


def _supported_chars(font, chars: str) -> str:
    """The characters of ``chars`` that ``font`` draws as themselves (not empty, not its .notdef box)."""
    from PIL import Image, ImageDraw

    def draw(ch):
        im = Image.new("L", (64, 64))
        ImageDraw.Draw(im).text((32, 32), ch, font=font, fill=255, anchor="mm")
        return im.tobytes()

    notdef = draw("\U0010fffd")
    return "".join(c for c in chars if (r := draw(c)) != notdef and any(r))


def glyph_sources(fonts: list[Path]) -> list[tuple[Path, str]]:
    """All (font, character) pairs the fonts can draw, from NOTMNIST_CHARS and OTHER_CHARS."""
    from PIL import ImageFont

    return [(p, c) for p in fonts for c in _supported_chars(ImageFont.truetype(str(p), 40),
                                                            NOTMNIST_CHARS + OTHER_CHARS)]


def render_glyph(font_path: Path, ch: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one augmented glyph: (size, size) uint8, white on black unless inverted."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(font_path), int(size * rng.uniform(0.55, 0.85)))
    im = Image.new("L", (size, size))
    stroke = int(rng.choice([0, 0, 1, 2]) * size / 64)
    ImageDraw.Draw(im).text((size / 2, size / 2), ch, font=font, fill=255, anchor="mm",
                            stroke_width=stroke, stroke_fill=255)
    shift = rng.uniform(-0.08, 0.08, size=2) * size
    arr = np.asarray(affine(im, rng.uniform(-15, 15), 1.0, shift[0], shift[1]))
    return 255 - arr if rng.random() < 0.3 else arr


def render_glyphs(n: int, size: int, rng: np.random.Generator,
                  sources: list[tuple[Path, str]] | None = None) -> tuple[np.ndarray, list[str]]:
    """``n`` notMNIST-style glyphs (half A-J, half other characters) from random (font, char) pairs.

    Returns: images (n, size, size) uint8 and sources ["<font file>:<char>", ...].
    """
    sources = sources if sources is not None else glyph_sources(find_fonts())
    letters = [i for i, (_, c) in enumerate(sources) if c in NOTMNIST_CHARS]
    others = [i for i, (_, c) in enumerate(sources) if c not in NOTMNIST_CHARS] or letters
    out, names = np.zeros((n, size, size), np.uint8), []
    for k in range(n):
        font, ch = sources[int(rng.choice(letters if rng.random() < 0.5 else others))]
        out[k] = render_glyph(font, ch, size, rng)
        names.append(f"{font.name}:{ch}")
    return out, names


# ---------------------------------------------------------------- digits


def load_digit_images() -> np.ndarray | None:
    """scikit-learn's handwritten digits as (1797, 8, 8) uint8 (ink bright), or None without scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    return np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)


def augment_digit(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(8, 8) uint8 -> (8, 8) uint8: upsample x4, random affine and stroke weight, box-downsample."""
    from PIL import Image, ImageFilter

    im = Image.fromarray(img).resize((32, 32), Image.BILINEAR)
    im = affine(im, rng.uniform(-15, 15), rng.uniform(0.85, 1.15), *rng.uniform(-2, 2, size=2))
    if rng.random() < 0.25:
        im = im.filter(ImageFilter.MaxFilter(3))
    return np.asarray(im.resize((8, 8), Image.BOX))


def digit_images(n: int, rng: np.random.Generator,
                 digits: np.ndarray | None = None) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``n`` digits: the real ones first (random order), then augmented copies of random ones.

    Returns: images (n, 8, 8) uint8, sources ["sklearn.digits[i]", ...], augmented (n,) bool.
    """
    digits = digits if digits is not None else load_digit_images()
    idx = np.concatenate([rng.permutation(len(digits))[:n], rng.integers(0, len(digits), max(0, n - len(digits)))])
    aug = np.arange(n) >= len(digits)
    out = np.stack([augment_digit(digits[i], rng) if a else digits[i] for i, a in zip(idx, aug)]) \
        if n else np.zeros((0, 8, 8), np.uint8)
    return out, [f"sklearn.digits[{i}]" for i in idx], aug


# ---------------------------------------------------------------- icons


def find_icons() -> list[Path]:
    """The PNG files under ICON_DIRS, sorted, byte-identical files kept once."""
    files, seen = [], set()
    for d in ICON_DIRS:
        for p in sorted(glob.glob(f"{d}/**/*.png", recursive=True)):
            try:
                h = hashlib.sha256(Path(p).read_bytes()).digest()
            except OSError:
                continue
            if h not in seen:
                seen.add(h)
                files.append(Path(p))
    return files


def augment_icon(data: bytes, rng: np.random.Generator) -> bytes:
    """PNG bytes -> PNG bytes (RGBA, same size): random flip, rotation, scale, shift; transparent fill."""
    from PIL import Image, ImageOps

    im = Image.open(io.BytesIO(data)).convert("RGBA")
    if rng.random() < 0.5:
        im = ImageOps.mirror(im)
    w, h = im.size
    im = affine(im, rng.uniform(-20, 20), rng.uniform(0.8, 1.1), *(rng.uniform(-0.08, 0.08, 2) * (w, h)),
                fill=(0, 0, 0, 0))
    return encode_image(np.asarray(im))


def icon_images(n: int, rng: np.random.Generator,
                files: list[Path] | None = None) -> tuple[list[bytes], list[str], np.ndarray]:
    """``n`` icons: the files' own PNG bytes first (random order), then augmented copies of random files.

    Returns: PNG bytes per image (each at its own size), sources (paths under the icon dir), augmented (n,) bool.
    """
    files = files if files is not None else find_icons()
    idx = np.concatenate([rng.permutation(len(files))[:n], rng.integers(0, len(files), max(0, n - len(files)))])
    aug = np.arange(n) >= len(files)
    data = [augment_icon(files[i].read_bytes(), rng) if a else files[i].read_bytes() for i, a in zip(idx, aug)]
    return data, [_icon_name(files[i]) for i in idx], aug


def _icon_name(p: Path) -> str:
    for d in ICON_DIRS:
        if p.is_relative_to(d):
            return p.relative_to(d).as_posix()
    return p.as_posix()


# ---------------------------------------------------------------- photos


def find_photos() -> list[Path]:
    """Real photos on disk: sklearn's sample images and matplotlib's grace_hopper.jpg (those present)."""
    paths = []
    try:
        from sklearn.datasets import load_sample_images

        paths += [Path(f) for f in load_sample_images().filenames]
    except ImportError:
        pass
    try:
        import matplotlib

        paths.append(Path(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))
    except ImportError:
        pass
    return [p for p in paths if p.is_file()]


def photo_patches(n: int, size: int, rng: np.random.Generator,
                  photos: list[Path] | None = None) -> tuple[np.ndarray, list[str]]:
    """``n`` random square crops (side 48-256 px, random position, flip p=0.5) of the photos, resized.

    Returns: images (n, size, size, 3) uint8 and sources ["<photo>@x<x>y<y>s<side>[f]", ...].
    """
    from PIL import Image, ImageOps

    photos = photos if photos is not None else find_photos()
    ims = [Image.open(p).convert("RGB") for p in photos]
    out, names = np.zeros((n, size, size, 3), np.uint8), []
    for k in range(n):
        j = int(rng.integers(len(ims)))
        w, h = ims[j].size
        s = int(rng.integers(48, min(256, w, h) + 1))
        x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        patch = ims[j].crop((x, y, x + s, y + s)).resize((size, size), Image.LANCZOS)
        flip = rng.random() < 0.5
        out[k] = np.asarray(ImageOps.mirror(patch) if flip else patch)
        names.append(f"{photos[j].name}@x{x}y{y}s{s}{'f' if flip else ''}")
    return out, names
