"""Deployable students: the student bundle, ONNX (verified on real images), TorchScript, a state dict, and the
parts of the student's MLflow model.

- **Bundle** (``student.pt``, format ``kt-student/1``): one self-describing file holding the state dict, the
  student id and model kwargs, K and the class names, the preprocessing, the (H, W, C) uint8 images it takes,
  a few real test images (to verify exports, and the MLflow input example) and its lineage (teacher, cache
  keys, method, accuracy, FLOPs). :func:`load_student` rebuilds the nn.Module with timm alone (a ``pypi/``
  student needs no weight package to load). Written atomically: a run or trial either holds it whole or not.
- **ONNX** (``student.onnx``): the student with its preprocessing folded into the graph. Input ``images``:
  (N, H, W, C) uint8 at the task's native size and channels (N dynamic); the graph converts channels, resizes
  to the student's input size (bilinear, antialiased), scales to [0, 1] and normalises. Output ``logits``:
  (N, K) float32. Class names, preprocessing and lineage are in its ``metadata_props``. Each export is run
  with onnxruntime on real images and compared with PyTorch (max |logit difference| <= 1e-4, same top-1).
- **MLflow model**: a pyfunc whose data is the ONNX graph and whose code is the standalone
  :mod:`orchestrator.models.onnx_student` (numpy + onnxruntime): uint8 (N, H, W, C) -> (N, K) probabilities.
  This module prepares it (:func:`pyfunc_parts`); :mod:`orchestrator.tracking` logs and registers it.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from orchestrator.ids import parse_model_id
from orchestrator.models.onnx_student import META_FILE, ONNX_FILE, ONNX_FORMAT, OnnxStudent
from orchestrator.models.preprocess import Preprocess

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "kt-student/1"
BUNDLE_FILE = "student.pt"
FORMATS = {"onnx": "student.onnx", "torchscript": "student.torchscript.pt", "state_dict": "student_state_dict.pt"}
PYFUNC_MODULE = "kt_onnx_student"  # the name onnx_student.py is copied under into the MLflow model


class DeployError(ValueError):
    """A student that cannot be found, loaded, exported or registered; the message says what to do."""


class OnnxParityError(DeployError):
    """The ONNX graph's outputs on real images differ from PyTorch's beyond the tolerance, or its top-1 does."""


class ImageClassifier(nn.Module):
    """A student with its preprocessing folded in: (N, H, W, C) uint8 images -> (N, K) float32 logits.

    Computes exactly what the pipeline's evaluation does (``model(preprocess(images))``)."""

    def __init__(self, model: nn.Module, preprocess: Preprocess):
        super().__init__()
        self.model, self.preprocess = model, preprocess

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255.0  # (N, C, H, W) float32 in [0, 1]
        return self.model(self.preprocess.from_unit(x))  # (N, K) float32


