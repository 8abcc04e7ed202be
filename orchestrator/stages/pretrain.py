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
                     device: str = "cpu", on_epoch: Callable[[int, float], None] | None = None,
                     hflip: bool = True) -> Teacher:
    """Train the stand-in teacher's backbone self-supervised.

    Args:
        images: (N, H, W, C) uint8 unlabeled images.
        cfg: architecture, input size, SimCLR settings.
        mean, std: per-channel pixel statistics of the task ([0, 1] scale), used as the stand-in's
            normalisation (a 1-channel statistic is repeated for an RGB stand-in).
        on_epoch: called with (epoch, mean NT-Xent loss).
        hflip: whether the SimCLR views may be mirrored (the task's ``AugmentPolicy.hflip``).
    Returns:
        Teacher without a head, whose ``preprocess`` is (cfg.channels, cfg.input_size^2, mean, std).
    """
    torch.manual_seed(cfg.seed)
    if cfg.max_images and cfg.max_images < len(images):
        images = images[np.random.default_rng(cfg.seed).choice(len(images), cfg.max_images, replace=False)]
    teacher = load_teacher(cfg.arch, cfg.model_kwargs)
    rep = lambda v: tuple(float(v[0]) for _ in range(cfg.channels)) if len(v) != cfg.channels else tuple(v)  # noqa: E731
    teacher.preprocess = Preprocess(cfg.channels, (cfg.input_size, cfg.input_size), rep(mean), rep(std))
    teacher.provenance = standin_provenance(cfg, len(images))
    log.warning("%s", teacher.provenance)
    pretrain_simclr(teacher.backbone, teacher.feature_dim, images, teacher.preprocess, cfg.epochs,
                    cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.temperature, cfg.proj_dim, cfg.seed, device,
                    on_epoch, label="stand-in SimCLR", hflip=hflip)
    return teacher.eval()


def pretrain_simclr(encoder: torch.nn.Module, feature_dim: int, images: np.ndarray, preprocess: Preprocess,
                    epochs: int, batch_size: int, lr: float, weight_decay: float, temperature: float,
                    proj_dim: int, seed: int = 0, device: str = "cpu",
                    on_epoch: Callable[[int, float], None] | None = None, label: str = "SimCLR",
                    hflip: bool = True) -> list[float]:
    """SimCLR (Chen et al. 2020, NT-Xent loss Eq. 1, lightly's ``NTXentLoss`` and projection head) on
    unlabeled images, training ``encoder`` in place.

    Args:
        encoder: (B, C, H, W) float32 -> (B, feature_dim) float32 features. images: (N, H, W, C) uint8.
        preprocess: the encoder's input (views are made in [0, 1], then normalised by it).
        on_epoch: called with (epoch, mean loss).
        hflip: mirror views with probability 0.5 (pass the task's ``AugmentPolicy.hflip``: a digit's mirror image
            is not the same digit, so its views must not be mirrored).
    Returns:
        Mean NT-Xent loss per epoch (list of float).
    """
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from tqdm import tqdm

    torch.manual_seed(seed)
    proj = SimCLRProjectionHead(feature_dim, feature_dim, proj_dim)
    model = torch.nn.Sequential(encoder, proj).to(device).train()
    criterion = NTXentLoss(temperature=temperature)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    bs = min(batch_size, len(images))
    steps_per_epoch = math.ceil(len(images) / bs)
    sched = cosine_schedule(opt, epochs * steps_per_epoch, warmup=min(100, steps_per_epoch))
    gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        t0, losses = time.perf_counter(), []
        steps = tqdm(batch_indices(len(images), bs, seed, epoch), total=steps_per_epoch,
                     desc=f"{label} epoch {epoch + 1}/{epochs}", leave=False, disable=not sys.stderr.isatty())
        for idx in steps:
            x = to_unit(torch.from_numpy(np.ascontiguousarray(images[idx])))  # (B, C, H, W) float32 in [0, 1]
            v1 = preprocess.from_unit(simclr_view(x, gen, hflip)).to(device)
            v2 = preprocess.from_unit(simclr_view(x, gen, hflip)).to(device)
            loss = criterion(model(v1), model(v2))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        history.append(float(np.mean(losses)))
        log.info("%s epoch %d/%d: loss %.4f (%.0f s)", label, epoch + 1, epochs, history[-1], time.perf_counter() - t0)
        if on_epoch:
            on_epoch(epoch, history[-1])
    return history
