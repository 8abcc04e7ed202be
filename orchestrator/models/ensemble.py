"""A teacher ensemble: several adapted teachers behind one teacher interface, so teacher inference (Ray Data or
in process), online distillation and the test evaluation run it like a single teacher.

Combination: the mean of the members' class probabilities (the ensemble target of Hinton et al. 2015, Sec. 1;
as ensembles are distilled in FKD and function matching). The "logits" it outputs are log(mean_m p_m), so a KD
temperature T gives softmax(log(mean p) / T). Weighting members by validation top-1 was not built: the
validation split is 5 images per class on the demo task (one image is 2 points), the members score within
about a point of each other on the test split, so such weights would be noise around uniform.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from orchestrator.models.preprocess import Preprocess

ENSEMBLE_FORMAT = "kt-ensemble/1"


class MeanProbabilityHead(nn.Module):
    """The ensemble's head: the members' heads on their slices of the concatenated features, combined as the log
    of the mean of their softmax probabilities. (B, sum D_m) float32 -> (B, K) float32 log-probabilities."""

    def __init__(self, heads: list[nn.Module], dims: list[int]):
        super().__init__()
        self.heads, self.dims = nn.ModuleList(heads), list(dims)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([torch.log_softmax(h(part).float(), dim=1)
                            for h, part in zip(self.heads, f.split(self.dims, dim=1))])  # (M, B, K) float32
        return torch.logsumexp(logp, dim=0) - math.log(len(self.heads))


class EnsembleTeacher(nn.Module):
    """Adapted teachers (each a :class:`~orchestrator.models.teachers.Teacher` with a head) as one teacher.

    ``preprocess`` takes images to [0, 1] (mean 0, std 1) at the largest member input size with 3 channels when
    any member has 3; each member then applies its own preprocessing (resize, channels, normalisation) to that.
    ``names``: what each member is (shown in tables and logs). ``features`` (B, C, H, W) -> (B, sum D_m) float32, the members' features side by side; ``head``: a
    :class:`MeanProbabilityHead`; ``forward`` -> (B, K) log mean probabilities.

    Raises:
        ValueError: fewer than two members, a member without a head, or heads of different widths.
    """

    def __init__(self, members: list[nn.Module], names: list[str], classes: list[str] | None = None):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two teachers, got {len(members)}")
        if any(m.head is None for m in members):
            raise ValueError("every ensemble member needs a task head: adapt each teacher first")
        widths = {int(m.head.out_features) for m in members}
        if len(widths) != 1:
            raise ValueError(f"ensemble members predict different numbers of classes: {sorted(widths)}")
        self.members = nn.ModuleList(members)
        side = max(max(m.preprocess.size) for m in members)
        c = max(m.preprocess.channels for m in members)
        self.preprocess = Preprocess(c, (side, side), (0.0,) * c, (1.0,) * c)  # [0, 1]: members normalise
        self.feature_dim = sum(m.feature_dim for m in members)
        self.head = MeanProbabilityHead([m.head for m in members], [m.feature_dim for m in members])
        self.names = list(names)  # each member's model id and input side, e.g. pypi/efficientnet_lite1@64
        self.model_id = "ensemble(" + ", ".join(self.names) + ")"
        self.classes = classes or members[0].classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float32 in [0, 1] -> (B, sum D_m) float32."""
        return torch.cat([m.features(m.preprocess.from_unit(x)).float() for m in self.members], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float32 in [0, 1] -> (B, K) float32 log mean probabilities."""
        return self.head(self.features(x))
