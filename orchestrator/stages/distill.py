"""Stage 2 of task-oriented transfer (Vemulapalli et al. 2024, Sec. 3): distill the adapted teacher into the
student on the transfer set, matching temperature-scaled soft labels (plus optional labeled cross-entropy).

The epoch function is shared by the in-process runner here and the Ray Train adapter (DDP workers); both take
their step count, reporting epochs, batches and LR schedule from :func:`orchestrator.stages.schedule.distill_plan`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from orchestrator.config import AugmentPolicy, DistillConfig
from orchestrator.data.images import ImageSet
from orchestrator.models.preprocess import Preprocess
from orchestrator.stages.accel import autocast, prepare_model, to_device
from orchestrator.stages.loop import model_input, prefetched
from orchestrator.stages.schedule import distill_plan, optimizer_step
from orchestrator.stages.schedule import make_optimizer as _make_optimizer
from orchestrator.stages.losses import LOSSES
from orchestrator.stages.views import render_views

log = logging.getLogger(__name__)


@dataclass
class DistillData:
    """What a distillation worker reads.

    Attributes:
        images: (N, H, W, C) uint8 transfer-set images: an array, a read-only memmap, or a lazy
            :class:`~orchestrator.data.shards.ShardedImages` (batches decoded on a prefetch thread).
        teacher_logits: (N, K) float32 cached adapted-teacher logits for the same images, or None with ``teacher``.
        labeled: the labeled subset (used only when ``ce_weight > 0``).
        teacher: online mode: maps a (B, H, W, C) uint8 batch to ((B, K) logits, (B, D) features), float32 on
            the training device (the teacher applies its own preprocessing), run on every step instead of
            reading ``teacher_logits``/``teacher_features``.
        teacher_features: (N, D) float16 cached teacher features (needed when ``feature_weight > 0``).
        views: cached views (:mod:`orchestrator.stages.views`): the (N x k, 7) float32 view parameters; the
            items trained on are then the N x k views and ``teacher_logits`` holds one (N x k, K) row per view
            (an array, or :class:`~orchestrator.stages.views.TopKSoftLabels`). k: views per image.
    """

    images: np.ndarray
    teacher_logits: np.ndarray | None
    labeled: ImageSet | None = None
    teacher: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]] | None = None
    teacher_features: np.ndarray | None = None
    views: np.ndarray | None = None
    k: int = 1

    @property
    def items(self) -> int:
        """What the budget's passes run over: N images, or N x k cached views."""
        return len(self.views) if self.views is not None else len(self.images)

    def inputs(self, v: np.ndarray, batch: np.ndarray, preprocess: Preprocess, augment, device) -> torch.Tensor:
        """The student's (b, C, H, W) float32 input for items ``v`` ((b,) int64) whose images are ``batch``
        ((b, H, W, C) uint8): the cached views' pixels (:func:`~orchestrator.stages.views.render_views`, never
        augmented again), else the images augmented as ``augment`` says (:func:`model_input`)."""
        if self.views is None:
            return model_input(batch, slice(None), preprocess, augment, device)
        return preprocess.from_unit(render_views(batch, self.views[v], device))


def steps_per_epoch(n: int, cfg: DistillConfig, world: int = 1) -> int:
    """Optimizer steps per reporting epoch for N transfer images on ``world`` workers: one pass,
    ceil(N / (batch_size x world)), under an epochs budget; ``epoch_steps`` under a steps budget (the last epoch
    may be shorter: the log's ``"steps"`` has the exact count of each). See :func:`distill_plan`."""
    return distill_plan(n, cfg, world).epoch_steps


class FeatureStudent(nn.Module):
    """A timm student plus a linear projection of its penultimate features to the teacher's width, for the
    feature loss. ``forward`` (B, C, H, W) -> ((B, K) logits, (B, D_teacher) projected features)."""

    def __init__(self, student: nn.Module, teacher_dim: int):
        super().__init__()
        self.student = student
        self.proj = nn.Linear(student.num_features, teacher_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.student.forward_head(self.student.forward_features(x), pre_logits=True)  # (B, F) float32
        return self.student.get_classifier()(f), self.proj(f)


def student_state(state: dict) -> dict:
    """The student's own state dict from a (possibly :class:`FeatureStudent`) training state."""
    if not any(k.startswith("student.") for k in state):
        return state
    return {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}


def online_teacher(checkpoint: str | Path, device: str = "cpu"
                   ) -> Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]:
    """Load an adapted-teacher checkpoint for online distillation: returns ``f(images)`` mapping (B, H, W, C)
    uint8 to ((B, K) logits, (B, D) features), float32 on ``device`` (eval mode, no gradients, the teacher's
    own preprocessing): :meth:`TeacherPredictor.outputs`, the same computation as cached teacher inference."""
    from orchestrator.stages.teacher_outputs import TeacherPredictor

    return TeacherPredictor(str(checkpoint), device=str(device)).outputs


def make_optimizer(model: nn.Module, cfg: DistillConfig, n: int, world: int = 1):
    """AdamW and the warm-up + cosine schedule over all steps of :func:`distill_plan` (n transfer images on
    ``world`` workers). Returns (optimizer, LambdaLR)."""
    return _make_optimizer(model.parameters(), cfg, distill_plan(n, cfg, world))


