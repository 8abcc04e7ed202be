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
