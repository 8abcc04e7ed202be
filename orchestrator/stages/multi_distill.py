"""Multi-source distillation (paper 2: Borup, Phoo, Hariharan, ICCV 2023, arXiv 2304.12314, "Distilling from
Similar Tasks for Transfer Learning on a Budget"): the student learns from several frozen source models at
once, each through its pseudo-labels and its features on the transfer set, weighted by the source's relevance.

The paper's exact loss is not public beyond its abstract; this is the natural version used here (documented in
``orchestrator/methods/distill_sources.py``)::

    L = ce_weight * CE(student(x_l), y_l)
        + sum_s w_s * ( kd_weight * T^2 KL(softmax(q_s(x) / T) || softmax(student(x) / T))
                        + feature_weight * (1 - cos(P_s f(x), g_s(x))) )

with ``q_s`` the source's pseudo-label log-probabilities (a probe on its frozen features, see
:mod:`orchestrator.methods.source_signals`), ``g_s`` its (D_s,) features, ``f`` the student's penultimate
features and ``P_s`` one linear projection head per source. DistillNearest is the case of one source, w = 1.

Plain torch, no Ray: the loop of ``orchestrator/ray_adapters/multi_train.py`` runs :func:`multi_distill_epoch`
in process or on DDP workers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from orchestrator.config import SourceDistillConfig, SourceTransferConfig
from orchestrator.data.images import ImageSet
from orchestrator.models.preprocess import Preprocess
from orchestrator.stages.accel import autocast, to_device
from orchestrator.stages.loop import model_input
from orchestrator.stages.losses import LOSSES
from orchestrator.stages.schedule import distill_plan, optimizer_step
from orchestrator.stages.schedule import make_optimizer as _make_optimizer


def make_optimizer(model: nn.Module, cfg: SourceDistillConfig, n: int, world: int = 1):
    """AdamW(lr, weight_decay) and the warm-up + cosine schedule of :func:`~orchestrator.stages.schedule.distill_plan`
    (the budget of ``cfg`` on N transfer images on ``world`` workers). Returns (optimizer, LambdaLR)."""
    return _make_optimizer(model.parameters(), cfg, distill_plan(n, cfg, world))


def new_log() -> dict:
    """An empty training log: per-epoch ``loss`` and ``seconds``, and the epoch each (re)start began at."""
    return {"loss": [], "seconds": [], "starts": []}


@dataclass
class SourceTargets:
    """One source's targets on the N transfer images: ``weight`` w_s in [0, 1]; ``pseudo`` (N, C) float32
    log-probabilities over the C target classes; ``features`` (N, D_s) float16/32 frozen source features."""

    name: str
    weight: float
    pseudo: np.ndarray
    features: np.ndarray


@dataclass
class MultiDistillData:
    """``images``: (N, H, W, C) uint8 transfer images (may be a memmap); ``sources``: their targets, same N;
    ``labeled``: the labeled target subset (the CE term), or None."""

    images: np.ndarray
    sources: list[SourceTargets]
    labeled: ImageSet | None = None

    def __post_init__(self):
        if not self.sources:
            raise ValueError("multi-source distillation needs at least one source")
        for s in self.sources:
            if len(s.pseudo) != len(self.images) or len(s.features) != len(self.images):
                raise ValueError(f"source {s.name!r}: targets for {len(s.pseudo)}/{len(s.features)} images, "
                                 f"transfer set has {len(self.images)}")


class MultiSourceStudent(nn.Module):
    """A timm student plus one linear projection head per source, onto that source's feature width.
    ``forward`` (B, C, H, W) float32 -> ((B, K) logits, [(B, D_s) projected features per source])."""

    def __init__(self, student: nn.Module, source_dims: list[int]):
        super().__init__()
        self.student = student
        self.projs = nn.ModuleList(nn.Linear(student.num_features, int(d)) for d in source_dims)

    def forward(self, x: torch.Tensor):
        f = self.student.forward_head(self.student.forward_features(x), pre_logits=True)  # (B, F) float32
        return self.student.get_classifier()(f), [p(f) for p in self.projs]


def batch_loss(model: nn.Module, x: torch.Tensor, idx: np.ndarray, data: MultiDistillData,
               cfg: SourceTransferConfig, device) -> torch.Tensor:
    """The distillation part of L (module doc) on transfer batch ``x`` ((B, C, H, W), rows ``idx``): scalar."""
    kd, cos = LOSSES.get("kd_kl"), LOSSES.get("feature_cosine")
    logits, feats = model(x)
    loss = torch.zeros((), device=device)
    for s, pf in zip(data.sources, feats):
        if s.weight == 0:
            continue
        term = torch.zeros((), device=device)
        if cfg.kd_weight:
            q = to_device(torch.from_numpy(np.asarray(s.pseudo[idx], dtype=np.float32)), device)  # (B, C)
            term = term + cfg.kd_weight * kd(logits, q, cfg.temperature)
        if cfg.feature_weight:
            g = to_device(torch.from_numpy(np.asarray(s.features[idx], dtype=np.float32)), device)  # (B, D_s)
            term = term + cfg.feature_weight * cos(pf, g)
        loss = loss + s.weight * term
    return loss


def multi_distill_epoch(model: nn.Module, opt, sched, data: MultiDistillData, preprocess: Preprocess,
                        cfg: SourceTransferConfig, epoch: int, seed: int = 0, rank: int = 0, world: int = 1,
                        device="cpu") -> float:
    """One epoch over rank ``rank``'s share of the transfer set; ``model`` is a :class:`MultiSourceStudent`
    (or its DDP wrapper). Returns the mean loss L (float)."""
    model.train()
    d = cfg.distill
    ce = LOSSES.get("ce")
    lab_rng = np.random.default_rng([seed, epoch, rank, 11])
    losses = []
    for idx in distill_plan(len(data.images), d, world).batches(seed, epoch, rank):
        x = model_input(data.images, idx, preprocess, d.augment, device)  # (B, C, H, W) float32
        with autocast(device, training=True):  # bf16 on CUDA, a no-op on the CPU (stages/accel.py)
            loss = batch_loss(model, x, idx, data, cfg, device)
            if cfg.ce_weight > 0 and data.labeled is not None and len(data.labeled):
                li = lab_rng.choice(len(data.labeled), size=min(d.batch_size, len(data.labeled)), replace=False)
                xl = model_input(data.labeled.images, li, preprocess, d.augment, device)
                yl = to_device(torch.from_numpy(data.labeled.labels[li]), device)
                loss = loss + cfg.ce_weight * ce(model(xl)[0], yl)
        losses.append(optimizer_step(opt, sched, loss))
    return float(np.mean(losses))
