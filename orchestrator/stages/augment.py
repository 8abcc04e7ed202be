"""Batched image augmentations on (B, C, H, W) float32 tensors in [0, 1], applied before a model's Preprocess.

Batched tensor ops (one affine ``grid_sample`` per batch) rather than per-image PIL transforms, so a 2-core
CPU can feed SimCLR and distillation without a data-loader pool.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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


def color_jitter(x: torch.Tensor, brightness: float = 0.4, contrast: float = 0.4,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image brightness and contrast jitter. (B, C, H, W) float32 in [0, 1] -> same, clamped."""
    b = x.shape[0]
    bf = 1 + (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1) * brightness
    cf = 1 + (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1) * contrast
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x * bf - mean) * cf + mean).clamp_(0, 1)


def simclr_view(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One SimCLR view (Chen et al. 2020, Sec. 3): crop-resize + flip, colour jitter, random erasing-free."""
    return color_jitter(random_resized_crop(x, generator=generator), generator=generator)


def to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32 in [0, 1]."""
    return images_u8.permute(0, 3, 1, 2).float().div_(255.0)
