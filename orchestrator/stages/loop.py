"""Shared training/inference loops over in-memory uint8 images (no DataLoader workers: 2-core friendly).

Budgets, batch order and the LR schedule come from :mod:`orchestrator.stages.schedule` (``batch_indices`` and
``cosine_schedule`` are re-exported here for older callers)."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.config import AugmentPolicy, TrainConfig
from orchestrator.data.images import ImageSet
from orchestrator.data.shards import map_ahead
from orchestrator.models.preprocess import Preprocess
from orchestrator.stages.accel import autocast, prepare_model, to_device
from orchestrator.stages.augment import augment_batch, to_unit
from orchestrator.stages.schedule import (batch_indices, cosine_schedule, make_optimizer, optimizer_step,  # noqa: F401
                                          supervised_plan)

# What ``augment=True`` means when a caller passes no task policy: shift only, no flip (label-preserving for
# every data kind; a task's ``data.augment`` says more).
DEFAULT_AUGMENT = AugmentPolicy(hflip=False)


def augment_policy(augment: bool | AugmentPolicy | None) -> AugmentPolicy | None:
    """``augment`` as a policy: None/False -> None (no augmentation), True -> :data:`DEFAULT_AUGMENT`, a policy
    -> itself with an unresolved ``hflip`` read as no flip."""
    if augment is None or augment is False:
        return None
    if augment is True:
        return DEFAULT_AUGMENT
    return augment if augment.hflip is not None else augment.model_copy(update={"hflip": False})


def model_input(images: np.ndarray, idx: np.ndarray, preprocess: Preprocess, augment: bool | AugmentPolicy | None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images[idx] ((N, H, W, C) uint8 indexed by (b,) int64) -> (b, C, H, W) float32 model input,
    augmented as :func:`augment_policy` of ``augment`` says (False/None: not at all)."""
    # uint8 crosses to the device (4x fewer bytes); NHWC permuted to NCHW is channels-last in memory
    x = to_unit(to_device(torch.from_numpy(np.ascontiguousarray(images[idx])), device, channels_last=False))
    policy = augment_policy(augment)
    if policy is not None:
        x = augment_batch(x, policy)
    return preprocess.from_unit(x)


class _Batches:
    """A map-style dataset whose keys are whole batches: ``ds[idx]`` -> the decoded (b, H, W, C) uint8 images."""

    def __init__(self, images):
        self.images = images

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.images[idx])


def decode_workers() -> int:
    """Processes that decode a lazy set's batches ahead of training (``$KT_DECODE_WORKERS``); 0 (the default)
    decodes on a thread of this process, on :func:`~orchestrator.data.shards.decode_threads` threads (Pillow
    releases the GIL while it decodes): on 2 cores at 224 px, 810 images/s against 636 with 2 DataLoader worker
    processes, and 190 MiB of extra resident memory against 700 (benchmarks/data_plane.py, 3,000 images). Set
    it for a training step that holds the GIL (tiny models on many cores)."""
    import os

    return max(0, int(os.environ.get("KT_DECODE_WORKERS", 0)))


def prefetched(images, batches: Iterable[np.ndarray], depth: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(idx, images[idx])`` for each batch of indices, in the given order, as (b,) int64 and (b, H, W, C)
    uint8. A lazy image set (image shards) is decoded ``depth`` batches ahead on a background thread, or (with
    :func:`decode_workers` > 0) by a ``torch.utils.data.DataLoader`` whose keys are the batches themselves
    (worker processes, which do not share the training loop's GIL); an array is indexed in place."""
    if isinstance(images, np.ndarray):
        for idx in batches:
            yield idx, images[idx]
        return
    workers = decode_workers()
    if workers == 0:
        yield from map_ahead(_Batches(images).__getitem__, batches, depth)
        return
    batches = list(batches)  # the DataLoader's keys, and the indices returned beside its batches
    loader = torch.utils.data.DataLoader(_Batches(images), batch_size=None, sampler=batches, num_workers=workers,
                                         prefetch_factor=depth, collate_fn=lambda x: x)
    yield from zip(batches, loader)


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """``model.train()``; with ``freeze_bn`` every BatchNorm back in eval mode: it normalises with its running
    statistics and does not update them (its affine weights still train)."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def train_supervised(model: nn.Module, preprocess: Preprocess, data: ImageSet, cfg: TrainConfig, seed: int = 0,
                     device: str = "cpu", params: list | None = None,
                     on_epoch: Callable[[int, float], None] | None = None,
                     augment: AugmentPolicy | None = None) -> list[float]:
    """Cross-entropy training of ``model`` on labeled images (student finetune, supervised-only baseline,
    teacher full finetune). AdamW, warm-up + cosine schedule over the budget's steps
    (:func:`orchestrator.stages.schedule.supervised_plan`: ``cfg.steps`` steps or ``cfg.epochs`` passes).

    Args:
        model: (B, C, H, W) float32 -> (B, K) logits. data: labeled ImageSet. params: parameters to train
        (default all). on_epoch: called with (reporting epoch, its mean loss).
        augment: the task's augmentation (``data.augment_policy()``), used when ``cfg.augment``; None: the
            label-preserving default (shift only, no flip).
    Returns:
        Mean training loss per reporting epoch (list of float; empty for a budget of 0).
    """
    plan = supervised_plan(len(data), cfg)
    if plan.total_steps == 0:
        return []
    torch.manual_seed(seed)
    prepare_model(model, device)
    set_train_mode(model, cfg.freeze_bn)
    opt, sched = make_optimizer(params or model.parameters(), cfg, plan)
    aug = (augment or True) if cfg.augment else None
    labels = torch.from_numpy(data.labels)
    history = []
    for epoch in range(plan.epochs):
        losses = []
        for idx in plan.batches(seed, epoch):
            x = model_input(data.images, idx, preprocess, aug, device)
            with autocast(device, training=True):  # bf16 on CUDA, a no-op on the CPU (stages/accel.py)
                loss = F.cross_entropy(model(x), to_device(labels[idx], device))
            losses.append(optimizer_step(opt, sched, loss))
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
        x = to_device(preprocess(images[s:s + batch_size]), device)  # (b, C, H, W) float32
        with autocast(device):
            outs.append(fn(x).float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
