"""Per-model preprocessing (as timm's pretrained_cfg): channels, input size, mean and std."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Preprocess:
    """What a model expects as input.

    Attributes:
        channels: 1 (grayscale) or 3 (RGB).
        size: (H, W) input size in pixels.
        mean, std: per-channel normalisation on the [0, 1] scale (length ``channels``).
    """

    channels: int
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(int(d["channels"]), tuple(d["size"]), tuple(d["mean"]), tuple(d["std"]))

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Convert a batch of uint8 images to this model's input.

        Args:
            images: (B, H, W, C) uint8 with C in {1, 3}, numpy or torch (any size, any channels).
        Returns:
            (B, channels, *size) float32, normalised.
        """
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))  # (B, H, W, C) uint8
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, C, H, W) float32 in [0, 1]
        return self.from_unit(x)

    def from_unit(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float32 in [0, 1] -> (B, channels, *size) float32 normalised."""
        if x.shape[1] != self.channels:
            if self.channels == 3:  # grayscale -> RGB
                x = x.expand(-1, 3, -1, -1)
            else:  # RGB -> luma (ITU-R BT.601)
                w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
                x = (x * w).sum(1, keepdim=True)
        if tuple(x.shape[-2:]) != tuple(self.size):
            x = F.interpolate(x, size=tuple(self.size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std
