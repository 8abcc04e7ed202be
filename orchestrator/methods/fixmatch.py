"""``fixmatch``: paper 2's semi-supervised baseline (Sohn et al., NeurIPS 2020; Borup et al., ICCV 2023
compare DistillWeighted against it): the student trained from scratch with FixMatch on the labeled target
images and the target's unlabeled train images (``fixmatch.max_unlabeled`` caps them), evaluated as the EMA
of its weights; its budget in images seen matches the task's distillation unless set (:func:`fixmatch_budget`),
and its EMA's test top-1 is logged over the steps (``fixmatch.curve_points``). The loop is :func:`orchestrator.stages.fixmatch.fixmatch_train` (in-process)."""
from __future__ import annotations

import numpy as np

from orchestrator.data.shards import take
from orchestrator.graph import run_stage
from orchestrator.methods.base import Method, MethodResult, register
from orchestrator.stages.compute import train_flops


def fixmatch_budget(ctx) -> tuple[int, int]:
    """FixMatch's (optimizer steps, images seen): ``fixmatch.steps``; else the fewest steps whose labeled +
    unlabeled images ((1 + mu) x batch_size per step) reach ``fixmatch.images_seen``, or by default the images the
    task's distillation sees (its plan's steps x workers x (transfer batch + the labeled batch when
    ``ce_weight > 0``), the plan over the target's unlabeled images capped by ``transfer_set.max_images``, times
    ``distill.views``; a steps budget does not depend on that size)."""
    import math

    from orchestrator.ray_adapters.loop_session import resolve_execution
    from orchestrator.stages.schedule import distill_plan

    cfg = ctx.cfg
    fm, d = cfg.fixmatch, cfg.distill
    per_step = fm.batch_size * (1 + fm.mu)
    if fm.steps is not None:
        return fm.steps, fm.steps * per_step
    target = fm.images_seen
    if target is None:
        n = len(ctx.split.unlabeled)
        n = min(n, cfg.transfer_set.max_images or n) * max(1, d.views)
        world = 1 if resolve_execution(d.execution, d.num_workers, d.use_gpu) == "in_process" else d.num_workers
        labeled = min(d.batch_size, len(ctx.split.labeled)) if d.ce_weight > 0 else 0
        target = distill_plan(n, d, world).images(per_step=d.batch_size + labeled)
    steps = max(1, math.ceil(target / per_step))
    return steps, steps * per_step


def train(ctx) -> MethodResult:
    """A randomly initialised ``student`` trained by FixMatch (graph stage ``fixmatch``, not cached)."""
    import torch

    from orchestrator.models.students import create_student, student_preprocess
    from orchestrator.stages.evaluate import evaluate
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

    steps, images_seen = fixmatch_budget(ctx)

    def test_top1(model) -> float:
        return evaluate(model, pre, task.test, task.num_classes, device=ctx.device).top1

    def body(_, c):
        torch.manual_seed(cfg.seed)
        student = create_student(cfg.student.id, task.num_classes, pre, cfg.student.model_kwargs)
        ema, flog = fixmatch_train(student, pre, labeled, unlabeled, fm, steps, cfg.seed, ctx.device,
                                   augment=cfg.data.augment_policy(), evaluate=test_top1 if fm.curve_points else None)
        per_img = train_flops(student, (pre.channels, *pre.size))
        c.images = steps * fm.batch_size * (1 + 2 * fm.mu)  # forward/backward passes: the unlabeled ones twice
        c.flops = per_img * c.images
        out.update(final_loss=float(np.mean(flog["loss"][-20:])), mask_rate=float(np.mean(flog["mask_rate"][-20:])),
                   unlabeled=len(unlabeled), steps=steps, images_seen=flog["images_seen"],
                   images_seen_budget=images_seen, curve=flog["curve"])  # curve: a list, not logged as a number
        for k in range(0, len(flog["loss"]), max(1, len(flog["loss"]) // 50)):
            ctx.tracker.metrics({"fixmatch_loss": flog["loss"][k], "fixmatch_mask_rate": flog["mask_rate"][k]}, step=k)
        for step, top1 in flog["curve"]:
            ctx.tracker.metrics({"fixmatch_test_top1": top1}, step=step)
        return ema

    student = run_stage(ctx, "fixmatch", body, after=lambda r: out).value
    return MethodResult(student, pre, cfg.student.id, cfg.student.model_kwargs,
                        {"fixmatch_mask_rate": out["mask_rate"]})


METHOD = register(Method(
    "fixmatch", train, "semi-supervised FixMatch on the target's unlabeled images (EMA student)",
    "Sohn et al., NeurIPS 2020 (arXiv 2001.07685); the baseline of Borup et al., ICCV 2023",
    "student (FixMatch)", False, ("fixmatch",)))