def distill_epoch(model: nn.Module, opt, sched, data: DistillData, preprocess: Preprocess, cfg: DistillConfig,
                  epoch: int, seed: int = 0, rank: int = 0, world: int = 1, device: str = "cpu",
                  augment: AugmentPolicy | None = None) -> float:
    """Reporting epoch ``epoch`` of rank ``rank``: the optimizer steps and batches :func:`distill_plan` gives it
    (one pass over the transfer set under an epochs budget, ``epoch_steps`` steps under a steps budget).
    Returns the mean loss (float).

    ``augment``: the task's augmentation (``data.augment_policy()``), used when ``cfg.augment``; None: the
    label-preserving default (shift only, no flip). With cached views (``data.views``) the items are the views
    and nothing is augmented on top of them.

    loss = kd_weight * kd_kl(student, teacher, T) + ce_weight * CE(student(labeled), labels)
           + feature_weight * feature_loss(proj(student features), teacher features)
    (``feature_loss``: 1 - cosine, or InfoNCE over the batch).
    With ``feature_weight > 0`` the model is a :class:`FeatureStudent` (it returns logits and features).
    """
    model.train()
    kd, ce = LOSSES.get("kd_kl"), LOSSES.get("ce")
    feat = (LOSSES.get("feature_cosine") if cfg.feature_loss == "cosine" else
            lambda a, b: LOSSES.get("feature_infonce")(a, b, cfg.feature_temperature))
    use_feat = cfg.feature_weight > 0
    lab_rng = np.random.default_rng([seed, epoch, rank, 7])
    losses = []
    aug = (augment or True) if cfg.augment else None
    batches = list(distill_plan(data.items, cfg, world).batches(seed, epoch, rank))  # items: images or views
    for idx, (_, batch) in zip(batches, prefetched(data.images, (b // data.k for b in batches))):
        x = data.inputs(idx, batch, preprocess, aug, device)  # (B, C, H, W) float32
        if data.teacher is not None:
            t, tf = data.teacher(np.asarray(batch))  # (B, K), (B, D): a teacher forward every step
        else:
            t = to_device(torch.from_numpy(np.array(data.teacher_logits[idx], dtype=np.float32)), device)  # (B, K)
            tf = (to_device(torch.from_numpy(np.array(data.teacher_features[idx], dtype=np.float32)), device)
                  if use_feat else None)  # (B, D) float32
        with autocast(device, training=True):  # bf16 forward and loss on CUDA, a no-op on the CPU
            out = model(x)
            logits, sf = out if use_feat else (out, None)
            loss = cfg.kd_weight * kd(logits, t, cfg.temperature)
            if use_feat:
                loss = loss + cfg.feature_weight * feat(sf, tf)
            if cfg.ce_weight > 0 and data.labeled is not None:
                li = lab_rng.choice(len(data.labeled), size=min(cfg.batch_size, len(data.labeled)), replace=False)
                xl = model_input(data.labeled.images, li, preprocess, aug, device)
                out_l = model(xl)
                loss = loss + cfg.ce_weight * ce(out_l[0] if use_feat else out_l,
                                                 to_device(torch.from_numpy(data.labeled.labels[li]), device))
        losses.append(optimizer_step(opt, sched, loss))
    return float(np.mean(losses))


def save_state(path: Path, model: nn.Module, opt, sched, epoch: int, log: dict) -> None:
    """Atomically write a resumable training state: model, optimizer, schedule, last finished ``epoch`` and
    ``log`` (``{"loss": [per epoch], "seconds": [per epoch], "steps": [optimizer steps per epoch],
    "starts": [epoch each (re)start began at]}``)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "epoch": epoch, "log": log}, tmp)
    tmp.replace(path)


def load_state(path: Path, model: nn.Module, opt, sched) -> tuple[int, dict]:
    """Restore a state written by :func:`save_state`; returns (next epoch, log)."""
    st = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["opt"])
    sched.load_state_dict(st["sched"])
    return st["epoch"] + 1, st["log"]


def read_state(path: Path) -> tuple[dict, dict]:
    """(model state_dict, training log) of a state written by :func:`save_state` (the finished run's student)."""
    st = torch.load(path, map_location="cpu", weights_only=False)
    return st["model"], st["log"]


def new_log() -> dict:
    """An empty training log (see :func:`save_state`)."""
    return {"loss": [], "seconds": [], "steps": [], "starts": []}


def distill_local(model: nn.Module, data: DistillData, preprocess: Preprocess, cfg: DistillConfig,
                  ckpt_dir: str | Path, seed: int = 0, device: str = "cpu",
                  on_epoch: Callable[[int, float], None] | None = None,
                  augment: AugmentPolicy | None = None) -> dict:
    """Distill in this process for the budget of ``cfg`` (:func:`distill_plan`), checkpointing each reporting
    epoch to ``ckpt_dir/state.pt``; a re-run after a kill resumes from the last finished epoch. ``augment``: the
    task's augmentation (see :func:`distill_epoch`). Returns the training log (loss, seconds and optimizer steps
    of every epoch, resumed ones included, and the epoch each start began at)."""
    ckpt = Path(ckpt_dir) / "state.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    prepare_model(model, device)
    plan = distill_plan(data.items, cfg)
    opt, sched = make_optimizer(model, cfg, data.items)
    start, log_ = load_state(ckpt, model, opt, sched) if ckpt.exists() else (0, new_log())
    if start:
        log.info("resuming distillation from epoch %d (%s)", start, ckpt)
    log_["starts"].append(start)
    for epoch in range(start, plan.epochs):
        t0 = time.perf_counter()
        log_["loss"].append(distill_epoch(model, opt, sched, data, preprocess, cfg, epoch, seed, device=device,
                                          augment=augment))
        log_["seconds"].append(time.perf_counter() - t0)
        log_.setdefault("steps", []).append(len(plan.steps_of(epoch)))
        save_state(ckpt, model, opt, sched, epoch, log_)
        if on_epoch:
            on_epoch(epoch, log_["loss"][-1])
    return log_
