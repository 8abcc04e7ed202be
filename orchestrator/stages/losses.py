"""Distillation losses (a registry, so sweeps and the task-agnostic baseline can add more)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from orchestrator.registry import Registry

LOSSES: Registry[Callable[..., torch.Tensor]] = Registry("loss")


@LOSSES.register("kd_kl")
def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-label KD loss (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", Sec. 2):
    T^2 * KL(softmax(t / T) || softmax(s / T)), averaged over the batch.

    Args:
        student_logits, teacher_logits: (B, K) float32. temperature: T > 0.
    Returns:
        scalar float32. The T^2 factor keeps gradient magnitudes comparable across temperatures.
    """
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)  # (B, K)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)  # (B, K)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


@LOSSES.register("ce")
def ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on hard labels. (B, K) float32, (B,) int64 -> scalar."""
    return F.cross_entropy(student_logits, labels)


@LOSSES.register("feature_cosine")
def feature_cosine(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Task-agnostic feature distillation: 1 - cosine similarity, averaged over the batch.

    (B, D) float32 each (the student's features projected to the teacher's D) -> scalar.
    """
    return (1 - F.cosine_similarity(student_features, teacher_features, dim=-1)).mean()


@LOSSES.register("feature_infonce")
def feature_infonce(student_features: torch.Tensor, teacher_features: torch.Tensor,
                    temperature: float = 0.1) -> torch.Tensor:
    """Contrastive feature distillation: InfoNCE (van den Oord et al. 2018, "Representation Learning with
    Contrastive Predictive Coding", Eq. 4) with the student's projected feature of image i as the query, the
    teacher's feature of image i as its positive and the teacher's features of the batch's other images as
    negatives, on L2-normalised features: CE(s_i . t_j / tau over j, target i), averaged over the batch.

    (B, D) float32 each -> scalar float32.
    """
    s = F.normalize(student_features, dim=-1)  # (B, D)
    t = F.normalize(teacher_features, dim=-1)  # (B, D)
    logits = s @ t.T / temperature  # (B, B) float32
    return F.cross_entropy(logits, torch.arange(len(s), device=s.device))
