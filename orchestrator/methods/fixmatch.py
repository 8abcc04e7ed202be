"""``fixmatch``: paper 2's semi-supervised baseline (Sohn et al., NeurIPS 2020; Borup et al., ICCV 2023
compare DistillWeighted against it): the student trained from scratch with FixMatch on the labeled target
images and the target's unlabeled train images (``fixmatch.max_unlabeled`` caps them), evaluated as the EMA
of its weights. The loop is :func:`orchestrator.stages.fixmatch.fixmatch_train` (in-process)."""
from __future__ import annotations

import numpy as np

from orchestrator.data.shards import take
from orchestrator.graph import run_stage
from orchestrator.methods.base import Method, MethodResult, register
from orchestrator.stages.compute import train_flops


def train(ctx) -> MethodResult:
    """A randomly initialised ``student`` trained by FixMatch (graph stage ``fixmatch``, not cached)."""
    import torch

    from orchestrator.models.students import create_student, student_preprocess
    from orchestrator.stages.fixmatch import fixmatch_train

    cfg, task = ctx.cfg, ctx.task
    fm = cfg.fixmatch
    pre = student_preprocess(cfg.student.id, cfg.student.model_kwargs, task)
    labeled = task.train.subset(ctx.split.labeled)
    unl = ctx.split.unlabeled
    if fm.max_unlabeled and len(unl) > fm.max_unlabeled:
        unl = np.sort(np.random.default_rng([cfg.seed, 23]).choice(unl, fm.max_unlabeled, replace=False))
    unlabeled = take(task.train.images, unl)  # image shards: a lazy view
    out: dict = {}

    def body(_, c):
        torch.manual_seed(cfg.seed)
        student = create_student(cfg.student.id, task.num_classes, pre, cfg.student.model_kwargs)
        ema, flog = fixmatch_train(student, pre, labeled, unlabeled, fm, cfg.seed, ctx.device,
                                   augment=cfg.data.augment_policy())
        per_img = train_flops(student, (pre.channels, *pre.size))
        c.images = fm.steps * fm.batch_size * (1 + 2 * fm.mu)
        c.flops = per_img * c.images
        out.update(final_loss=float(np.mean(flog["loss"][-20:])), mask_rate=float(np.mean(flog["mask_rate"][-20:])),
                   unlabeled=len(unlabeled))
        for k in range(0, len(flog["loss"]), max(1, len(flog["loss"]) // 50)):
            ctx.tracker.metrics({"fixmatch_loss": flog["loss"][k], "fixmatch_mask_rate": flog["mask_rate"][k]}, step=k)
        return ema

    student = run_stage(ctx, "fixmatch", body, after=lambda r: out).value
    return MethodResult(student, pre, cfg.student.id, cfg.student.model_kwargs,
                        {"fixmatch_mask_rate": out["mask_rate"]})


METHOD = register(Method(
    "fixmatch", train, "semi-supervised FixMatch on the target's unlabeled images (EMA student)",
    "Sohn et al., NeurIPS 2020 (arXiv 2001.07685); the baseline of Borup et al., ICCV 2023",
    "student (FixMatch)", False, ("fixmatch",)))
