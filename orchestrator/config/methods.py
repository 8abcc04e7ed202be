"""Config sections of the methods beyond the task-oriented recipe: paper 1's baselines (task-agnostic
distillation, SSL pretraining, ImageNet init) and paper 2's source zoo and FixMatch. Re-exported by
:mod:`orchestrator.config`."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from orchestrator.config.base import Strict
from orchestrator.config.training import DistillRunConfig, TrainConfig, check_execution


class TaskAgnosticConfig(Strict):
    """Paper 1's task-agnostic baseline: the frozen, un-adapted teacher's features distilled into the student
    (a projection head), then ``finetune`` on the labels (Vemulapalli et al. 2024, Sec. 4)."""

    loss: Literal["cosine", "infonce"] = "cosine"
    infonce_temperature: float = Field(0.1, gt=0)
    finetune: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=50, lr=1e-3))


class SimCLRSettings(Strict):
    """SimCLR pretraining (Chen et al. 2020; lightly's NT-Xent at ``temperature``, a ``proj_dim`` projection):
    what the stand-in teacher and the SSL baseline share."""

    epochs: int = Field(5, gt=0)
    batch_size: int = Field(256, gt=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = 1e-4
    temperature: float = Field(0.2, gt=0)
    proj_dim: int = Field(128, gt=0)


class SSLConfig(SimCLRSettings):
    """Paper 1's self-supervised baseline: the student pretrained by SimCLR (lightly's NT-Xent) on the transfer
    set's images, then ``finetune`` on the labels."""

    finetune: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=50, lr=1e-3))


class StandinConfig(SimCLRSettings):
    """How ``kt pretrain-teacher`` builds the local stand-in for a VFM: SimCLR (Chen et al. 2020) with
    lightly's NT-Xent loss on the task's *unlabeled* images only, no target labels."""

    arch: str = "timm/resnet18"
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    input_size: int = Field(32, gt=0)
    channels: Literal[1, 3] = 3
    epochs: int = Field(6, gt=0)
    max_images: int | None = Field(None, gt=0)
    seed: int = 0


class PretrainedInitConfig(Strict):
    """Paper 1's ImageNet baseline: a student initialised from pretrained weights (``id``: a ``pypi/`` id),
    then ``finetune`` on the labels."""

    id: str = "pypi/efficientnet_lite0"
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    finetune: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=30, lr=1e-3, freeze_bn=True))


class SourceEntry(Strict):
    """One source model of the zoo (``sources.zoo``; :data:`orchestrator.zoo.config.SourceConfig`).

    Attributes:
        name: unique name in the zoo (used in reports). id: a model id (``pypi/efficientnet_lite0``,
            ``checkpoint/<path>``, ``timm/<arch>:<weights>``; see :mod:`orchestrator.models.teachers`).
        model_kwargs: passed to the backend (``input_size``: the square input side in pixels).
        trained_on: the labeled data the source's weights (and head) were trained on; None = unknown.
        description: what the source is and how it was made (provenance).
    """

    name: str = Field(min_length=1)
    id: str = Field(min_length=1)
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    trained_on: str | None = None
    description: str = ""


class SourceDistillConfig(DistillRunConfig):
    """The (multi-)source distillation run of paper 2's methods (the student on the transfer set).

    Budget (:class:`~orchestrator.config.training.BudgetConfig`), as paper 1's ``distill``: default 2,000
    optimizer steps whatever the transfer set's size (reported every 100); ``epochs: N`` is the per-pass
    alternative. Batches, steps and the warm-up + cosine schedule come from ``stages.schedule.distill_plan``."""

    augment: bool = False
    backend: Literal["ray", "local"] = Field(
        "ray", description="local: the same as execution: in_process (kept for older configs); ray: as "
        "execution says (orchestrator/ray_adapters/multi_train.py)")

    @model_validator(mode="after")
    def _execution(self):
        if self.backend == "local":  # the older spelling of in-process: one place resolves it
            self.execution = "in_process"
        check_execution(self)
        return self


