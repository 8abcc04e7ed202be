"""Stage 3 of task-oriented transfer (Vemulapalli et al. 2024, Sec. 3): finetune the distilled student on the
labeled images, without letting it silently get worse.

With a few labels a finetune can lower accuracy (it fits 10 images per class after the student learned from
a thousand teacher-labeled ones). :func:`finetune_keep_better` measures top-1 on the held-out validation split
(``Split.val``, never trained on) before and after, and keeps the finetuned weights only when that did not drop.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Callable

from torch import nn

from orchestrator.config import AugmentPolicy, TrainConfig
from orchestrator.data.images import ImageSet
from orchestrator.models.preprocess import Preprocess
from orchestrator.stages.loop import predict, train_supervised
from orchestrator.stages.schedule import supervised_plan


@dataclass
class FinetuneReport:
    """What :func:`finetune_keep_better` did.

    Attributes:
        kept: ``"finetuned"`` (the finetuned weights) or ``"before"`` (the weights before finetuning, restored).
        checked: whether a validation split decided (False: none given, or ``keep_better`` off).
        val_top1_before, val_top1_after: validation top-1 in [0, 1] before/after finetuning (None unchecked).
        steps: optimizer steps the finetune ran; images: labeled images it processed (steps x batch).
        losses: mean training loss per reporting epoch.
        reason: one line for logs and the run summary.
    """

    kept: str
    checked: bool
    val_top1_before: float | None
    val_top1_after: float | None
    steps: int
    images: int
    losses: list[float] = field(default_factory=list)
    reason: str = ""

    @property
    def val_top1(self) -> float | None:
        """Validation top-1 of the weights kept (None unchecked)."""
        return self.val_top1_after if self.kept == "finetuned" else self.val_top1_before

    def metrics(self, prefix: str = "finetune_") -> dict[str, float]:
        """Flat float metrics: ``{prefix}kept`` (1 finetuned, 0 reverted), ``{prefix}checked``, the two
        validation top-1s when measured, ``{prefix}steps``."""
        out = {f"{prefix}kept": float(self.kept == "finetuned"), f"{prefix}checked": float(self.checked),
               f"{prefix}steps": float(self.steps)}
        if self.val_top1_before is not None:
            out[f"{prefix}val_top1_before"] = self.val_top1_before
            out[f"{prefix}val_top1_after"] = float(self.val_top1_after)
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def top1(model: nn.Module, preprocess: Preprocess, data: ImageSet, device: str = "cpu") -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (eval mode) on labeled ``data``; nan for an empty set."""
    if len(data) == 0:
        return float("nan")
    model.eval()
    logits = predict(model, preprocess, data.images, device=device)  # (N, K) float32
    return float((logits.argmax(1) == data.labels).mean())


def finetune_keep_better(student: nn.Module, preprocess: Preprocess, labeled: ImageSet, val: ImageSet | None,
                         train_cfg: TrainConfig, seed: int = 0, device: str = "cpu",
                         augment: AugmentPolicy | None = None,
                         on_epoch: Callable[[int, float], None] | None = None) -> tuple[nn.Module, FinetuneReport]:
    """Finetune ``student`` on ``labeled`` (:func:`orchestrator.stages.loop.train_supervised` with
    ``train_cfg``) and keep the result only if validation top-1 improves.

    Args:
        student: (B, C, H, W) float32 -> (B, K) logits; trained in place.
        preprocess: the student's input conversion.
        labeled: the labeled subset ((L, H, W, C) uint8, (L,) int64).
        val: the held-out validation split (``task.train.subset(split.val)``), or None / empty when the run
            has none: then it finetunes unchecked and the report says so.
        train_cfg: the finetune config; ``keep_better: false`` (a :class:`FinetuneConfig` field) also skips
            the check. A budget of 0 steps/epochs leaves the student as it is (kept ``"before"``).
        augment: the task's augmentation (``cfg.data.augment_policy()``).
    Returns:
        (the student, in eval mode: finetuned, or with its pre-finetune weights and BatchNorm statistics
        restored; the :class:`FinetuneReport`). A tie keeps the weights before finetuning: with a validation
        split of tens of images ties are common, and on Fashion-MNIST the tied finetunes lowered test top-1 by
        0.7 to 1.6 points in 4 of 4 runs (README, "The default recipe").
    """
    plan = supervised_plan(len(labeled), train_cfg)
    check = bool(getattr(train_cfg, "keep_better", True)) and val is not None and len(val) > 0
    if plan.total_steps == 0:
        return student.eval(), FinetuneReport("before", False, None, None, 0, 0, [], "finetune budget is 0: skipped")
    before_state = copy.deepcopy(student.state_dict()) if check else None
    before = top1(student, preprocess, val, device) if check else None
    losses = train_supervised(student, preprocess, labeled, train_cfg, seed, device, on_epoch=on_epoch,
                              augment=augment)
    images = plan.images()
    if not check:
        why = ("keep_better is off" if val is not None and len(val) else "no validation split "
               "(labels.val_per_class)")
        return student.eval(), FinetuneReport("finetuned", False, None, None, plan.total_steps, images, losses,
                                              f"finetuned weights kept unchecked: {why}")
    after = top1(student, preprocess, val, device)
    if after > before:
        return student.eval(), FinetuneReport("finetuned", True, before, after, plan.total_steps, images, losses,
                                              f"finetune kept: validation top-1 {before:.4f} -> {after:.4f}")
    student.load_state_dict(before_state)
    return student.eval(), FinetuneReport("before", True, before, after, plan.total_steps, images, losses,
                                          f"finetune reverted: validation top-1 did not improve {before:.4f} -> "
                                          f"{after:.4f}")


__all__ = ["FinetuneReport", "finetune_keep_better", "top1"]
