"""Shared student stages: distillation on Ray Train, supervised training on the labels, evaluation."""
from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

from orchestrator.config import TrainConfig
from orchestrator.data.shards import open_images
from orchestrator.graph import run_stage
from orchestrator.methods.common import params
from orchestrator.run_context import Ctx
from orchestrator.stages.compute import StageCompute, forward_flops, train_flops

log = logging.getLogger(__name__)


def stage_distill(ctx: Ctx, outputs: Path, name: str = "distill", record_as: str | None = None):
    """Distill on the transfer set (stage ``name`` of the graph: ``distill`` or ``feature_distill``), in this
    process or on a Ray Train worker group (``distill.execution``/``num_workers``:
    :func:`orchestrator.ray_adapters.loop_session.resolve_execution`; the log, the stage record and the run's
    ``<stage>.execution_used`` param say which ran). Returns the student (nn.Module, on ``ctx.device``) and its
    preprocess.

    ``outputs``: a teacher-outputs entry (images.npy, logits.npy, features.npy; online: images.npy only).
    ``ctx.train_hooks`` may hold the ``run_name`` (default ``<name>-<key>``, so a re-run resumes it),
    ``storage``, ``callbacks``, ``report`` and ``extra_metrics`` (see
    :func:`orchestrator.ray_adapters.train.distill_ray`)."""
    from orchestrator.models.students import create_student, student_preprocess
    from orchestrator.ray_adapters.loop_session import resolve_execution
    from orchestrator.ray_adapters.train import EPOCH_HISTORY, distill_ray
    from orchestrator.stages.distill import student_state
    from orchestrator.stages.schedule import distill_plan
    from orchestrator.storage import join

    cfg, task, hooks = ctx.cfg, ctx.task, ctx.train_hooks
    pre = student_preprocess(cfg.student.id, cfg.student.model_kwargs, task)
    labeled = task.train.subset(ctx.split.labeled)
    val = task.train.subset(ctx.split.val) if len(ctx.split.val) else None
    # workers on any node find the teacher outputs in the shared cache; the few labeled images travel inline
    data = {**ctx.cache_ref(outputs), "labeled": {"images": labeled.images, "labels": labeled.labels},
            "val": {"images": val.images, "labels": val.labels} if val is not None else None}
    n = len(open_images(outputs)) * max(1, cfg.distill.views)  # the items of the budget's passes: images or views
    mode = resolve_execution(cfg.distill.execution, cfg.distill.num_workers, cfg.distill.use_gpu)
    world = 1 if mode == "in_process" else cfg.distill.num_workers
    online = cfg.distill.teacher_outputs == "online"
    ctx.tracker.params({f"{name}.execution_used": mode})
    out: dict = {}

    def body(_, c: StageCompute):
        key = ctx.keys[name]
        run_name = hooks.get("run_name") or f"{name}-{key}"
        # two runs of this node with the same key would share the Ray Train run dir: the second waits, then resumes
        # the finished run from its last checkpoint (a sweep trial's run is named after the trial: no lock)
        with ctx.cache.lock(f"ray_train-{name}", key) if not hooks.get("run_name") else nullcontext():
            state, tlog = distill_ray(
                data, cfg.student.id, cfg.student.model_kwargs, task.num_classes, pre.to_dict(),
                cfg.distill.model_dump(mode="json"), cfg.seed,
                hooks.get("storage") or join(cfg.storage_uri(), "ray_results"), run_name, cfg.distill.num_workers,
                cfg.distill.use_gpu, cpus_per_worker=ctx.cpus_per_worker,
                teacher_checkpoint={**ctx.cache_ref(ctx.adapted.parent), "file": ctx.adapted.name} if online else None,
                callbacks=hooks.get("callbacks"), report=hooks.get("report"),
                extra_metrics={**(hooks.get("extra_metrics") or {}), "kt_execution": mode},
                augment=cfg.data.augment_policy().model_dump(mode="json"), execution=mode,
                label=f"trial {hooks['run_name']}" if hooks.get("run_name") else None)
        student = create_student(cfg.student.id, task.num_classes, pre, cfg.student.model_kwargs)
        student.load_state_dict(student_state(state))
        per_img = train_flops(student, (pre.channels, *pre.size))
        epochs = len(tlog["loss"])  # all epochs of this training, including those before a resume
        plan = distill_plan(n, cfg.distill, world)
        per_step = cfg.distill.batch_size + (min(cfg.distill.batch_size, len(labeled)) if cfg.distill.ce_weight else 0)
        c.images = plan.images(epochs, per_step)
        teacher_passes = plan.images(epochs) if online else 0
        c.flops = per_img * c.images + ctx.teacher_flops * teacher_passes
        c.device_seconds = sum(tlog["seconds"]) * world
        for e, loss in enumerate(tlog["loss"]):
            vt = tlog.get("val_top1", [])
            ctx.tracker.metrics({f"{name}_loss": loss, **({f"{name}_val_top1": vt[e]} if len(vt) > e else {})}, step=e)
        out.update(execution=mode, epochs=epochs, resumed_at_epoch=max(tlog["starts"]),
                   restarts=len(tlog["starts"]) - 1,
                   final_loss=tlog["loss"][-1], train_flops_per_image=per_img, teacher_forward_passes=teacher_passes,
                   per_epoch={k: tlog[k] for k in EPOCH_HISTORY if k in tlog})  # lists, not logged as numbers
        return student

    run = run_stage(ctx, name, body, devices=world, record_as=record_as or name, after=lambda r: out)
    return run.value.to(ctx.device), pre