@dataclass
class Student:
    """A loaded student bundle.

    Attributes:
        model: eval-mode nn.Module, (B, channels, h, w) float32 normalised -> (B, K) float32 logits.
        preprocess: its input (channels, size, mean, std). classes: the K class names.
        image_shape: (H, W, C) of the uint8 images it takes (the task's). examples: (M, H, W, C) uint8 real
            test images. lineage: str/float values (teacher, cache keys, method, top-1, FLOPs, ...).
    """

    model: nn.Module
    preprocess: Preprocess
    classes: list[str]
    model_id: str
    model_kwargs: dict
    image_shape: tuple[int, int, int]
    examples: np.ndarray
    lineage: dict = field(default_factory=dict)
    path: Path | None = None

    def classifier(self) -> ImageClassifier:
        return ImageClassifier(self.model, self.preprocess).eval()

    @torch.inference_mode()
    def logits(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(N, H, W, C) uint8 -> (N, K) float32 logits (CPU, as the pipeline's evaluation computes them)."""
        from orchestrator.models.onnx_student import InputShapeError

        x = np.asarray(images)
        x = x[..., None] if x.ndim == 3 and self.image_shape[2] == 1 else x
        if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            h, w, c = self.image_shape
            raise InputShapeError(f"the student takes uint8 images of shape (N, {h}, {w}, {c}); got {x.dtype} "
                                  f"{tuple(x.shape)}")
        clf = self.classifier()
        outs = [clf(torch.from_numpy(np.ascontiguousarray(x[s:s + batch_size]))).numpy()
                for s in range(0, len(x), batch_size)]
        return np.concatenate(outs) if outs else np.zeros((0, len(self.classes)), np.float32)


def _write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` through a temporary sibling and a rename (readers never see a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def example_images(images: np.ndarray, max_images: int = 64, max_bytes: int = 2_000_000) -> np.ndarray:
    """The first real images to keep in a bundle: (M, H, W, C) uint8, M <= max_images, at most ~max_bytes."""
    per = int(np.prod(images.shape[1:])) or 1
    return np.ascontiguousarray(images[:max(1, min(max_images, max_bytes // per))])


def build_student_module(model_id: str, model_kwargs: dict | None, num_classes: int, channels: int) -> nn.Module:
    """The student's architecture, randomly initialised (weights come from a bundle): ``timm/<arch>`` or the
    timm architecture of ``pypi/<weights>``. Raises DeployError for an id timm cannot build."""
    import timm

    mid = parse_model_id(model_id)
    kwargs = {k: v for k, v in (model_kwargs or {}).items() if k != "input_size"}
    if mid.namespace == "pypi":
        from orchestrator.models.pretrained import WEIGHT_PACKAGES

        arch = WEIGHT_PACKAGES.get(mid.name).timm_arch
    elif mid.namespace == "timm" and timm.is_model(mid.name):
        arch = mid.name
    else:
        raise DeployError(f"student {model_id!r} is not a timm/<arch> or pypi/<weights> student")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=channels, **kwargs)


def save_student(path: str | Path, model: nn.Module, preprocess: Preprocess, *, model_id: str,
                 model_kwargs: dict | None, classes: list[str], examples: np.ndarray,
                 lineage: dict | None = None) -> Path:
    """Write a student bundle (``kt-student/1``) atomically.

    Args:
        model: (B, channels, h, w) float32 -> (B, K) logits. examples: (M, H, W, C) uint8 real images of the
            task (their (H, W, C) is what the deployed student takes). lineage: str/number values.
    Returns:
        ``path``.
    """
    examples = np.asarray(examples)
    if examples.ndim != 4 or examples.dtype != np.uint8 or not len(examples):
        raise ValueError(f"examples must be (M, H, W, C) uint8 with M > 0, got {examples.dtype} {examples.shape}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob = {"format": BUNDLE_FORMAT, "model_id": model_id, "model_kwargs": dict(model_kwargs or {}),
            "num_classes": len(classes), "classes": list(classes), "preprocess": preprocess.to_dict(),
            "image_shape": list(examples.shape[1:]), "examples": torch.from_numpy(examples.copy()),
            "lineage": dict(lineage or {}), "state_dict": state}
    return _write_bytes(Path(path), _torch_bytes(blob))


def load_student(path: str | Path) -> Student:
    """Rebuild the student of a bundle. Raises DeployError for a missing, unreadable or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise DeployError(f"no student bundle at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise DeployError(f"student bundle {path} is unreadable ({e}); export the student again") from None
    if not isinstance(blob, dict) or blob.get("format") != BUNDLE_FORMAT:
        raise DeployError(f"{path} is not a {BUNDLE_FORMAT} student bundle (kt run and sweep trials write one)")
    pre = Preprocess.from_dict(blob["preprocess"])
    model = build_student_module(blob["model_id"], blob["model_kwargs"], blob["num_classes"], pre.channels)
    model.load_state_dict(blob["state_dict"])
    return Student(model.eval(), pre, list(blob["classes"]), blob["model_id"], dict(blob["model_kwargs"]),
                   tuple(int(v) for v in blob["image_shape"]), blob["examples"].numpy(), dict(blob["lineage"]),
                   path)


def _onnx_program(clf: ImageClassifier, example: torch.Tensor):
    """torch's dynamo exporter, falling back to the TorchScript-based one; returns an onnx ModelProto."""
    import onnx

    errors = []
    quiet = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [q.level for q in quiet]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore")
        for q, lv in zip(quiet, levels):  # the exporter's INFO lines per optimisation pass
            q.setLevel(logging.WARNING)
            stack.callback(q.setLevel, lv)
        try:
            prog = torch.onnx.export(clf, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                     dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
                                     external_data=False, verbose=False)
            return prog.model_proto
        except Exception as e:  # noqa: BLE001 - try the other exporter, then report both
            errors.append(f"dynamo exporter: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
        try:
            buf = io.BytesIO()
            torch.onnx.export(clf, (example,), buf, dynamo=False, input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=18)
            return onnx.load_from_string(buf.getvalue())
        except Exception as e:  # noqa: BLE001
            errors.append(f"TorchScript exporter: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
    raise DeployError("the student does not export to ONNX (" + "; ".join(errors) + "); export it with "
                      "--format torchscript or --format state_dict instead")


def export_onnx(student: Student, path: str | Path, check_images: np.ndarray | None = None,
                atol: float = 1e-4) -> Path:
    """Export ``student`` to ONNX (preprocessing folded in, dynamic batch, metadata) and verify it.

    Args:
        check_images: (N, H, W, C) uint8 real images to verify on (default: the bundle's examples).
        atol: the largest |ONNX logit - PyTorch logit| allowed.
    Returns:
        ``path`` (written atomically, only once verified).
    Raises:
        DeployError: neither exporter handles the architecture. OnnxParityError: verification failed.
    """
    path = Path(path)
    clf = student.classifier()
    example = torch.from_numpy(np.ascontiguousarray(student.examples[:2]))  # (2, H, W, C) uint8
    proto = _onnx_program(clf, example)
    meta = {"kt.format": ONNX_FORMAT, "kt.classes": json.dumps(student.classes), "kt.model_id": student.model_id,
            "kt.model_kwargs": json.dumps(student.model_kwargs),
            "kt.preprocess": json.dumps(student.preprocess.to_dict()),
            "kt.input": "images: (N, H, W, C) uint8 0..255; resize, channels and normalisation are in the graph",
            "kt.output": "logits: (N, K) float32; softmax gives class probabilities",
            "kt.lineage": json.dumps(student.lineage, default=str)}
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    tmp = path.with_name(f".{path.name}.unverified-{uuid.uuid4().hex[:8]}")
    _write_bytes(tmp, proto.SerializeToString())
    try:
        check = verify_onnx(tmp, student, student.examples if check_images is None else check_images, atol)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %s, verified with onnxruntime on %d real images: max |logit difference| %.2e, same top-1",
             path, check["images"], check["max_abs_diff"])
    return path


def verify_onnx(path: str | Path, student: Student, images: np.ndarray, atol: float = 1e-4) -> dict:
    """Run the ONNX graph with onnxruntime and the student with PyTorch on ``images`` ((N, H, W, C) uint8).

    Returns ``{"images": N, "max_abs_diff": float}``. Raises OnnxParityError when the max |logit difference|
    exceeds ``atol`` or any top-1 differs."""
    ref = student.logits(images)  # (N, K) float32
    got = OnnxStudent(path).logits(images)
    diff = float(np.abs(got - ref).max()) if len(ref) else 0.0
    flips = int((got.argmax(1) != ref.argmax(1)).sum())
    if diff > atol or flips:
        raise OnnxParityError(f"ONNX export of {student.model_id} does not match PyTorch on {len(ref)} real images: "
                              f"max |logit difference| {diff:.2e} (allowed {atol:.0e}), {flips} different top-1; "
                              "export it with --format torchscript instead, or report the architecture")
    return {"images": len(ref), "max_abs_diff": diff}


def export_torchscript(student: Student, path: str | Path) -> Path:
    """A traced TorchScript module with the preprocessing folded in: (N, H, W, C) uint8 -> (N, K) logits."""
    example = torch.from_numpy(np.ascontiguousarray(student.examples[:2]))  # (2, H, W, C) uint8
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated in torch 2.15 but still loads
        ts = torch.jit.trace(student.classifier(), example, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(ts, buf)
    return _write_bytes(Path(path), buf.getvalue())


def export_state_dict(student: Student, path: str | Path) -> Path:
    """``{"state_dict", "model_id", "model_kwargs", "preprocess", "classes"}``: the weights alone, for code that
    builds the model itself (input (B, channels, h, w) float32 normalised as ``preprocess``)."""
    return _write_bytes(Path(path), _torch_bytes({
        "state_dict": student.model.state_dict(), "model_id": student.model_id, "model_kwargs": student.model_kwargs,
        "preprocess": student.preprocess.to_dict(), "classes": student.classes}))


def export(student: Student, fmt: str, out: str | Path) -> Path:
    """Export ``student`` as ``fmt`` (``onnx``, ``torchscript`` or ``state_dict``) to ``out``."""
    fns = {"onnx": export_onnx, "torchscript": export_torchscript, "state_dict": export_state_dict}
    if fmt not in fns:
        raise DeployError(f"unknown export format {fmt!r}; use one of: {', '.join(fns)}")
    return fns[fmt](student, out)


def pyfunc_parts(student: Student, onnx_path: str | Path, workdir: str | Path) -> dict:
    """What :func:`orchestrator.tracking.log_pyfunc_model` logs: ``data_path`` (a directory with the ONNX
    graph and ``student.json``), ``code_paths`` (the standalone loader, as ``kt_onnx_student.py``),
    ``loader_module``, ``image_shape`` (H, W, C), ``num_classes``, ``example`` ((2, H, W, C) uint8 real
    images), ``metadata`` and ``pip_requirements`` (numpy, onnxruntime at their installed versions)."""
    from importlib.metadata import version

    from orchestrator.models import onnx_student

    work = Path(workdir)
    data, code = work / "student", work / "code"
    data.mkdir(parents=True, exist_ok=True)
    code.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, data / ONNX_FILE)
    info = {"classes": student.classes, "image_shape": list(student.image_shape), "model_id": student.model_id,
            "model_kwargs": student.model_kwargs, "preprocess": student.preprocess.to_dict(),
            "lineage": student.lineage, "input": "uint8 images (N, H, W, C)", "output": "probabilities (N, K)"}
    (data / META_FILE).write_text(json.dumps(info, indent=1, default=str))
    shutil.copyfile(onnx_student.__file__, code / f"{PYFUNC_MODULE}.py")
    return {"data_path": str(data), "code_paths": [str(code / f"{PYFUNC_MODULE}.py")], "loader_module": PYFUNC_MODULE,
            "image_shape": student.image_shape, "num_classes": len(student.classes),
            "example": np.ascontiguousarray(student.examples[:2]),
            "metadata": {"kt": json.loads(json.dumps(info, default=str))},
            "pip_requirements": [f"numpy=={version('numpy')}", f"onnxruntime=={version('onnxruntime')}"]}


def export_deployable(model: nn.Module, preprocess: Preprocess, out_dir: str | Path, *, model_id: str,
                      model_kwargs: dict | None, classes: list[str], test_images: np.ndarray,
                      lineage: dict | None = None) -> tuple[list[Path], Callable[[Path], dict] | None]:
    """A run's student: the bundle, then the ONNX graph verified on ``test_images`` ((N, H, W, C) uint8, real).

    Returns (written files, ``parts(workdir)`` = :func:`pyfunc_parts` of the student, or None). An architecture
    that does not export to ONNX, or not faithfully, is logged as a warning: the bundle is kept and the run goes
    on (no ONNX, no MLflow model)."""
    out = Path(out_dir)
    bundle = save_student(out / BUNDLE_FILE, model.cpu().eval(), preprocess, model_id=model_id,
                          model_kwargs=model_kwargs, classes=classes, examples=example_images(test_images),
                          lineage=lineage)
    student = load_student(bundle)
    try:
        onnx_path = export_onnx(student, out / FORMATS["onnx"], check_images=test_images[:512])
    except DeployError as e:
        log.warning("student kept as %s, without ONNX or MLflow model: %s", bundle, e)
        return [bundle], None
    return [bundle, onnx_path], functools.partial(pyfunc_parts, student, onnx_path)
