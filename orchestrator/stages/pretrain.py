"""The local stand-in for a VFM (no VFM weights can be downloaded here).

It is a larger timm model trained by SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning",
NT-Xent loss Eq. 1, via lightly) on the task's *unlabeled* images only: no target label is used to build it.
The pipeline then adapts it (linear probe / finetune) exactly as it would adapt CLIP or DINOv2.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Callable

import numpy as np
import torch

from orchestrator.config import StandinConfig
from orchestrator.models.preprocess import Preprocess
from orchestrator.models.teachers import Teacher, load_teacher
from orchestrator.stages.augment import simclr_view, to_unit
from orchestrator.stages.loop import batch_indices, cosine_schedule

log = logging.getLogger(__name__)


def standin_provenance(cfg: StandinConfig, num_images: int) -> str:
    """One line saying what the stand-in is and how it was built (for logs, README and MLflow)."""
    return (f"LOCAL STAND-IN TEACHER (not a VFM): {cfg.arch} {cfg.model_kwargs or ''} trained from random init "
            f"by SimCLR (lightly NTXentLoss, T={cfg.temperature}) for {cfg.epochs} epochs on {num_images} "
            f"unlabeled task images at {cfg.channels}x{cfg.input_size}x{cfg.input_size}; no target labels used")


def pretrain_standin(images: np.ndarray, cfg: StandinConfig, mean: list[float], std: list[float],
                     device: str = "cpu", on_epoch: Callable[[int, float], None] | None = None) -> Teacher:
    """Train the stand-in teacher's backbone self-supervised.

    Args:
        images: (N, H, W, C) uint8 unlabeled images.
        cfg: architecture, input size, SimCLR settings.
        mean, std: per-channel pixel statistics of the task ([0, 1] scale), used as the stand-in's
            normalisation (a 1-channel statistic is repeated for an RGB stand-in).
        on_epoch: called with (epoch, mean NT-Xent loss).
    Returns:
        Teacher without a head, whose ``preprocess`` is (cfg.channels, cfg.input_size^2, mean, std).
    """
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    torch.manual_seed(cfg.seed)
    if cfg.max_images and cfg.max_images < len(images):
        images = images[np.random.default_rng(cfg.seed).choice(len(images), cfg.max_images, replace=False)]
    teacher = load_teacher(cfg.arch, cfg.model_kwargs)
    rep = lambda v: tuple(float(v[0]) for _ in range(cfg.channels)) if len(v) != cfg.channels else tuple(v)  # noqa: E731
    teacher.preprocess = Preprocess(cfg.channels, (cfg.input_size, cfg.input_size), rep(mean), rep(std))
    teacher.provenance = standin_provenance(cfg, len(images))
    log.warning("%s", teacher.provenance)
    proj = SimCLRProjectionHead(teacher.feature_dim, teacher.feature_dim, cfg.proj_dim)
    model = torch.nn.Sequential(teacher.backbone, proj).to(device).train()
    criterion = NTXentLoss(temperature=cfg.temperature)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    sched = cosine_schedule(opt, cfg.epochs * steps_per_epoch, warmup=min(100, steps_per_epoch))
    gen = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(cfg.epochs):
        t0, losses = time.perf_counter(), []
        from tqdm import tqdm

        steps = tqdm(batch_indices(len(images), cfg.batch_size, cfg.seed, epoch), total=steps_per_epoch,
                     desc=f"SimCLR epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not sys.stderr.isatty())
        for idx in steps:
            x = to_unit(torch.from_numpy(images[idx]))  # (B, C, H, W) float32 in [0, 1]
            v1 = teacher.preprocess.from_unit(simclr_view(x, gen)).to(device)
            v2 = teacher.preprocess.from_unit(simclr_view(x, gen)).to(device)
            loss = criterion(model(v1), model(v2))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        log.info("stand-in SimCLR epoch %d/%d: loss %.4f (%.0f s)", epoch + 1, cfg.epochs, np.mean(losses),
                 time.perf_counter() - t0)
        if on_epoch:
            on_epoch(epoch, float(np.mean(losses)))
    return teacher.eval()
