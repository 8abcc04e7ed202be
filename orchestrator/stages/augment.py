"""Batched image augmentations on (B, C, H, W) float32 tensors in [0, 1], applied before a model's Preprocess.

Batched tensor ops (one affine ``grid_sample`` per batch) rather than per-image PIL transforms, so a 2-core
CPU can feed SimCLR and distillation without a data-loader pool.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from orchestrator.config import AugmentPolicy


def _affine(x: torch.Tensor, scale: torch.Tensor, aspect: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor,
            flip: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    sx, sy = scale * aspect.sqrt(), scale / aspect.sqrt()
    theta = torch.zeros(b, 2, 3, device=x.device)  # (B, 2, 3) float32
    theta[:, 0, 0] = sx * torch.where(flip, -1.0, 1.0)
    theta[:, 1, 1] = sy
    theta[:, 0, 2], theta[:, 1, 2] = tx, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_resized_crop(x: torch.Tensor, area: tuple[float, float] = (0.25, 1.0), log_ratio: float = math.log(4 / 3),
                        flip_p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random crop of ``area`` fraction, aspect in [3/4, 4/3], resized back, plus horizontal flip.

    (B, C, H, W) float32 -> (B, C, H, W) float32.
    """
    b = x.shape[0]
    u = lambda: torch.rand(b, generator=generator)  # noqa: E731
    a = area[0] + (area[1] - area[0]) * u()
    aspect = torch.exp((2 * u() - 1) * log_ratio)
    scale = a.sqrt()
    sx, sy = (scale * aspect.sqrt()).clamp(max=1), (scale / aspect.sqrt()).clamp(max=1)
    tx, ty = (2 * u() - 1) * (1 - sx), (2 * u() - 1) * (1 - sy)
    return _affine(x, scale, aspect, tx, ty, u() < flip_p)


def random_shift_flip(x: torch.Tensor, max_shift: float = 0.125, flip_p: float = 0.5,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Label-preserving augmentation: translate by up to ``max_shift`` of the size, flip horizontally.

    (B, C, H, W) float32 -> (B, C, H, W) float32.
    """
    b = x.shape[0]
    u = lambda: torch.rand(b, generator=generator)  # noqa: E731
    one = torch.ones(b)
    return _affine(x, one, one, (2 * u() - 1) * 2 * max_shift, (2 * u() - 1) * 2 * max_shift, u() < flip_p)


def augment_batch(x: torch.Tensor, policy: "AugmentPolicy", generator: torch.Generator | None = None) -> torch.Tensor:
    """Augment a batch as a task's :class:`orchestrator.config.AugmentPolicy` says, independently per image: a
    random crop of ``crop_scale`` area (square, resized back), a translation of up to ``max_shift`` of the side,
    a horizontal flip with probability 0.5 only when ``policy.hflip`` is true (an unresolved ``None`` does not
    flip), then brightness/contrast jitter. One affine ``grid_sample`` for the geometry (zero padding).

    Args:
        x: (B, C, H, W) float32 in [0, 1].
        policy: the task's policy, ideally resolved (:meth:`AugmentPolicy.resolved`).
        generator: optional torch RNG (default: the global one).
    Returns:
        (B, C, H, W) float32 in [0, 1].
    """
    b = x.shape[0]
    u = lambda: torch.rand(b, generator=generator)  # noqa: E731
    lo, hi = policy.crop_scale
    scale = (lo + (hi - lo) * u()).sqrt() if (lo, hi) != (1.0, 1.0) else torch.ones(b)  # side fraction
    room = 1 - scale  # a crop moves within the image: normalised offset in [-(1 - s), 1 - s]
    tx = (2 * u() - 1) * room + (2 * u() - 1) * 2 * policy.max_shift
    ty = (2 * u() - 1) * room + (2 * u() - 1) * 2 * policy.max_shift
    flip = (u() < 0.5) if policy.hflip else torch.zeros(b, dtype=torch.bool)
    out = _affine(x, scale, torch.ones(b), tx, ty, flip)
    if policy.brightness or policy.contrast:
        out = color_jitter(out, policy.brightness, policy.contrast, generator)
    return out


def color_jitter(x: torch.Tensor, brightness: float = 0.4, contrast: float = 0.4,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image brightness and contrast jitter. (B, C, H, W) float32 in [0, 1] -> same, clamped."""
    b = x.shape[0]
    bf = 1 + (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1) * brightness
    cf = 1 + (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1) * contrast
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x * bf - mean) * cf + mean).clamp_(0, 1)


def simclr_view(x: torch.Tensor, generator: torch.Generator | None = None, hflip: bool = True) -> torch.Tensor:
    """One SimCLR view (Chen et al. 2020, Sec. 3): crop-resize + flip (only when ``hflip``: pass the task's
    ``AugmentPolicy.hflip``, so digits are not made flip-invariant), colour jitter, random erasing-free."""
    return color_jitter(random_resized_crop(x, flip_p=0.5 if hflip else 0.0, generator=generator),
                        generator=generator)


def to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32 in [0, 1]."""
    return images_u8.permute(0, 3, 1, 2).float().div_(255.0)
