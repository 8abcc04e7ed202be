"""Training budgets, batch order and the learning-rate schedule: the one place every training loop gets them.

A stage's config says how long it trains (:class:`orchestrator.config.BudgetConfig`: ``steps`` optimizer steps,
or ``epochs`` passes over its data). :func:`plan_training` turns that, the data size, the batch size and the
number of data-parallel workers into a :class:`Plan`: the total number of optimizer steps, how they split into
reporting epochs (the unit of loss logs, checkpoints, per-epoch ``val_top1`` and ASHA's rungs), the batches of
every step and the warm-up + cosine learning-rate factor of every step. Distillation (in-process
:func:`orchestrator.stages.distill.distill_local` and the Ray Train loop), student finetuning, the supervised
baseline and the teacher's finetune all use it; :func:`optimizer_step` is their one optimizer step.

Batch order: step ``g`` (0-based, global over the whole run) takes batch ``g mod P`` of pass ``g div P`` over the
data, where P = ceil(N / (batch * world)) steps make one pass and every pass is a fresh permutation seeded by
(seed, pass). Under an epochs budget a reporting epoch is exactly one pass, as before; under a steps budget it is
``epoch_steps`` steps, which may span passes. The order depends only on (seed, step), so a run resumed from a
checkpoint sees the same batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from orchestrator.config import Budget

# Linear warm-up length: min(cap, total_steps // divisor) steps.
WARMUP_SUPERVISED = (50, 10)  # finetune, baseline, teacher finetune: at most 50 steps, a tenth of the run
WARMUP_DISTILL = (200, 20)  # distillation: at most 200 steps, a twentieth of the run


def batch_indices(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                  shuffle: bool = True) -> Iterator[np.ndarray]:
    """Yield the (b,) int64 index batches of one pass over ``n`` items; rank ``rank`` of ``world`` gets every
    world-th batch.

    Every rank gets the same number of batches, ceil(n / (batch_size * world)) (the permutation is padded by
    wrap-around), so DDP ranks stay in step. The order depends only on (seed, epoch = the pass number).
    """
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    steps = max(1, math.ceil(n / (batch_size * world)))
    order = np.resize(order, steps * batch_size * world)  # wrap-around pad
    for s in range(steps):
        start = (s * world + rank) * batch_size
        yield order[start:start + batch_size]


def lr_factor(step: int, total_steps: int, warmup: int = 0) -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based): linear warm-up over ``warmup`` steps
    to 1, then cosine decay to 0 at ``total_steps``. Returns a float in [0, 1]."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))


def cosine_schedule(opt: torch.optim.Optimizer, total_steps: int, warmup: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying :func:`lr_factor` (warm-up then cosine to 0 over ``total_steps`` optimizer steps)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total_steps, warmup))


def budget_of(cfg: Any) -> Budget:
    """The budget of a stage config: ``cfg.budget()`` for a :class:`orchestrator.config.BudgetConfig`, else
    ``cfg.epochs`` passes (configs that only know epochs)."""
    return cfg.budget() if hasattr(cfg, "budget") else Budget("epochs", int(cfg.epochs))


def report_epochs(cfg: Any) -> int:
    """How many reporting epochs (per-epoch reports, e.g. ``val_top1`` for ASHA) a stage makes: its ``epochs``,
    or ceil(steps / epoch_steps). Independent of the data size, so a sweep knows it before it sees the data."""
    b = budget_of(cfg)
    return b.value if b.kind == "epochs" else math.ceil(b.value / b.epoch_steps)


@dataclass(frozen=True)
class Plan:
    """How a training stage spends its budget on N items.

    Attributes:
        budget: the config's :class:`orchestrator.config.Budget`.
        n: items per pass (the dataset size, >= 1).
        batch_size: items per optimizer step per worker.
        world: data-parallel workers (DDP ranks); each step takes ``batch_size`` items on each.
        pass_steps: optimizer steps in one pass over the data, ceil(n / (batch_size * world)).
        total_steps: optimizer steps of the whole run (int >= 0).
        epoch_steps: optimizer steps per reporting epoch (the last epoch may have fewer).
        epochs: reporting epochs, ceil(total_steps / epoch_steps) (0 when nothing trains).
        warmup: linear warm-up steps of the learning rate.
    """

    budget: Budget
    n: int
    batch_size: int
    world: int
    pass_steps: int
    total_steps: int
    epoch_steps: int
    epochs: int
    warmup: int

    def steps_of(self, epoch: int) -> range:
        """The global step indices of reporting epoch ``epoch`` (0-based)."""
        return range(epoch * self.epoch_steps, min((epoch + 1) * self.epoch_steps, self.total_steps))

    def batches(self, seed: int, epoch: int, rank: int = 0, shuffle: bool = True) -> Iterator[np.ndarray]:
        """Rank ``rank``'s (b,) int64 index batches of reporting epoch ``epoch``, one per optimizer step."""
        cached: tuple[int, list[np.ndarray]] | None = None
        for g in self.steps_of(epoch):
            p, b = divmod(g, self.pass_steps)
            if cached is None or cached[0] != p:
                cached = (p, list(batch_indices(self.n, self.batch_size, seed, p, rank, self.world, shuffle)))
            yield cached[1][b]

    def lr_factor(self, step: int) -> float:
        """The learning-rate multiplier of global step ``step`` (:func:`lr_factor`)."""
        return lr_factor(step, self.total_steps, self.warmup)

    def scheduler(self, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """The warm-up + cosine LambdaLR of this plan (step it once per optimizer step)."""
        return cosine_schedule(opt, self.total_steps, self.warmup)

    def images(self, epochs: int | None = None, per_step: int | None = None) -> int:
        """Items processed by all workers in the first ``epochs`` reporting epochs (default all):
        steps x world x ``per_step`` (default ``batch_size``; distillation with labeled cross-entropy adds the
        labeled batch)."""
        steps = self.total_steps if epochs is None else min(self.total_steps, epochs * self.epoch_steps)
        return steps * self.world * (self.batch_size if per_step is None else per_step)

    def describe(self) -> str:
        """E.g. ``2000 steps (20 epochs of 100; 5 steps per pass over 1238 items, batch 256 x 1)``."""
        return (f"{self.total_steps} steps ({self.epochs} epochs of {self.epoch_steps}; {self.pass_steps} steps "
                f"per pass over {self.n} items, batch {self.batch_size} x {self.world})")


def plan_training(n: int, batch_size: int, cfg: Any, world: int = 1,
                  warmup: tuple[int, int] = WARMUP_SUPERVISED) -> Plan:
    """The :class:`Plan` of a stage with config ``cfg`` (its budget: :func:`budget_of`) on ``n`` items.

    Args:
        n: dataset size (items per pass); 0 is treated as 1 (the batch then wraps around).
        batch_size: items per optimizer step per worker (> 0).
        world: data-parallel workers (> 0).
        warmup: (cap, divisor): warm-up steps = min(cap, total_steps // divisor).
    Returns:
        The plan. An epochs budget of E gives E x pass_steps steps in E epochs of one pass; a steps budget of S
        gives S steps in ceil(S / epoch_steps) epochs, whatever ``n``.
    Raises:
        ValueError: batch_size or world < 1.
    """
    if batch_size < 1 or world < 1:
        raise ValueError(f"batch_size ({batch_size}) and world ({world}) must be >= 1")
    n = max(1, int(n))
    b = budget_of(cfg)
    pass_steps = max(1, math.ceil(n / (batch_size * world)))
    if b.kind == "epochs":
        total, epoch_steps = b.value * pass_steps, pass_steps
    else:
        total, epoch_steps = b.value, int(b.epoch_steps)
    epochs = math.ceil(total / epoch_steps) if total else 0
    return Plan(b, n, batch_size, world, pass_steps, total, epoch_steps, epochs,
                min(warmup[0], total // warmup[1]))


def supervised_plan(n: int, cfg: Any) -> Plan:
    """The plan of supervised training on ``n`` labeled images (finetune, baseline, teacher finetune): batches of
    min(batch_size, n), one worker, :data:`WARMUP_SUPERVISED`."""
    return plan_training(n, min(cfg.batch_size, max(1, n)), cfg, 1, WARMUP_SUPERVISED)


def distill_plan(n: int, cfg: Any, world: int = 1) -> Plan:
    """The plan of distillation on ``n`` transfer images on ``world`` workers: batches of ``cfg.batch_size``
    per worker (wrapping around when n is smaller), :data:`WARMUP_DISTILL`."""
    return plan_training(n, cfg.batch_size, cfg, world, WARMUP_DISTILL)


def make_optimizer(params: Iterable, cfg: Any, plan: Plan):
    """AdamW(``cfg.lr``, ``cfg.weight_decay``) over ``params`` and the plan's warm-up + cosine schedule.
    Returns (optimizer, LambdaLR)."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, plan.scheduler(opt)


def optimizer_step(opt: torch.optim.Optimizer, sched, loss: torch.Tensor) -> float:
    """The one optimizer step of every training loop: zero the gradients, backpropagate ``loss`` (a scalar
    tensor), step the optimizer and the schedule. Returns the loss as a float."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.item())
