"""Compute accounting per stage: FLOPs per image (torch FlopCounterMode), images processed, device-seconds,
CPU seconds and peak memory."""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn


def forward_flops(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Forward FLOPs for ONE image of shape (C, H, W), counted by torch.utils.flop_counter.FlopCounterMode
    (a multiply-add counts as 2 FLOPs). Runs in eval mode on a batch of 2 and halves the count."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    p = next(model.parameters())
    x = torch.zeros(2, *input_shape, device=p.device, dtype=p.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    model.train(was_training)
    return int(fc.get_total_flops() // 2)


def train_flops(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Forward + backward FLOPs for ONE training image of shape (C, H, W) (FlopCounterMode, batch of 2).

    Counted on a copy: a training-mode forward pass updates BatchNorm running statistics, and one on a batch
    of zeros after training would pull a trained model's statistics 10% of the way towards those of blank
    images (momentum 0.1), which cost the demo's finetuned student 5.6 points of top-1 before this was fixed."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(model).train()
    p = next(probe.parameters())
    x = torch.zeros(2, *input_shape, device=p.device, dtype=p.dtype)
    with FlopCounterMode(display=False) as fc:
        probe(x).sum().backward()
    return int(fc.get_total_flops() // 2)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, in bytes."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


@dataclass
class StageCompute:
    """Compute of one stage.

    Attributes:
        images: images processed (forward passes, or training samples x epochs).
        flops: total FLOPs (images x FLOPs per image).
        wall_seconds: elapsed seconds. device_seconds: wall seconds x devices (workers/GPUs) in use.
        cpu_seconds: CPU time of this process (user + system), seconds.
        peak_memory_bytes: peak RSS of this process (CPU) or peak CUDA allocation (GPU), bytes.
    """

    images: int = 0
    flops: float = 0.0
    wall_seconds: float = 0.0
    device_seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_memory_bytes: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StageCompute":
        return cls(**d)

    def metrics(self, prefix: str) -> dict[str, float]:
        d = asdict(self)
        extra = d.pop("extra")
        out = {f"{prefix}{k}": float(v) for k, v in d.items()}
        out.update({f"{prefix}{k}": float(v) for k, v in extra.items()})
        return out


class Meter:
    """Context manager measuring a stage: ``with Meter(devices=2) as m: ...; m.result.images = N``."""

    def __init__(self, devices: int = 1):
        self.devices = devices
        self.result = StageCompute()

    def __enter__(self) -> "Meter":
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        r = self.result
        r.wall_seconds = time.perf_counter() - self._t0
        r.device_seconds = r.device_seconds or r.wall_seconds * self.devices  # a stage may measure its own
        r.cpu_seconds = time.process_time() - self._c0
        r.peak_memory_bytes = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                               else peak_rss_bytes())
