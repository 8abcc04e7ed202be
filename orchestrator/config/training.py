"""Training-stage configs: budgets (steps or epochs), the supervised and distillation stages, and the task's
augmentation policy. Re-exported by :mod:`orchestrator.config`."""
from __future__ import annotations

from typing import Any, ClassVar, Literal, NamedTuple

from pydantic import Field, model_validator

from orchestrator.config.base import Strict


Execution = Literal["auto", "in_process", "worker_group"]
EXECUTION_HELP = ("where the training loop runs: auto (in this process for 0 workers or 1 CPU worker, a Ray Train "
                  "worker group otherwise), in_process, or worker_group (orchestrator/ray_adapters/loop_session.py)")


def check_execution(cfg: Any) -> None:
    """A distillation config's ``execution`` against its ``num_workers``. Raises ValueError for a worker group
    of 0 workers."""
    if cfg.execution == "worker_group" and cfg.num_workers == 0:
        raise ValueError("execution: worker_group needs num_workers >= 1 (num_workers: 0 means in this process); "
                         "set num_workers or execution: auto")


# Data kinds whose classes change under a mirror image (digits, letters, glyphs, house numbers): no horizontal
# flip by default. torchvision dataset names, compared case-insensitively.
GLYPH_DATASETS = frozenset({"mnist", "emnist", "kmnist", "qmnist", "usps", "svhn", "omniglot", "semeion"})


class AugmentPolicy(Strict):
    """The label-preserving augmentation of every stage that augments (teacher finetune, distillation, student
    finetune, supervised baseline): a task setting, ``data.augment``. A stage's own ``augment: false`` turns it
    off there; this says what "augment" means for the task's images.

    Applied per image to (B, C, H, W) float32 in [0, 1] by :func:`orchestrator.stages.augment.augment_batch`:
    a random crop of ``crop_scale`` area (resized back), a translation of up to ``max_shift`` of the side, a
    horizontal flip with probability 0.5 when ``hflip``, then brightness/contrast jitter.

    ``hflip: null`` (the default) means the data kind's default (:meth:`resolved`): no flip for digits,
    characters and glyphs (``mnist_csv``; torchvision MNIST/EMNIST/KMNIST/QMNIST/USPS/SVHN/Omniglot/SEMEION) and
    for ``image_folder`` (unknown content: a flip can turn one class into another, so it must be asked for);
    flip for ``fashion_mnist_idx`` and other torchvision sets (natural images, clothing: mirror-symmetric).
    """

    hflip: bool | None = Field(None, description="random horizontal flip (p = 0.5) [by data kind]")
    max_shift: float = Field(0.125, ge=0, lt=0.5, description="translate by up to this fraction of the side "
                             "(0.125: 3.5 px at 28 px)")
    crop_scale: tuple[float, float] = Field((1.0, 1.0), description="random crop of this area fraction range, "
                                            "resized back ((1, 1): none)")
    brightness: float = Field(0.0, ge=0, lt=1, description="brightness factor in 1 +- this")
    contrast: float = Field(0.0, ge=0, lt=1, description="contrast factor in 1 +- this")

    @model_validator(mode="after")
    def _crop(self):
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"augment.crop_scale={list(self.crop_scale)} must be [lo, hi] with 0 < lo <= hi <= 1 "
                             "(area fractions; [1, 1] for no crop)")
        return self

    def resolved(self, data: Any = None) -> "AugmentPolicy":
        """This policy with ``hflip`` decided: as given, else by the kind of ``data`` (a
        :class:`orchestrator.config.DatasetConfig`; see the class doc; no flip when ``data`` is None)."""
        if self.hflip is not None:
            return self
        flip = False
        if data is not None and data.format == "fashion_mnist_idx":
            flip = True
        elif data is not None and data.format == "torchvision":
            flip = (data.name or "").lower() not in GLYPH_DATASETS
        return self.model_copy(update={"hflip": flip})


class Budget(NamedTuple):
    """A training stage's budget, resolved by :meth:`BudgetConfig.budget`.

    Attributes:
        kind: ``"steps"`` (``value`` optimizer steps in all, whatever the data size) or ``"epochs"`` (``value``
            passes over the data: the step count grows with the data).
        value: the number of steps or epochs (int >= 0; 0 trains nothing).
        epoch_steps: steps budget only: optimizer steps per reporting epoch (the unit of per-epoch logs,
            checkpoints, ``val_top1`` reports and ASHA's rungs); None for an epochs budget (an epoch is a pass).
    """

    kind: Literal["steps", "epochs"]
    value: int
    epoch_steps: int | None = None


