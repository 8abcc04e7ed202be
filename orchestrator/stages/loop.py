"""Shared training/inference loops over in-memory uint8 images (no DataLoader workers: 2-core friendly)."""
from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.config import TrainConfig
from orchestrator.data.images import ImageSet
from orchestrator.models.preprocess import Preprocess
from orchestrator.stages.augment import random_shift_flip, to_unit


def batch_indices(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                  shuffle: bool = True) -> Iterator[np.ndarray]:
    """Yield (b,) int64 index batches of one epoch; rank ``rank`` of ``world`` gets every world-th batch.

    Every rank gets the same number of batches (the permutation is padded by wrap-around), so DDP ranks stay
    in step. The order depends only on (seed, epoch), so a resumed run sees the same batches.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    steps = max(1, math.ceil(n / (batch_size * world)))
    order = np.resize(order, steps * batch_size * world)  # wrap-around pad
    for s in range(steps):
        start = (s * world + rank) * batch_size
        yield order[start:start + batch_size]


def model_input(images: np.ndarray, idx: np.ndarray, preprocess: Preprocess, augment: bool,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images[idx] -> (b, C, H, W) float32 model input, optionally shift/flip-augmented."""
    x = to_unit(torch.from_numpy(np.ascontiguousarray(images[idx]))).to(device)  # (b, C, H, W) float32
    if augment:
        x = random_shift_flip(x)
    return preprocess.from_unit(x)


def cosine_schedule(opt: torch.optim.Optimizer, total_steps: int, warmup: int = 0):
    """Linear warm-up then cosine decay to 0 over ``total_steps`` optimizer steps."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def train_supervised(model: nn.Module, preprocess: Preprocess, data: ImageSet, cfg: TrainConfig, seed: int = 0,
                     device: str = "cpu", params: list | None = None,
                     on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Cross-entropy training of ``model`` on labeled images (student finetune, supervised-only baseline,
    teacher full finetune). AdamW, cosine schedule.

    Args:
        model: (B, C, H, W) float32 -> (B, K) logits. data: labeled ImageSet. params: parameters to train
        (default all). on_epoch: called with (epoch, mean loss).
    Returns:
        Mean training loss per epoch (list of float).
    """
    if cfg.epochs == 0:
        return []
    torch.manual_seed(seed)
    model.to(device).train()
    if cfg.freeze_bn:  # normalise with the running statistics; only the affine weights learn
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    opt = torch.optim.AdamW(params or model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(data) / cfg.batch_size)
    sched = cosine_schedule(opt, steps, warmup=min(50, steps // 10))
    labels = torch.from_numpy(data.labels)
    history = []
    for epoch in range(cfg.epochs):
        losses = []
        for idx in batch_indices(len(data), min(cfg.batch_size, len(data)), seed, epoch):
            x = model_input(data.images, idx, preprocess, cfg.augment, device)
            loss = F.cross_entropy(model(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        history.append(float(np.mean(losses)))
        if on_epoch:
            on_epoch(epoch, history[-1])
    return history


@torch.inference_mode()
def predict(fn: Callable[[torch.Tensor], torch.Tensor], preprocess: Preprocess, images: np.ndarray,
            batch_size: int = 512, device: str = "cpu") -> np.ndarray:
    """Apply ``fn`` (a model in eval mode, or its feature extractor) to all images.

    images: (N, H, W, C) uint8. Returns (N, D) float32 (logits or features).
    """
    outs = []
    for s in range(0, len(images), batch_size):
        x = preprocess(images[s:s + batch_size]).to(device)  # (b, C, H, W) float32
        outs.append(fn(x).float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
