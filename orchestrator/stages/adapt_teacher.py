"""Stage 1 of task-oriented transfer (Vemulapalli et al. 2024, Sec. 3): adapt the teacher to the target
task on the labeled subset, by a linear probe on frozen features or by full finetuning."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.config import AugmentPolicy, TeacherConfig
from orchestrator.data.images import ImageSet
from orchestrator.models.teachers import Teacher
from orchestrator.stages.loop import predict, train_supervised


def fit_linear_probe(features: np.ndarray, labels: np.ndarray, num_classes: int, epochs: int = 100,
                     lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0) -> nn.Linear:
    """Multinomial logistic regression on frozen features (full-batch AdamW, ``epochs`` steps).

    Args:
        features: (N, D) float32. labels: (N,) int64 in [0, num_classes).
    Returns:
        nn.Linear(D, num_classes) whose output is the logits.
    """
    torch.manual_seed(seed)
    x = torch.from_numpy(features).float()  # (N, D) float32
    y = torch.from_numpy(labels).long()  # (N,) int64
    head = nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        loss = F.cross_entropy(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return head


def adapt_teacher(teacher: Teacher, labeled: ImageSet, num_classes: int, cfg: TeacherConfig,
                  seed: int = 0, device: str = "cpu", augment: AugmentPolicy | None = None) -> Teacher:
    """Give ``teacher`` a task head trained on ``labeled``: a linear probe (backbone frozen) or full finetune.

    ``augment``: the task's augmentation (``data.augment_policy()``) for the finetune (when
    ``cfg.finetune.augment``); None: the label-preserving default (shift only, no flip).

    Returns the same Teacher object (in eval mode) with ``head`` set to nn.Linear(D, num_classes).
    """
    teacher.to(device).eval()
    feats = predict(teacher.features, teacher.preprocess, labeled.images, cfg.inference_batch_size, device)
    teacher.head = fit_linear_probe(feats, labeled.labels, num_classes, cfg.probe_epochs, cfg.probe_lr,
                                    cfg.probe_weight_decay, seed)
    if cfg.adapt == "finetune":  # probe first (LP-FT, Kumar et al. 2022), then train everything
        train_supervised(teacher, teacher.preprocess, labeled, cfg.finetune, seed, device, augment=augment)
    return teacher.eval()
