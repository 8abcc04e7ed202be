"""Dataset loaders (a registry of formats): Fashion-MNIST IDX files, ImageFolder directories, torchvision."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from orchestrator.config import DatasetConfig
from orchestrator.data.images import ImageSet, TaskData
from orchestrator.data.splits import stratified_pick
from orchestrator.registry import Registry

DATASETS: Registry = Registry("dataset format")

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
# Debian's dataset-fashion-mnist package puts the IDX files here.
DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(RuntimeError):
    """A dataset that is missing, unreadable or corrupt; the message names the file and the fix."""


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally .gz), the MNIST format: big-endian header, then uint8 data.

    Returns: (N, ...) uint8 array. Raises DataError on a truncated or non-IDX file.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}; re-install or re-download the dataset") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not a uint8 IDX file; re-install or re-download the dataset")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated ({data.size} of {int(np.prod(dims))} bytes); re-download it")
    return data.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def fashion_mnist_dirs(cfg: DatasetConfig) -> list[Path]:
    """Where IDX files are looked for, in order: data.root, $KT_FASHION_MNIST_DIR, Debian's package dir."""
    dirs = [cfg.root, os.environ.get("KT_FASHION_MNIST_DIR"), DEBIAN_FASHION_DIR]
    return [Path(d).expanduser() for d in dirs if d]


@DATASETS.register("fashion_mnist_idx")
def load_fashion_mnist(cfg: DatasetConfig) -> TaskData:
    """Fashion-MNIST from IDX files (28x28 grayscale, 60k train / 10k test, 10 classes)."""
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]
    for d in fashion_mnist_dirs(cfg):
        for sub in (d, d / "FashionMNIST" / "raw"):
            files = [_find_idx(sub, s) for s in stems]
            if all(files):
                xtr, ytr, xte, yte = (read_idx(f) for f in files)
                return TaskData(ImageSet(xtr, ytr), ImageSet(xte, yte), list(FASHION_CLASSES))
    if cfg.download:
        return load_torchvision(DatasetConfig(format="torchvision", name="FashionMNIST", download=True,
                                              root=cfg.root or str(Path("~/.cache/kt/data").expanduser())))
    tried = ", ".join(str(d) for d in fashion_mnist_dirs(cfg))
    raise DataError(
        f"Fashion-MNIST IDX files not found (looked in: {tried}). Fix: on Debian run "
        "'apt-get install dataset-fashion-mnist', or set data.root to a folder holding "
        "train-images-idx3-ubyte[.gz] etc., or set data.download=true to fetch it with torchvision"
    )


def _decode(path: Path, channels: int, size: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if size:
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"corrupt or unreadable image {path}: {e}. Fix: delete or replace this file") from None
    return arr[..., None] if arr.ndim == 2 else arr


def read_image_folder(root: Path, channels: int, size: int | None, classes: list[str] | None = None):
    """Read ``root/<class>/<image>`` into ((N, H, W, C) uint8, (N,) int64, classes).

    Raises DataError for a missing folder, no images, mixed sizes without ``size``, or a corrupt image.
    """
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; expected {root}/<class>/<image files>")
    classes = classes or sorted(p.name for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for ci, c in enumerate(classes):
        files = sorted(p for p in (root / c).glob("*") if p.suffix.lower() in IMAGE_EXTS) if (root / c).is_dir() else []
        for f in files:
            images.append(_decode(f, channels, size))
            labels.append(ci)
    if not images:
        raise DataError(f"no images found under {root}/<class>/ (extensions: {sorted(IMAGE_EXTS)})")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataError(f"images under {root} have different sizes {sorted(shapes)[:3]}...; set data.image_size")
    return np.stack(images), np.asarray(labels, np.int64), classes


@DATASETS.register("image_folder")
def load_image_folder(cfg: DatasetConfig) -> TaskData:
    """ImageFolder layout: ``root/train/<class>/*`` and ``root/test/<class>/*`` (how users bring a task)."""
    root = Path(cfg.root).expanduser()
    xtr, ytr, classes = read_image_folder(root / "train", cfg.channels, cfg.image_size)
    xte, yte, _ = read_image_folder(root / "test", cfg.channels, cfg.image_size, classes)
    return TaskData(ImageSet(xtr, ytr), ImageSet(xte, yte), classes)


@DATASETS.register("torchvision")
def load_torchvision(cfg: DatasetConfig) -> TaskData:
    """A torchvision dataset class by name (``MNIST``, ``CIFAR10``, ...), with ``train=True/False`` splits."""
    import torchvision

    cls = getattr(torchvision.datasets, cfg.name or "", None)
    if cls is None:
        raise DataError(f"torchvision.datasets has no dataset {cfg.name!r}; use a class name such as MNIST")
    root = str(Path(cfg.root or "~/.cache/kt/data").expanduser())
    try:
        tr, te = cls(root, train=True, download=cfg.download), cls(root, train=False, download=cfg.download)
    except RuntimeError as e:
        raise DataError(f"torchvision {cfg.name} not found under {root} ({e}); set data.download=true "
                        "when online, or data.root to where it is") from None

    def arrays(ds):
        x = np.asarray(ds.data)  # (N, H, W) or (N, H, W, C) uint8
        return ImageSet(x.astype(np.uint8), np.asarray(ds.targets, np.int64))

    return TaskData(arrays(tr), arrays(te), [str(c) for c in getattr(tr, "classes", range(10))])


def limit(s: ImageSet, n: int | None, seed: int) -> ImageSet:
    """A stratified subset of about ``n`` images of ``s`` (all of it if ``n`` is None or too big)."""
    if n is None or n >= len(s):
        return s
    classes = np.unique(s.labels)
    per = {int(c): max(1, n // len(classes)) for c in classes}
    return s.subset(stratified_pick(s.labels, per, np.random.default_rng(seed)))


def load_task_data(cfg: DatasetConfig, seed: int = 0) -> TaskData:
    """Load a task's train/test splits by ``cfg.format``, then apply ``limit_train``/``limit_test``.

    Raises DataError (missing or corrupt data) or UnknownNameError (unknown format).
    """
    data = DATASETS.get(cfg.format)(cfg)
    return TaskData(limit(data.train, cfg.limit_train, seed), limit(data.test, cfg.limit_test, seed + 1),
                    data.classes)
