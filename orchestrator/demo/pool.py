"""The offline demo image POOL for retrieval-augmented transfer sets (Vemulapalli et al. 2024, arXiv 2311.18237).

Retrieval-augmented curation searches a large mixed image pool with the few labeled target images as queries.
No web-scale pool can be downloaded here, so the demo pool mixes the target task's unlabeled remainder with
AT LEAST AS MANY real images from other domains that are on this machine, giving retrieval something to reject.

What goes in (domain = the key prefix; ``n_other = ceil(other_per_target * n_target)``):

- ``fashion_mnist``: every row ``i`` of ``target_images`` (for the demo: the 59,400-image unlabeled remainder of
  the Fashion-MNIST train split), unchanged, as a 28x28 grayscale PNG; source ``target_unlabeled[i]``; the key's
  number is ``i``.
- the other domains share ``n_other`` by the weights ``OTHER_WEIGHTS`` (glyph 0.35, icon 0.25, photo 0.25,
  digit 0.15). A domain whose source files are missing gets weight 0; a domain that would exceed its capacity
  (``MAX_PER_SOURCE`` images per real source) is capped and its excess goes to the others. If all available
  domains together cannot reach ``n_other``, the build fails with a PoolError naming what is missing.

  - ``glyph`` (notMNIST-style): characters rendered with PIL from real TrueType fonts, Debian's
    /usr/share/fonts/truetype/**.ttf and matplotlib's bundled TTFs (DejaVu, STIX, Computer Modern; fonts
    without Latin glyphs and the symbol/placeholder fonts in ``EXCLUDED_FONTS`` are skipped, and fonts with the
    same family and style are kept once). Half the glyphs are the notMNIST letters A-J, half other letters,
    digits and a few symbols. Each is a 64x64 grayscale PNG with a random font, character, font size (55-85% of
    the image), stroke weight (0-2 px outline), rotation (+-15 deg), shift (+-8%) and inversion (p=0.3).
    A real source is a (font, character) pair.
  - ``icon``: the PNG files of the Debian icon themes under /usr/share/icons (Adwaita etc.; byte-identical files
    kept once). First the files themselves with their own bytes and size (mostly RGBA: readers must flatten the
    alpha channel), in random order; beyond the number of files, augmented copies of random files: horizontal
    flip (p=0.5), rotation (+-20 deg), scale (0.8-1.1), shift (+-8%), transparent fill, re-encoded as RGBA PNG at
    the file's own size.
  - ``photo``: random square crops of real photos, sklearn's load_sample_images() (china.jpg, flower.jpg) and
    matplotlib's sample_data/grace_hopper.jpg: a random photo, side 48-256 px (capped by the photo), random
    position, horizontal flip (p=0.5), resized to 64x64 RGB and saved as JPEG (quality 90).
  - ``digit``: scikit-learn's 1,797 8x8 handwritten digits (ink 0-16 scaled to 0-255), first the images
    themselves, beyond that augmented copies: upsampled to 32x32, rotation (+-15 deg), scale (0.85-1.15), shift
    (+-2 px), thicker stroke (3x3 max filter, p=0.25), back to 8x8 (box filter).

Every random choice comes from ``np.random.default_rng([seed, domain number])``, so the same arguments build
byte-identical shards. All samples are shuffled with ``default_rng([seed, 99])`` so domains mix across shards.

The output is what img2dataset writes in its webdataset format: ``out_dir/00000.tar, 00001.tar, ...``
(``shard_size`` samples each), a sample = ``{key}.png`` (``.jpg`` for photos) + ``{key}.txt`` (a caption) +
``{key}.json`` ({"key", "domain", "source", "augmented", "width", "height", "mode"}), keys
``<domain>-<NNNNNNN>``; per shard ``{shard}_stats.json`` (count, successes, ...) and a top-level ``pool.json``
(parameters, counts per domain, sources used, how built). Tar members have fixed metadata (mtime 0, mode 0o444).
Every file is written under a temporary name and renamed, inside a temporary sibling directory that is renamed to
``out_dir`` at the end: a killed build leaves no ``out_dir`` (only a hidden ``.NAME.building-PID`` directory,
removed by the next build). An ``out_dir`` whose pool.json has the same parameters is returned as it is.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.cache import write_atomic
from orchestrator.data.loaders import DataError
from orchestrator.demo.sources import (GLYPH_SIZE, ICON_DIRS, NOTMNIST_CHARS, OTHER_CHARS, PHOTO_SIZE,
                                       digit_images, encode_image, find_fonts, find_icons, find_photos,
                                       glyph_sources, icon_images, load_digit_images, photo_patches, render_glyphs)

log = logging.getLogger(__name__)

BUILDER_VERSION = 1
TARGET_DOMAIN = "fashion_mnist"
DOMAINS = (TARGET_DOMAIN, "glyph", "digit", "icon", "photo")  # index = the domain's RNG stream number
OTHER_WEIGHTS = {"glyph": 0.35, "icon": 0.25, "photo": 0.25, "digit": 0.15}
# capacity: at most this many pool images per real source ((font, char) pair, icon file, digit image, photo)
MAX_PER_SOURCE = {"glyph": 50, "icon": 20, "digit": 20, "photo": 10_000}
SHUFFLE_STREAM = 99


class PoolError(DataError):
    """The pool cannot be built (too few source images, an out_dir that is not a pool, bad arguments)."""


@dataclass
class Sample:
    """One pool sample: encoded image bytes plus its metadata (``ext`` is "png" or "jpg")."""

    domain: str
    index: int
    data: bytes
    ext: str
    source: str
    caption: str
    augmented: bool = False

    @property
    def key(self) -> str:
        return f"{self.domain}-{self.index:07d}"


# ---------------------------------------------------------------- the pool


def _available_sources() -> dict[str, dict]:
    """Per other domain: the real sources found here ({"items": [...], "n": count}); missing domains left out."""
    found = {"glyph": glyph_sources(find_fonts()), "icon": find_icons(), "photo": find_photos()}
    digits = load_digit_images()
    if digits is not None:
        found["digit"] = digits
    return {d: {"items": v, "n": len(v)} for d, v in found.items() if len(v)}


def allocate(n_other: int, available: dict[str, int]) -> dict[str, int]:
    """Split ``n_other`` among the available domains by OTHER_WEIGHTS, each capped at its capacity
    (``available[d] * MAX_PER_SOURCE[d]``); excess goes to the uncapped ones. Raises PoolError if short."""
    cap = {d: available[d] * MAX_PER_SOURCE[d] for d in OTHER_WEIGHTS if available.get(d)}
    if sum(cap.values()) < n_other:
        raise PoolError(f"only {sum(cap.values())} other-domain images can be made from the sources found "
                        f"({available or 'none'}; capacity {cap}), {n_other} needed: install fonts-dejavu-core, "
                        f"adwaita-icon-theme, scikit-learn or matplotlib, or lower the target count")
    quota, left = {d: 0 for d in cap}, n_other
    while left:
        open_ = [d for d in cap if quota[d] < cap[d]]
        w = np.array([OTHER_WEIGHTS[d] for d in open_])
        share = np.floor(left * w / w.sum()).astype(int)
        share[: left - share.sum()] += 1  # hand out the rounding remainder in weight order
        for d, s in zip(open_, share):
            take = min(int(s), cap[d] - quota[d])
            quota[d] += take
            left -= take
    return quota


def _captions(domain: str, source: str, data: bytes | None = None) -> str:
    if domain == TARGET_DOMAIN:
        return "a 28x28 grayscale Fashion-MNIST image of a clothing item"
    if domain == "glyph":
        font, ch = source.rsplit(":", 1)
        return f"the character '{ch}' rendered in the font {Path(font).stem}"
    if domain == "digit":
        return "an 8x8 grayscale handwritten digit (scikit-learn digits)"
    if domain == "icon":
        parts = source.split("/")
        return f"the icon {Path(parts[-1]).stem.split('.')[0]} from the {parts[0]} icon theme ({parts[1]})"
    return f"a {PHOTO_SIZE}x{PHOTO_SIZE} patch of the photo {source.split('@')[0]}"


def _make_samples(domain: str, n: int, items, rng: np.random.Generator) -> list[Sample]:
    """Generate and encode ``n`` samples of one other domain from its real sources ``items``."""
    if domain == "glyph":
        imgs, srcs = render_glyphs(n, GLYPH_SIZE, rng, items)
        data, aug, ext = [encode_image(a) for a in imgs], np.ones(n, bool), "png"
    elif domain == "digit":
        imgs, srcs, aug = digit_images(n, rng, items)
        data, ext = [encode_image(a) for a in imgs], "png"
    elif domain == "icon":
        data, srcs, aug = icon_images(n, rng, items)
        ext = "png"
    else:
        imgs, srcs = photo_patches(n, PHOTO_SIZE, rng, items)
        data, aug, ext = [encode_image(a, "JPEG") for a in imgs], np.ones(n, bool), "jpg"
    return [Sample(domain, i, b, ext, s, _captions(domain, s), bool(a)) for i, (b, s, a) in
            enumerate(zip(data, srcs, aug))]


def _target_samples(images: np.ndarray) -> list[Sample]:
    return [Sample(TARGET_DOMAIN, i, encode_image(a), "png", f"target_unlabeled[{i}]", _captions(TARGET_DOMAIN, ""))
            for i, a in enumerate(images)]


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


def _sample_meta(s: Sample) -> dict:
    from PIL import Image

    im = Image.open(io.BytesIO(s.data))
    return {"key": s.key, "domain": s.domain, "source": s.source, "augmented": s.augmented,
            "width": im.width, "height": im.height, "mode": im.mode}


def write_shard(path: Path, samples: list[Sample]) -> dict:
    """Write one webdataset tar (per sample: image, .txt caption, .json metadata) atomically, plus its
    ``{shard}_stats.json``. Returns the stats."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for s in samples:
            _tar_member(tar, f"{s.key}.{s.ext}", s.data)
            _tar_member(tar, f"{s.key}.txt", s.caption.encode())
            _tar_member(tar, f"{s.key}.json", json.dumps(_sample_meta(s)).encode())
    os.replace(tmp, path)
    counts = {d: sum(s.domain == d for s in samples) for d in DOMAINS}
    stats = {"count": len(samples), "successes": len(samples), "failed_to_download": 0, "failed_to_resize": 0,
             "domains": {d: c for d, c in counts.items() if c}}
    write_atomic(path.with_name(path.stem + "_stats.json"), json.dumps(stats, indent=1).encode())
    return stats