class SourceTransferConfig(Strict):
    """Paper 2 (Borup, Phoo, Hariharan, ICCV 2023, arXiv 2304.12314): distil from a zoo of frozen source models
    chosen by task similarity (DistillNearest / DistillWeighted and their baselines).

    ``zoo``: a list of sources, or the path of a zoo YAML (``sources: [...]``); or ``demo: true`` for
    :func:`orchestrator.demo.zoo_build.build_demo_zoo` (built and cached under ``demo_storage``, default the run's
    storage). ``metric``: a similarity metric (``orchestrator.similarity.SIMILARITY``). Weights:
    ``orchestrator.similarity.ranking.weights_from_scores(scores, weighting, weight_temperature, top_k)``.
    Loss: ``ce_weight`` CE on the labels + sum_s w_s (``kd_weight`` KL at ``temperature`` on the source's
    pseudo-labels + ``feature_weight`` (1 - cosine) through a projection head onto the source's features).
    Pseudo-labels: a multinomial logistic regression (L2, inverse strength ``probe_c``) fitted on the source's
    frozen features of the labeled target images, applied to the transfer set."""

    zoo: list[SourceEntry] | str | None = None
    demo: bool = False
    demo_storage: str | None = Field(None, description="where the demo zoo is built/cached [the run's storage]")
    demo_limit: int | None = Field(None, gt=0, description="demo zoo: train images per domain (tests)")
    metric: str = "logme"
    weighting: Literal["softmax", "normalized"] = "softmax"
    weight_temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)
    kd_weight: float = Field(1.0, ge=0)
    feature_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(1.0, ge=0)
    temperature: float = Field(4.0, gt=0)
    probe_c: float = Field(1.0, gt=0, description="inverse L2 strength of the pseudo-label probe")
    inference_batch_size: int = Field(256, gt=0)
    inference_actors: int = Field(2, gt=0)
    distill: SourceDistillConfig = Field(default_factory=SourceDistillConfig)
    finetune: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=0, lr=1e-4),
                                  description="optional finetune on the labels after distillation (epochs 0: off)")

    @model_validator(mode="after")
    def _one_zoo(self):
        if self.demo and self.zoo is not None:
            raise ValueError("set either sources.zoo (a list or a zoo YAML) or sources.demo: true, not both")
        return self


class FixMatchConfig(Strict):
    """FixMatch (Sohn et al., NeurIPS 2020, Sec. 2.2, Eq. 2-4): the student trained on ``batch_size`` labeled
    and ``mu`` x ``batch_size`` unlabeled target images per step; weak view = flip + shift, strong view =
    RandAugment (``randaugment_ops`` ops, magnitude drawn per image) + Cutout (``cutout`` of the side); an
    unlabeled image counts when the weak view's max probability >= ``threshold``; loss = CE + ``lambda_u``
    CE(strong, pseudo-label); evaluation uses an EMA (``ema_decay``) of the weights.

    Budget, in images seen (labeled + unlabeled, (1 + mu) x batch_size per step): ``images_seen``, or ``steps``
    x (1 + mu) x batch_size; with neither, the images the task's distillation sees (``distill``'s steps x its
    transfer and labeled batches: :func:`orchestrator.methods.fixmatch.fixmatch_budget`), so the two methods
    are compared at equal data. The LR follows the paper's cosine over exactly those steps."""

    threshold: float = Field(0.95, gt=0, le=1)
    lambda_u: float = Field(1.0, ge=0)
    mu: int = Field(7, gt=0)
    batch_size: int = Field(32, gt=0)
    steps: int | None = Field(None, gt=0, description="optimizer steps (the alternative to images_seen)")
    images_seen: int | None = Field(None, gt=0, description="labeled + unlabeled images drawn in all [the "
                                    "distillation's]")
    curve_points: int = Field(8, ge=0, description="evaluate the EMA student on the test split this many times "
                              "over training (the test top-1 curve; 0: only at the end)")
    lr: float = Field(0.03, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    randaugment_ops: int = Field(2, gt=0)
    cutout: float = Field(0.5, ge=0, le=1)
    max_unlabeled: int | None = Field(None, gt=0, description="use at most N unlabeled images (seeded)")

    @model_validator(mode="after")
    def _one_budget(self):
        if self.steps is not None and self.images_seen is not None:
            raise ValueError(f"fixmatch.steps={self.steps} and fixmatch.images_seen={self.images_seen} are both "
                             "set: keep one (null the other), or neither to match the distillation's images seen")
        return self