def stage_train(ctx: Ctx, name: str, student, pre, train_cfg: TrainConfig, record_as: str | None = None,
                finetune: bool = False):
    """Train ``student`` with cross-entropy on the labeled subset with the task's augmentation (graph stage
    ``name``: a method's finetune or the supervised-only baseline). With ``finetune``, the finetuned weights are
    kept only when validation top-1 improves (:func:`orchestrator.stages.finetune.finetune_keep_better`;
    ``finetune.keep_better``), and the record says which were kept. Returns the student."""
    from orchestrator.stages.finetune import finetune_keep_better
    from orchestrator.stages.loop import train_supervised
    from orchestrator.stages.schedule import supervised_plan

    labeled = ctx.task.train.subset(ctx.split.labeled)
    val = ctx.task.train.subset(ctx.split.val) if len(ctx.split.val) else None
    augment = ctx.cfg.data.augment_policy()
    hist: list[float] = []
    extra: dict = {}

    def body(_, c: StageCompute):
        nonlocal student
        if finetune:
            student, rep = finetune_keep_better(student, pre, labeled, val, train_cfg, ctx.cfg.seed, ctx.device,
                                                augment=augment)
            hist.extend(rep.losses)
            extra.update(rep.metrics(""))
            log.info("%s: %s", record_as or name, rep.reason)
        else:
            hist.extend(train_supervised(student, pre, labeled, train_cfg, ctx.cfg.seed, ctx.device, augment=augment))
        c.images = supervised_plan(len(labeled), train_cfg).images()
        c.flops = train_flops(student, (pre.channels, *pre.size)) * c.images
        return student

    label = record_as or name
    run = run_stage(ctx, name, body, record_as=label,
                    after=lambda r: {"final_loss": hist[-1] if hist else float("nan"), **extra})
    for e, loss in enumerate(hist):
        ctx.tracker.metrics({f"{label}_loss": loss}, step=e)
    return run.value


def stage_evaluate(ctx: Ctx, name: str, role: str, student, pre, model_id: str | None = None) -> float:
    """Top-1 of ``student`` on the test split (and on the held-out validation split, when there is one, as
    ``ctx.stages['evaluate_<name>']['val_top1']``); a confusion-matrix artifact and a row of ``ctx.table``.
    Returns the test top-1 (float in [0, 1])."""
    from orchestrator.stages.compute import Meter
    from orchestrator.stages.evaluate import evaluate, plot_confusion

    task = ctx.task
    with Meter() as m:
        res = evaluate(student, pre, task.test, task.num_classes, task.classes, device=ctx.device)
        val = (evaluate(student, pre, task.train.subset(ctx.split.val), task.num_classes, device=ctx.device).top1
               if len(ctx.split.val) else None)
    m.result.images = len(task.test)
    fwd = forward_flops(student, (pre.channels, *pre.size))
    m.result.flops = fwd * len(task.test)
    if ctx.plots:
        ctx.tracker.artifact(plot_confusion(res, ctx.run_dir / f"confusion_{name}.png", f"{role} {res.top1:.4f}"))
    ctx.tracker.metrics(res.metrics(f"{name}."))
    ctx.record(f"evaluate_{name}", m.result, None, top1=res.top1, **({"val_top1": val} if val is not None else {}))
    ctx.table.append({"model": model_id or ctx.cfg.student.id, "role": role, "top1": res.top1, "flops": fwd,
                      "params": params(student)})
    return res.top1


def stage_random_control(ctx: Ctx, size: int) -> float:
    """Retrieval's control arm: distill the same student on a same-size random sample of the same pool (same
    seed, same run) and evaluate it. Returns its top-1."""
    from orchestrator.methods.common import stage_teacher_outputs, transfer_context
    from orchestrator.transfer_sets.retrieval import random_pool_sample

    from orchestrator.stages.compute import Meter

    keys = dict(ctx.keys)
    with Meter() as mt:
        ts = random_pool_sample(transfer_context(ctx), ctx.cfg.transfer_set, size)
    run_stage(ctx, "transfer_set", content={"images": ts.key, "control": "random"}, measured=mt.result,
              record_as="transfer_set_random", after=lambda r: {"size": len(ts), **ts.info})
    outputs = stage_teacher_outputs(ctx, ts, "teacher_inference_random")
    student, pre = stage_distill(ctx, outputs, "distill", record_as="distill_random")
    top1 = stage_evaluate(ctx, "random_control", "student (distilled on a random pool sample)", student, pre)
    ctx.keys = keys  # the control arm's keys do not replace the main arm's
    return top1

