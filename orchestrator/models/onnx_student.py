"""Run an exported student's ONNX graph with onnxruntime: class probabilities for uint8 images.

Standalone on purpose (imports only numpy and onnxruntime, nothing of ``orchestrator``): the MLflow model of a
student carries this file as its code (copied as ``kt_onnx_student.py``) with the ONNX graph as its data, so
the model loads and serves wherever numpy and onnxruntime are installed, without torch or this package.

The graph (written by :func:`orchestrator.models.export.export_onnx`) takes ``images``: (N, H, W, C) uint8,
0..255, at the task's native size and channels, N dynamic; resizing, channel conversion and normalisation are
folded into it. It returns ``logits``: (N, K) float32. Its ``metadata_props`` hold ``kt.format``
(``kt-student-onnx/1``), ``kt.classes`` (JSON list of K names), ``kt.preprocess`` (the folded preprocessing,
JSON), ``kt.model_id`` and ``kt.lineage`` (JSON).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ONNX_FORMAT = "kt-student-onnx/1"
ONNX_FILE, META_FILE = "student.onnx", "student.json"


class InputShapeError(ValueError):
    """Images that do not fit the model's input, or an ONNX graph that does not take kt's uint8 images; the
    message names the expected and the given shapes and the fix."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """(N, K) float32 logits -> (N, K) float32 probabilities (rows sum to 1)."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


class OnnxStudent:
    """An exported student on onnxruntime (CPU).

    Attributes:
        image_shape: (H, W, C) the graph takes. classes: the K class names. meta: the graph's metadata_props.
    Raises (constructor):
        InputShapeError: the file is not a kt student graph (its input is not (N, H, W, C) uint8).
        FileNotFoundError: no such file.
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX file {self.path}; export one with `kt export RUN --format onnx`")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.meta = dict(self.session.get_modelmeta().custom_metadata_map)
        shape = list(inp.shape)
        if (inp.type != "tensor(uint8)" or len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:])
                or shape[3] not in (1, 3)):
            raise InputShapeError(
                f"{self.path} takes {inp.type} {tuple(shape)} input, not the uint8 (N, H, W, C) images of a kt "
                "student; predict with an ONNX file that `kt export RUN --format onnx` (or `kt run`) wrote, or "
                "pass the run or trial directory instead")
        self.image_shape = (int(shape[1]), int(shape[2]), int(shape[3]))
        k = int(self.session.get_outputs()[0].shape[-1])
        self.classes = json.loads(self.meta.get("kt.classes", "null")) or [str(i) for i in range(k)]

    def check(self, images: np.ndarray) -> np.ndarray:
        """``images`` as (N, H, W, C) uint8 for this graph ((N, H, W) gets C = 1). Raises InputShapeError."""
        x = np.asarray(images)
        if x.ndim == 3 and self.image_shape[2] == 1:
            x = x[..., None]
        if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            h, w, c = self.image_shape
            raise InputShapeError(
                f"the model takes uint8 images of shape (N, {h}, {w}, {c}); got {x.dtype} {tuple(x.shape)}. "
                f"Resize to {h}x{w} with {c} channel(s) (kt predict does it for image files)")
        return np.ascontiguousarray(x)

    def logits(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(N, H, W, C) uint8 -> (N, K) float32 logits, in batches."""
        x = self.check(images)
        outs = [self.session.run(None, {self.input_name: x[s:s + batch_size]})[0] for s in
                range(0, len(x), batch_size)]
        return np.concatenate(outs).astype(np.float32) if outs else np.zeros((0, len(self.classes)), np.float32)

    def predict_proba(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(N, H, W, C) uint8 -> (N, K) float32 class probabilities."""
        return softmax(self.logits(images, batch_size))


class PyfuncStudent:
    """The MLflow pyfunc model: ``predict`` maps uint8 images (N, H, W[, C]) to (N, K) float32 probabilities
    (the order of ``classes``, which the model's metadata also holds)."""

    def __init__(self, data_path: str | Path):
        d = Path(data_path)
        self.student = OnnxStudent(d / ONNX_FILE)
        self.info = json.loads((d / META_FILE).read_text()) if (d / META_FILE).is_file() else {}

    def predict(self, model_input, params: dict | None = None) -> np.ndarray:
        if isinstance(model_input, dict):  # {"images": array} (a named tensor input)
            model_input = next(iter(model_input.values()))
        return self.student.predict_proba(np.asarray(model_input))


def _load_pyfunc(data_path: str) -> PyfuncStudent:
    """MLflow's ``loader_module`` entry point: ``data_path`` is the model's data directory
    (``student.onnx`` + ``student.json``)."""
    return PyfuncStudent(data_path)