class BudgetConfig(Strict):
    """How long a training stage runs: ``steps`` (optimizer steps) or ``epochs`` (passes over its data).

    At most one of them may be set; with neither, the stage's default budget ``DEFAULT_BUDGET`` applies (its
    docstring says which). Both set is an error (set the other to null, e.g. ``--set distill.epochs=null``).
    Under a steps budget, a reporting "epoch" (loss log, checkpoint, per-epoch ``val_top1``) is ``epoch_steps``
    optimizer steps (default 100), the last one possibly shorter. One optimizer step takes ``batch_size``
    images per worker, so with W Ray Train workers a step sees W x batch_size images.
    Schedules, step counts and batches are computed from this in one place: ``orchestrator.stages.schedule``.
    """

    DEFAULT_BUDGET: ClassVar[Budget] = Budget("epochs", 30)
    DEFAULT_EPOCH_STEPS: ClassVar[int] = 100

    epochs: int | None = Field(None, ge=0, description="passes over the data (the alternative to steps)")
    steps: int | None = Field(None, ge=0, description="optimizer steps in all, whatever the data size")
    epoch_steps: int | None = Field(None, gt=0, description="steps budget: optimizer steps per reporting epoch "
                                    "[100]")

    @model_validator(mode="after")
    def _one_budget(self):
        if self.epochs is not None and self.steps is not None:
            raise ValueError(f"both epochs={self.epochs} and steps={self.steps} are set, and only one budget can "
                             "decide: keep one and set the other to null (in YAML `epochs: null`, or "
                             "--set <section>.epochs=null)")
        if self.epoch_steps is not None and self.budget().kind != "steps":
            raise ValueError(f"epoch_steps={self.epoch_steps} is the reporting epoch of a steps budget, but the "
                             f"budget is {self.budget().value} epochs: set steps instead of epochs, or drop "
                             "epoch_steps")
        return self

    def budget(self) -> Budget:
        """The budget that decides: ``steps`` if set, else ``epochs`` if set, else ``DEFAULT_BUDGET``."""
        if self.steps is not None:
            return Budget("steps", self.steps, self.epoch_steps or self.DEFAULT_EPOCH_STEPS)
        if self.epochs is not None:
            return Budget("epochs", self.epochs)
        d = self.DEFAULT_BUDGET
        return Budget(d.kind, d.value, (self.epoch_steps or self.DEFAULT_EPOCH_STEPS) if d.kind == "steps" else None)


class TrainConfig(BudgetConfig):
    """A supervised training stage (student finetune, supervised-only baseline, teacher finetune).

    Budget (:class:`BudgetConfig`): ``steps`` or ``epochs``; default 30 epochs. An epoch has
    ceil(N / batch_size) steps for N labeled images (the batch is at most N)."""

    batch_size: int = Field(128, gt=0)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = 5e-4
    augment: bool = True
    freeze_bn: bool = Field(False, description="BatchNorm on its running statistics (affine weights still train): "
                            "finetuning a pretrained model on a few images of another domain")


class DistillRunConfig(BudgetConfig):
    """What every distillation run on a transfer set shares (paper 1's ``distill``, paper 2's
    ``sources.distill``): batches, optimiser, augmentation, and where the loop runs (``num_workers`` Ray Train
    workers, ``execution``). Budget (:class:`BudgetConfig`): default 2,000 optimizer steps."""

    DEFAULT_BUDGET: ClassVar[Budget] = Budget("steps", 2000)

    batch_size: int = Field(256, gt=0)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = 5e-4
    augment: bool = True
    num_workers: int = Field(2, ge=0, description="Ray Train workers; 0: in this process")
    use_gpu: bool = False
    execution: Execution = Field("auto", description=EXECUTION_HELP)