def _params(target_images: np.ndarray, other_per_target: float, shard_size: int, seed: int) -> dict:
    h = hashlib.sha256(str(target_images.shape).encode())
    h.update(np.ascontiguousarray(target_images).data)
    return {"builder_version": BUILDER_VERSION, "n_target": int(len(target_images)),
            "target_sha256": h.hexdigest()[:16], "other_per_target": float(other_per_target),
            "shard_size": int(shard_size), "seed": int(seed)}


def _existing(out_dir: Path, params: dict) -> dict | None:
    """The pool.json of a complete pool in ``out_dir`` built with ``params``, else None."""
    try:
        info = json.loads((out_dir / "pool.json").read_text())
    except (OSError, ValueError):
        return None
    if info.get("params") == params and all((out_dir / s).is_file() for s in info.get("shards", [])):
        return info
    return None


def _clean_stale(out_dir: Path) -> None:
    """Remove temporary build directories of ``out_dir`` left by builds whose process is gone."""
    for p in out_dir.parent.glob(f".{out_dir.name}.building-*"):
        try:
            os.kill(int(p.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass


def _install(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` directory to ``out_dir``, replacing an old pool there."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def build_demo_pool(out_dir: Path, target_images: np.ndarray, other_per_target: float = 1.0,
                    shard_size: int = 10_000, seed: int = 0) -> dict:
    """Build the demo pool (see the module docstring) in ``out_dir``, or return the existing one.

    Args:
        out_dir: the pool directory (created; an existing pool built with other parameters is replaced).
        target_images: (N, H, W, C) or (N, H, W) uint8, the target task's unlabeled images.
        other_per_target: other-domain images per target image, >= 1.
        shard_size: samples per tar shard.
        seed: seeds every random choice and the shuffle.

    Returns: the pool.json content: params, counts per domain, shards, sources used, how built.
    Raises: PoolError on bad arguments, too few source images, or an ``out_dir`` that is not a pool.
    """
    out_dir = Path(out_dir)
    target_images = np.asarray(target_images)
    if target_images.dtype != np.uint8 or target_images.ndim not in (3, 4) or not len(target_images):
        raise PoolError(f"target_images must be a non-empty (N, H, W[, C]) uint8 array, got "
                        f"{target_images.shape} {target_images.dtype}")
    if not other_per_target >= 1.0 or shard_size < 1:
        raise PoolError(f"need other_per_target >= 1 and shard_size >= 1, got {other_per_target}, {shard_size}")
    params = _params(target_images, other_per_target, shard_size, seed)
    if (info := _existing(out_dir, params)) is not None:
        log.info("pool %s already built with these parameters", out_dir)
        return info
    if out_dir.exists() and not (out_dir / "pool.json").exists() and any(out_dir.iterdir()):
        raise PoolError(f"{out_dir} exists and is not a pool (no pool.json): choose another --out or remove it")
    t0 = time.time()
    n_other = math.ceil(other_per_target * len(target_images))
    found = _available_sources()
    quota = allocate(n_other, {d: v["n"] for d, v in found.items()})
    log.info("pool: %d target + %d other images %s", len(target_images), n_other, quota)
    samples = _target_samples(target_images)
    for d, n in quota.items():
        t = time.time()
        samples += _make_samples(d, n, found[d]["items"], np.random.default_rng([seed, DOMAINS.index(d)]))
        log.info("pool: %d %s images in %.1f s", n, d, time.time() - t)
    order = np.random.default_rng([seed, SHUFFLE_STREAM]).permutation(len(samples))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shards = []
    for k, start in enumerate(range(0, len(order), shard_size)):
        shards.append(f"{k:05d}.tar")
        write_shard(tmp / shards[-1], [samples[i] for i in order[start:start + shard_size]])
    info = {"params": params, "total": len(samples),
            "counts": {TARGET_DOMAIN: len(target_images), **{d: quota.get(d, 0) for d in DOMAINS[1:]}},
            "augmented": {d: sum(s.augmented for s in samples if s.domain == d) for d in DOMAINS},
            "shards": shards, "sources": _describe_sources(found), "weights": OTHER_WEIGHTS,
            "max_per_source": MAX_PER_SOURCE, "how": _how(),
            "format": "webdataset tar shards as img2dataset writes them: {key}.png|jpg + {key}.txt + {key}.json",
            "build_seconds": round(time.time() - t0, 1), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_atomic(tmp / "pool.json", json.dumps(info, indent=1).encode())
    _install(tmp, out_dir)
    log.info("pool: %d samples in %d shards at %s (%.1f s)", len(samples), len(shards), out_dir, time.time() - t0)
    return info


def _how() -> str:
    """The module docstring's description of what goes in (for pool.json)."""
    doc = __doc__ or ""
    return doc[doc.find("What goes in"):doc.find("The output")].strip()


def _describe_sources(found: dict[str, dict]) -> dict:
    """The real sources used, per domain, for pool.json."""
    out = {}
    if "glyph" in found:
        fonts = sorted({p.as_posix() for p, _ in found["glyph"]["items"]})
        out["glyph"] = {"fonts": fonts, "font_char_pairs": found["glyph"]["n"],
                        "chars": NOTMNIST_CHARS + OTHER_CHARS}
    if "icon" in found:
        out["icon"] = {"dirs": list(ICON_DIRS), "unique_png_files": found["icon"]["n"]}
    if "photo" in found:
        out["photo"] = {"photos": [p.as_posix() for p in found["photo"]["items"]]}
    if "digit" in found:
        out["digit"] = {"dataset": "sklearn.datasets.load_digits", "images": found["digit"]["n"]}
    return out
