"""FixMatch (Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency and Confidence",
NeurIPS 2020, arXiv 2001.07685): paper 2's semi-supervised baseline, on the target's unlabeled images.

Per step (Sec. 2.2, Eq. 1-4), with B labeled and mu*B unlabeled images::

    l_s = CE(p(y | alpha(x_l)), y_l)                                   (weak view of the labeled batch)
    q   = softmax(p(y | alpha(u))) ;  mask = max(q) >= tau             (pseudo-label from the weak view)
    l_u = mean( mask * CE(p(y | A(u)), argmax(q)) )                    (strong view)
    loss = l_s + lambda_u * l_u

alpha = random horizontal flip + shift of up to 12.5% (the paper's weak augmentation; the flip only where the
task's ``AugmentPolicy.hflip`` allows it, the shift its ``max_shift``); A = alpha, then
RandAugment (torchvision.transforms.v2, ``randaugment_ops`` ops, magnitude drawn uniformly per image, as the
paper's "RA with a random magnitude" variant) and Cutout (a square of ``cutout`` x the side, grey). SGD with
Nesterov momentum, lr schedule ``lr * cos(7 pi k / (16 K))`` (Sec. 3 / Appendix B.1); the model evaluated is an
exponential moving average of the weights (``ema_decay``). Plain torch, in-process.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.config import AugmentPolicy, FixMatchConfig
from orchestrator.data.images import ImageSet
from orchestrator.models.preprocess import Preprocess
from orchestrator.stages.augment import random_shift_flip, to_unit

BINS = 31  # torchvision's default magnitude bins: magnitudes 0..30


PAPER_WEAK = AugmentPolicy(hflip=True, max_shift=0.125)  # the paper's alpha: flip and shift by up to 12.5%


def weak_view(images_u8: np.ndarray, policy: AugmentPolicy = PAPER_WEAK) -> torch.Tensor:
    """alpha: (B, H, W, C) uint8 -> (B, C, H, W) float32 in [0, 1], shifted by up to ``policy.max_shift`` and
    flipped with probability 0.5 only when ``policy.hflip``."""
    x = to_unit(torch.from_numpy(np.ascontiguousarray(images_u8)))
    return random_shift_flip(x, policy.max_shift, 0.5 if policy.hflip else 0.0)


def cutout(x: torch.Tensor, frac: float, rng: np.random.Generator) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017): per image, a square of side ``frac`` x min(H, W) at a random centre is
    set to 0.5 (grey). (B, C, H, W) float32 in [0, 1] -> same (in place)."""
    if frac <= 0:
        return x
    _, _, h, w = x.shape
    side = max(1, int(round(frac * min(h, w))))
    for i in range(len(x)):
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        y0, x0 = max(0, cy - side // 2), max(0, cx - side // 2)
        x[i, :, y0:min(h, y0 + side), x0:min(w, x0 + side)] = 0.5
    return x


class StrongView:
    """A: weak view, then RandAugment with a per-image random magnitude in [0, 30], then Cutout.
    ``__call__`` (B, H, W, C) uint8 -> (B, C, H, W) float32 in [0, 1]."""

    def __init__(self, ops: int, cutout_frac: float, seed: int, policy: AugmentPolicy = PAPER_WEAK):
        from torchvision.transforms import v2

        self.policy = policy
        self.ras = [v2.RandAugment(num_ops=ops, magnitude=m, num_magnitude_bins=BINS) for m in range(BINS)]
        self.frac = cutout_frac
        self.rng = np.random.default_rng([seed, 5])

    def __call__(self, images_u8: np.ndarray) -> torch.Tensor:
        x = (weak_view(images_u8, self.policy) * 255).round().to(torch.uint8)  # (B, C, H, W) uint8
        mags = self.rng.integers(0, BINS, size=len(x))
        out = torch.stack([self.ras[m](img) for m, img in zip(mags, x)]).float().div_(255.0)
        return cutout(out, self.frac, self.rng)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers (BatchNorm statistics) are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def fixmatch_train(model: nn.Module, preprocess: Preprocess, labeled: ImageSet, unlabeled: np.ndarray,
                   cfg: FixMatchConfig, steps: int, seed: int = 0, device: str = "cpu",
                   augment: AugmentPolicy | None = None,
                   evaluate: Callable[[nn.Module], float] | None = None) -> tuple[nn.Module, dict]:
    """Train ``model`` ((B, C, H, W) float32 -> (B, K) logits) with FixMatch for ``steps`` optimizer steps
    (``cfg.batch_size`` labeled + ``cfg.mu`` x ``cfg.batch_size`` unlabeled images each).

    Args:
        labeled: the labeled target images (labels (N_l,) int64). unlabeled: (N_u, H, W, C) uint8 target
            images without labels (the labeled ones may be among them, as in the paper).
        steps: optimizer steps (:func:`orchestrator.methods.fixmatch.fixmatch_budget`); the cosine LR spans them.
        augment: the task's policy (``data.augment_policy()``) for the weak view's flip and shift; None: the
            paper's flip + 12.5% shift.
        evaluate: maps the EMA model (eval mode) to a top-1; called ``cfg.curve_points`` times, evenly over the
            steps (the last at the end), for the log's ``curve``.
    Returns:
        (the EMA model in eval mode, on ``device``; log ``{"loss", "mask_rate", "seconds", "images_seen",
        "curve"}``: per-step loss and fraction of unlabeled images above the threshold, total wall seconds,
        labeled + unlabeled images drawn (counted as drawn), and [(step, top-1)] of the EMA model).
    Raises:
        ValueError: no labeled or no unlabeled images, or steps < 1.
    """
    if not len(labeled) or not len(unlabeled):
        raise ValueError(f"FixMatch needs labeled and unlabeled images (got {len(labeled)} / {len(unlabeled)})")
    if steps < 1:
        raise ValueError(f"FixMatch needs at least one step, got {steps}")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 3])
    model = model.to(device).train()
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: math.cos(7 * math.pi * k / (16 * steps)))
    weak = augment or PAPER_WEAK
    strong = StrongView(cfg.randaugment_ops, cfg.cutout, seed, weak)
    labels = torch.from_numpy(labeled.labels)
    b, bu = cfg.batch_size, cfg.mu * cfg.batch_size
    points = {round(steps * (i + 1) / cfg.curve_points) for i in range(cfg.curve_points)} if evaluate else set()
    log: dict = {"loss": [], "mask_rate": [], "images_seen": 0, "curve": []}
    for step in range(1, steps + 1):
        li = rng.choice(len(labeled), size=b, replace=len(labeled) < b)
        ui = rng.choice(len(unlabeled), size=bu, replace=len(unlabeled) < bu)
        u = np.asarray(unlabeled[np.sort(ui)])
        x = torch.cat([weak_view(labeled.images[li], weak), weak_view(u, weak), strong(u)])  # (B + 2 mu B, C, H, W)
        logits = model(preprocess.from_unit(x.to(device)))
        lx, lw, ls = logits[:b], logits[b:b + bu], logits[b + bu:]
        loss_s = F.cross_entropy(lx, labels[li].to(device))
        conf, pseudo = torch.softmax(lw.detach(), dim=-1).max(dim=-1)
        mask = (conf >= cfg.threshold).float()
        loss_u = (F.cross_entropy(ls, pseudo, reduction="none") * mask).mean()
        loss = loss_s + cfg.lambda_u * loss_u
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema_update(ema, model, cfg.ema_decay)
        log["loss"].append(float(loss.item()))
        log["mask_rate"].append(float(mask.mean().item()))
        log["images_seen"] += len(li) + len(ui)
        if step in points:
            log["curve"].append((step, float(evaluate(ema.eval()))))
    log["seconds"] = time.perf_counter() - t0
    return ema.eval(), log