class DistillConfig(DistillRunConfig):
    """Student distillation on the transfer set (Hinton et al. 2015 KD; Vemulapalli et al. 2024 stage 2).

    Budget (:class:`BudgetConfig`): ``steps`` or ``epochs``; default 2,000 optimizer steps whatever the
    transfer set's size (reported every 100 steps), so 1,300 images get as much training as 60,000 would
    (15 epochs of 59,400 images at batch 256 on 2 workers were 1,740 steps; 15 epochs of 1,337 images were 45).
    ``epochs: N`` keeps the old per-pass budget.

    Cached views (``views`` = K >= 1; FKD, Shen & Xing 2022): each transfer image's K views are drawn once from
    the task's policy (``data.augment``; the random-resized crop's area in [``view_min_area``, 1], by default the
    policy's own ``crop_scale``) and
    labelled by the teacher once; the budget's passes then run over the N x K views, and ``augment`` is not
    applied on top (the student's input is the crop the teacher labelled: :mod:`orchestrator.stages.views`)."""

    temperature: float = Field(4.0, gt=0)
    kd_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(0.0, ge=0, description="cross-entropy on the labeled subset, mixed in each step")
    feature_weight: float = Field(
        0.0, ge=0, description="feature distillation: 1 - cosine between the student's projected penultimate "
        "features and the teacher's (the task-agnostic loss, Vemulapalli et al. 2024 Sec. 4)")
    feature_loss: Literal["cosine", "infonce"] = Field(
        "cosine", description="the feature loss: 1 - cosine, or InfoNCE over the batch (the other images' teacher "
        "features are the negatives)")
    feature_temperature: float = Field(0.1, gt=0, description="InfoNCE temperature")
    teacher_outputs: Literal["cached", "online"] = Field(
        "cached", description="cached: the teacher labels each transfer image once, before training; online: "
        "every step runs the teacher on its batch (the usual KD loop; the reference the cache is measured against)")
    views: int = Field(0, ge=0, description="cached augmented views per transfer image (FKD, Shen & Xing 2022): "
                       "K views drawn once from the task's policy, each labelled by the teacher; the student "
                       "trains on exactly those crops (0: the images as they are)")
    view_min_area: float | None = Field(None, gt=0, le=1, description="views: the random-resized crop's "
                                        "smallest area fraction (the policy's strength; 1: shift and flip only) "
                                        "[the task policy's crop_scale]")
    view_topk: int | None = Field(None, gt=0, description="views: store each view's top-k probabilities and "
                                  "spread the rest of the mass evenly over the other classes (FKD's label "
                                  "compression); None: all classes")

    @model_validator(mode="after")
    def _trains(self):
        check_execution(self)
        if self.views and self.teacher_outputs == "online":
            raise ValueError(f"distill.views={self.views} caches the teacher's soft labels of augmented views, "
                             "but distill.teacher_outputs is online: set teacher_outputs: cached or views: 0")
        if self.views and self.feature_weight > 0:
            raise ValueError(f"distill.views={self.views} caches soft labels only, not features: set "
                             "distill.feature_weight: 0 or views: 0")
        if self.budget().value == 0:
            raise ValueError(f"a distillation budget of 0 {self.budget().kind} trains nothing; set steps (or "
                             "epochs) > 0")
        return self


class FinetuneConfig(TrainConfig):
    """The student's finetune on the labels after distillation (paper 1's stage 3).

    ``keep_better``: with a held-out validation split (``labels.val_per_class``), the finetuned weights are kept
    only when their validation top-1 is higher than before finetuning (a tie keeps the weights before)
    (:func:`orchestrator.stages.finetune.finetune_keep_better`); without one it finetunes and says so.

    Budget (:class:`BudgetConfig`): default 200 optimizer steps (reported every 100), whatever the number of
    labels. The pipeline's default (``finetune:``) is 200 steps at lr 1e-3, BatchNorm statistics re-estimated,
    the task's augmentation: 10 steps at lr 1e-4 (the old 10 epochs of 100 labels) barely moved the weights and
    replaced ~65% of the BatchNorm statistics with those of the augmented (mirrored) labeled batches, which
    lowered a distilled MNIST student by 3-4 points."""

    DEFAULT_BUDGET: ClassVar[Budget] = Budget("steps", 200)

    keep_better: bool = Field(True, description="keep the finetuned weights only if validation top-1 improves")


class BaselineConfig(TrainConfig):
    """The supervised-only student trained on the labeled subset alone, in the same run."""

    enabled: bool = True
