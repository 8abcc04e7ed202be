"""Test helpers: write small pools in the three formats the retrieval source reads."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np


def png(img: np.ndarray) -> bytes:
    """(H, W, C) uint8 -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
    return buf.getvalue()


def write_webdataset(root: Path, images: np.ndarray, keys: list[str], per_shard: int,
                     corrupt: set[int] = frozenset()) -> Path:
    """img2dataset-style ``NNNNN.tar`` shards of ``<key>.png`` + ``<key>.json``; images at ``corrupt``
    positions get garbage bytes."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(images), per_shard):
        with tarfile.open(root / f"{s // per_shard:05d}.tar", "w") as tar:
            for i in range(s, min(s + per_shard, len(images))):
                data = b"not an image" if i in corrupt else png(images[i])
                for name, blob in ((f"{keys[i]}.png", data), (f"{keys[i]}.json", json.dumps({"i": i}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    return root


def write_parquet(root: Path, images: np.ndarray, keys: list[str], per_shard: int) -> Path:
    """``part-N.parquet`` files with columns ``key`` (string) and ``jpg`` (PNG bytes, as img2dataset names it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(images), per_shard):
        idx = range(s, min(s + per_shard, len(images)))
        pq.write_table(pa.table({"key": [keys[i] for i in idx], "jpg": [png(images[i]) for i in idx]}),
                       root / f"part-{s // per_shard}.parquet")
    return root


def write_image_dir(root: Path, images: np.ndarray, keys: list[str]) -> Path:
    """``root/<key>.png`` files."""
    root.mkdir(parents=True, exist_ok=True)
    for img, k in zip(images, keys):
        (root / f"{k}.png").write_bytes(png(img))
    return root


def mixed_pool_images(target: np.ndarray, n_other: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Target images (keys ``target-N``) shuffled with ``n_other`` off-domain images (keys ``other-N``): random
    checkerboards and stripes of the same size, so retrieval has something to reject."""
    rng = np.random.default_rng(seed)
    h, w, c = target.shape[1:]
    yy, xx = np.mgrid[:h, :w]
    other = []
    for _ in range(n_other):
        period = rng.integers(2, 7)
        pattern = ((yy // period + xx // period) % 2) if rng.random() < 0.5 else ((xx + yy * rng.integers(0, 3)) // period % 2)
        other.append((pattern * rng.integers(120, 256) + rng.integers(0, 40, (h, w))).clip(0, 255))
    other = np.stack(other).astype(np.uint8)[..., None].repeat(c, -1)
    images = np.concatenate([target, other])
    keys = [f"target-{i}" for i in range(len(target))] + [f"other-{i}" for i in range(n_other)]
    order = rng.permutation(len(images))
    return images[order], [keys[i] for i in order]


MODES = ("jpeg", "png_gray", "palette", "rgba", "png16", "webp")


def write_mixed_image_folder(root: Path, images: np.ndarray, labels: np.ndarray, classes: list[str],
                             test_every: int = 4, seed: int = 0) -> dict[str, int]:
    """A user's RGB ImageFolder from real grayscale images ((N, H, W, 1) uint8): each image coloured, upscaled to a
    seeded size of 60-180 px and saved in a mode of :data:`MODES` in turn (JPEG, grayscale PNG, palette PNG, RGBA
    PNG with transparency, 16-bit PNG, WebP); every ``test_every``-th image goes to test/; beside every fifth
    image a hidden macOS ``._`` copy (not an image). Returns {"train", "test", "hidden"} counts."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    counts = {"train": 0, "test": 0, "hidden": 0}
    for i, (img, y) in enumerate(zip(images, labels)):
        split = "test" if i % test_every == 0 else "train"
        d = root / split / classes[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        side = int(rng.integers(60, 181))
        g = Image.fromarray(img[..., 0]).resize((side, side), Image.BILINEAR)
        tint = rng.uniform(0.4, 1.0, 3)
        rgb = Image.fromarray((np.asarray(g)[..., None] * tint).astype(np.uint8), "RGB")
        mode = MODES[i % len(MODES)]
        name = d / f"img{i:04d}"
        if mode == "jpeg":
            rgb.save(name.with_suffix(".jpg"), quality=90)
        elif mode == "png_gray":
            g.save(name.with_suffix(".png"))
        elif mode == "palette":
            rgb.convert("P", palette=Image.ADAPTIVE, colors=64).save(name.with_suffix(".png"))
        elif mode == "rgba":
            a = rgb.convert("RGBA")
            a.putalpha(Image.fromarray(np.where(np.asarray(g) > 20, 255, 0).astype(np.uint8)))
            a.save(name.with_suffix(".png"))
        elif mode == "png16":
            Image.fromarray(np.asarray(g).astype(np.uint16) * 257).save(name.with_suffix(".png"))
        else:
            rgb.save(name.with_suffix(".webp"), quality=90)
        counts[split] += 1
        if i % 5 == 0:
            (d / f"._img{i:04d}.jpg").write_bytes(b"\x00\x05\x16\x07 macOS AppleDouble")
            counts["hidden"] += 1
    return counts
