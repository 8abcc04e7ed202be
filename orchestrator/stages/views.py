"""Cached soft labels of augmented views (FKD: Shen & Xing, "A Fast Knowledge Distillation Framework for Visual
Recognition", ECCV 2022, arXiv 2112.01528; function matching: Beyer et al., "Knowledge distillation: A good
teacher is patient and consistent", CVPR 2022, arXiv 2106.05237).

For each transfer image, K views are drawn once from the task's label-preserving policy (a random-resized-crop
box of area in [``view_min_area``, 1] (default the policy's ``crop_scale``) and aspect in [3/4, 4/3], the
policy's shift, its flip where allowed, its brightness/contrast), seeded; the teacher labels every view once (teacher inference over N x K views) and the
student trains on exactly those views. The transfer set becomes N x K rows: row ``v`` is view ``v mod K`` of
image ``v div K``; its parameters are row ``v`` of ``views.npy`` and its soft label row ``v`` of the cached
logits. One function, :func:`render_views`, makes a view's pixels for the teacher and for the student, so the
student's input is, pixel for pixel, the crop the teacher labelled (at the task's resolution; each model's
preprocessing then resizes and normalises it).

Label compression (FKD, Sec. 3.3): with ``view_topk`` = k, a view's soft label is stored as its k largest
log-probabilities (float16) and their classes; the rest of the probability mass is spread evenly over the other
classes when it is read back (:class:`TopKSoftLabels`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from orchestrator.config import AugmentPolicy
from orchestrator.stages.augment import to_unit

PARAMS = ("sx", "sy", "tx", "ty", "flip", "brightness", "contrast")  # the columns of views.npy


def draw_views(n: int, k: int, policy: AugmentPolicy, min_area: float, seed: int) -> np.ndarray:
    """The parameters of K views of each of ``n`` images, drawn once (seeded by ``seed``).

    Row ``i * k + j`` is view j of image i: side fractions (sx, sy) of the crop box (area in [``min_area``, 1],
    aspect in [3/4, 4/3], each side at most 1), its normalised centre (tx, ty) (inside the image, plus a shift
    of up to ``policy.max_shift`` of the side), a horizontal flip (1.0 with probability 0.5 when
    ``policy.hflip``), brightness and contrast factors (1 +- the policy's).

    Returns:
        (n * k, 7) float32, columns :data:`PARAMS`.
    """
    rng = np.random.default_rng([seed, 31])
    m = n * k
    area = rng.uniform(min_area, 1.0, m)
    log_r = rng.uniform(-math.log(4 / 3), math.log(4 / 3), m) if min_area < 1 else np.zeros(m)
    sx = np.minimum(1.0, np.sqrt(area * np.exp(log_r)))
    sy = np.minimum(1.0, np.sqrt(area / np.exp(log_r)))
    shift = 2 * policy.max_shift  # normalised coordinates span 2
    tx = rng.uniform(-1, 1, m) * (1 - sx) + rng.uniform(-1, 1, m) * shift
    ty = rng.uniform(-1, 1, m) * (1 - sy) + rng.uniform(-1, 1, m) * shift
    flip = (rng.random(m) < 0.5) if policy.hflip else np.zeros(m, bool)
    bf = 1 + rng.uniform(-1, 1, m) * policy.brightness
    cf = 1 + rng.uniform(-1, 1, m) * policy.contrast
    return np.stack([sx, sy, tx, ty, flip, bf, cf], axis=1).astype(np.float32)  # (n * k, 7) float32


def render_views(images, params: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """The pixels of views: each image cropped, shifted and flipped by one affine ``grid_sample`` (bilinear,
    zero padding) at the image's own size, then its brightness/contrast factors applied.

    Args:
        images: (B, H, W, C) uint8 (numpy or torch), the source image of every view.
        params: (B, 7) float32 rows of :func:`draw_views`.
    Returns:
        (B, C, H, W) float32 in [0, 1] on ``device``.
    """
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    x = to_unit(x.to(device))  # (B, C, H, W) float32
    p = torch.as_tensor(np.asarray(params, np.float32), device=x.device)  # (B, 7) float32
    theta = torch.zeros(len(x), 2, 3, device=x.device)  # (B, 2, 3) float32
    theta[:, 0, 0] = p[:, 0] * (1 - 2 * p[:, 4])  # a flip mirrors the sampling grid
    theta[:, 1, 1] = p[:, 1]
    theta[:, 0, 2], theta[:, 1, 2] = p[:, 2], p[:, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    bf, cf = p[:, 5].view(-1, 1, 1, 1), p[:, 6].view(-1, 1, 1, 1)
    if bool((bf != 1).any() or (cf != 1).any()):
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = ((out * bf - mean) * cf + mean).clamp_(0, 1)
    return out


def view_rows(v: np.ndarray, k: int) -> np.ndarray:
    """The image row of each view row: (b,) int64 view rows -> (b,) int64 ``v div k``."""
    return np.asarray(v, np.int64) // max(1, k)


def compress(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FKD's top-k label compression: (M, C) float32 logits -> ((M, k) int32 classes, (M, k) float16
    log-probabilities at temperature 1), largest first."""
    logp = torch.log_softmax(torch.from_numpy(np.asarray(logits, np.float32)), dim=1)  # (M, C) float32
    vals, idx = logp.topk(min(k, logp.shape[1]), dim=1)
    return idx.numpy().astype(np.int32), vals.numpy().astype(np.float16)


def expand(classes: np.ndarray, logp: np.ndarray, num_classes: int) -> np.ndarray:
    """Soft labels back from :func:`compress`: the k stored log-probabilities, and log(residual / (C - k)) for
    every other class (the residual mass 1 - sum of the k probabilities, spread evenly; at least 1e-8 per class).
    (M, k) int, (M, k) float16 -> (M, C) float32 log-probabilities (a KD target: softmax(x / T) of them)."""
    lp = np.asarray(logp, np.float32)
    m, k = lp.shape
    rest = max(1, num_classes - k)
    residual = np.clip(1.0 - np.exp(lp).sum(1), 1e-8 * rest, None) / rest  # (M,) float32
    out = np.repeat(np.log(residual)[:, None], num_classes, axis=1).astype(np.float32)  # (M, C) float32
    np.put_along_axis(out, np.asarray(classes, np.int64), lp, axis=1)
    return out


def open_soft_labels(entry, cfg, num_classes: int):
    """The cached soft labels of a teacher-outputs entry (a directory or storage URI; ``cfg`` the
    :class:`~orchestrator.config.DistillConfig` that made it): ``logits.npy`` rows ((N, K) or, with views,
    (N x k, K) float32), or the top-k compressed rows of ``view_topk`` (:class:`TopKSoftLabels`)."""
    from orchestrator.data.shards import open_array

    if cfg.views and cfg.view_topk is not None:
        return TopKSoftLabels(open_array(entry, "soft_topk_classes.npy"), open_array(entry, "soft_topk_logprob.npy"),
                              num_classes)
    return open_array(entry, "logits.npy")


class TopKSoftLabels:
    """Read-side view of compressed soft labels: ``labels[v]`` -> (b, C) float32 log-probabilities (:func:`expand`)
    for (b,) int64 view rows. ``classes`` and ``logp`` are (M, k) arrays (memmaps or row readers)."""

    def __init__(self, classes, logp, num_classes: int):
        self.classes, self.logp, self.num_classes = classes, logp, int(num_classes)

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, v) -> np.ndarray:
        return expand(np.asarray(self.classes[v]), np.asarray(self.logp[v]), self.num_classes)


def compression_cost(logits: np.ndarray, k: int, temperature: float) -> dict:
    """What top-k compression changes, measured on ``logits`` ((M, C) float32): the mean probability mass the
    k classes keep, the mean KL(full || compressed) of the soft labels at ``temperature`` (nats), and the
    fraction of rows whose top-1 class changes (0 for k >= 1: the largest class is always kept)."""
    full = torch.from_numpy(np.asarray(logits, np.float32))
    cls, lp = compress(logits, k)
    approx = torch.from_numpy(expand(cls, lp, full.shape[1]))
    p = torch.log_softmax(full / temperature, 1)
    q = torch.log_softmax(approx / temperature, 1)
    return {"kept_mass": float(np.exp(lp.astype(np.float32)).sum(1).mean()),
            "kl_at_temperature": float((p.exp() * (p - q)).sum(1).mean()),
            "top1_changed": float((full.argmax(1) != approx.argmax(1)).float().mean())}
