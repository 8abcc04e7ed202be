"""`kt predict`: classify image files with a trained student, into a CSV (path, class, probability).

The model is a run or trial directory (its ``student.pt``, on PyTorch: what the pipeline's evaluation
computes), an ``.onnx`` file (onnxruntime) or a ``models:/name/version`` URI (the MLflow model, loaded with
``mlflow.pyfunc.load_model``). Images are read as the model's channels and resized to its input size
(H, W); unreadable files are reported one by one and skipped.
"""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from orchestrator.models.export import DeployError

log = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm", ".pbm"}


@dataclass
class Predictor:
    """A loaded model: ``proba`` maps (N, H, W, C) uint8 to (N, K) float32 probabilities."""

    proba: Callable[[np.ndarray], np.ndarray]
    image_shape: tuple[int, int, int]
    classes: list[str]
    label: str


@dataclass
class PredictResult:
    """``rows``: one ``{"path", "class", "probability"}`` per image read; ``skipped``: (path, reason) per
    unreadable image; ``out``: the CSV written (or None)."""

    rows: list[dict]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    out: Path | None = None


def _from_pyfunc(uri: str, tracking_uri: str) -> Predictor:
    from orchestrator.tracking import load_pyfunc

    model = load_pyfunc(tracking_uri, uri)
    kt = (model.metadata.metadata or {}).get("kt") or {}
    if not kt.get("image_shape"):
        raise DeployError(f"{uri} is not a kt student's MLflow model (no kt metadata); register one with kt register")
    return Predictor(lambda x: np.asarray(model.predict(x), np.float32), tuple(kt["image_shape"]),
                     list(kt["classes"]), uri)


def open_model(model: str | Path, storage: str | Path = "kt_runs", tracking_uri: str | None = None) -> Predictor:
    """Load ``model`` (see module doc). Raises DeployError (no student there, unknown model URI) or
    InputShapeError (an ONNX file that does not take kt's uint8 (N, H, W, C) images)."""
    s = str(model)
    if s.startswith(("models:/", "runs:/")):
        from orchestrator.tracking import default_tracking_uri

        return _from_pyfunc(s, tracking_uri or default_tracking_uri(Path(storage)))
    if s.endswith(".onnx"):
        from orchestrator.models.onnx_student import OnnxStudent

        if not Path(s).is_file():
            raise DeployError(f"no ONNX file {s}; write one with `kt export RUN --format onnx --out {s}`")
        m = OnnxStudent(s)
        return Predictor(m.predict_proba, m.image_shape, m.classes, s)
    from orchestrator.commands.deploy import find_student
    from orchestrator.models.export import load_student
    from orchestrator.models.onnx_student import softmax

    st = load_student(find_student(model, storage=storage).bundle)
    return Predictor(lambda x: softmax(st.logits(x)), st.image_shape, st.classes, str(model))


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files: each file as given, each folder's image files (by extension, recursively, sorted).
    Raises DeployError for a path that does not exist, a folder with no images, or no inputs."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
            if not found:
                raise DeployError(f"folder {p} holds no images ({', '.join(sorted(IMAGE_EXTS))}); pass image files "
                                  "or a folder that has some")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DeployError(f"no such file or folder: {p}")
    if not files:
        raise DeployError("no input images; pass image files or folders: kt predict MODEL IMAGE_OR_FOLDER...")
    return files


def read_image(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """One image file -> (H, W, C) uint8 as ``shape`` (channels converted, resized bilinear). Raises
    DataError for an unreadable or corrupt file."""
    from PIL import Image

    from orchestrator.data.decode import decode_image

    h, w, c = shape
    arr = decode_image(path, c, None)  # (h0, w0, c) uint8
    if arr.shape[:2] != (h, w):
        im = Image.fromarray(arr[..., 0] if c == 1 else arr).resize((w, h), Image.BILINEAR)
        arr = np.asarray(im, np.uint8).reshape(h, w, c)
    return arr


def write_csv(rows: list[dict], path: Path) -> Path:
    """``path,class,probability`` lines, written atomically."""
    from orchestrator.cache import write_atomic

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "class", "probability"])
    for r in rows:
        w.writerow([r["path"], r["class"], f"{r['probability']:.6f}"])
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, buf.getvalue())


def predict(model: str | Path, inputs: Sequence[str | Path], out: str | Path | None = None, batch_size: int = 64,
            storage: str | Path = "kt_runs", tracking_uri: str | None = None, progress: bool = False) -> PredictResult:
    """Classify image files with a student and write the CSV ``out`` (if given).

    Args:
        model: see :func:`open_model`. inputs: image files and folders. progress: a rich progress bar (stderr).
    Returns:
        PredictResult. Unreadable images are skipped, each logged with its reason and listed in ``skipped``.
    Raises:
        DeployError: a bad model or input (see :func:`open_model`, :func:`list_images`), or no image readable.
    """
    from orchestrator.data.errors import DataError

    pred = open_model(model, storage, tracking_uri)
    files = list_images(inputs)
    rows: list[dict] = []
    skipped: list[tuple[str, str]] = []
    batch: list[tuple[Path, np.ndarray]] = []

    def flush() -> None:
        if batch:
            p = pred.proba(np.stack([a for _, a in batch]))  # (b, K) float32
            rows.extend({"path": str(f), "class": pred.classes[int(k)], "probability": float(p[i, k])}
                        for i, (f, k) in enumerate(zip((f for f, _ in batch), p.argmax(1))))
            batch.clear()

    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), disable=not progress, transient=False) as bar:
        task = bar.add_task(f"predicting with {pred.label}", total=len(files))
        for f in files:
            try:
                batch.append((f, read_image(f, pred.image_shape)))
            except DataError as e:
                skipped.append((str(f), str(e)))
                log.debug("skipped %s: %s", f, e)
            if len(batch) >= batch_size:
                flush()
            bar.advance(task)
        flush()
    if not rows:
        raise DeployError(f"none of the {len(files)} input images could be read (first: {skipped[0][1]})")
    if skipped:
        log.warning("%d of %d images were unreadable and skipped (first: %s)", len(skipped), len(files), skipped[0][1])
    path = write_csv(rows, Path(out)) if out else None
    return PredictResult(rows, skipped, path)
