"""The GPU path: mixed precision (autocast), channels-last memory format and pinned-memory host-to-device copies
on CUDA, and exactly nothing on the CPU (every helper is the identity there, so the CPU path stays bit-exact).

- **Autocast**: bf16 where the GPU supports it (Ampere and later: no loss scaling needed), for teacher
  inference and for training. A GPU without bf16 runs inference in float16 and trains in float32 (float16
  training would need a GradScaler; the students here are small enough that float32 is not the bottleneck).
- **Channels-last**: 4-D activations and convolution weights in NHWC, the layout cuDNN's tensor-core kernels
  want (``model.to(memory_format=torch.channels_last)``).
- **Pinned memory**: a batch built on the host is page-locked and copied with ``non_blocking=True``, so the copy
  overlaps the previous step's kernels.

``KT_AMP=0`` in the environment turns autocast off (float32 on the GPU too), e.g. to rule it out when comparing
results across devices. Reference: PyTorch's AMP and channels-last recipes (pytorch.org/docs/stable/amp.html,
pytorch.org/tutorials/intermediate/memory_format_tutorial.html).
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from torch import nn


def is_cuda(device: torch.device | str | None) -> bool:
    """Whether ``device`` ("cuda", "cuda:1", a torch.device, None = "cpu") is a CUDA device."""
    return device is not None and torch.device(device).type == "cuda"


def amp_dtype(device: torch.device | str | None, training: bool = False) -> torch.dtype | None:
    """The autocast dtype for ``device``: None on the CPU (float32, exact) or with ``KT_AMP=0``; on CUDA
    torch.bfloat16 when supported, else torch.float16 for inference and None (float32) for training."""
    if not is_cuda(device) or os.environ.get("KT_AMP", "1") == "0":
        return None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None if training else torch.float16


def autocast(device: torch.device | str | None, training: bool = False):
    """A context manager: ``torch.autocast("cuda", amp_dtype(...))`` on CUDA, a no-op otherwise. Outputs made
    under it may be bf16/fp16: callers that keep them call ``.float()``."""
    dtype = amp_dtype(device, training)
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else nullcontext()


def to_device(x: torch.Tensor, device: torch.device | str | None, channels_last: bool = True) -> torch.Tensor:
    """Move a host tensor to ``device``. On CUDA: pinned, non-blocking, and (``channels_last``) a (B, C, H, W)
    batch in channels-last; on the CPU: ``x`` itself (no copy). Pass ``channels_last=False`` for a 4-D tensor
    that is not NCHW (e.g. (B, H, W, C) uint8 images, already NHWC in memory)."""
    if not is_cuda(device):
        return x if device is None or x.device == torch.device(device) else x.to(device)
    if x.device.type == "cpu":
        x = x.pin_memory().to(device, non_blocking=True)
    else:
        x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def prepare_model(model: nn.Module, device: torch.device | str | None) -> nn.Module:
    """``model`` on ``device``; on CUDA also in channels-last (convolution weights NHWC). Returns the model."""
    model = model.to(device) if device is not None else model
    return model.to(memory_format=torch.channels_last) if is_cuda(device) else model


__all__ = ["is_cuda", "amp_dtype", "autocast", "to_device", "prepare_model"]
