"""One `kt run`: compose the stages of task-oriented knowledge transfer (Vemulapalli et al., ICML 2024):
adapt teacher -> transfer set -> teacher inference (Ray Data) -> distill (Ray Train) -> finetune -> evaluate,
plus the supervised-only student as a same-run baseline. Every stage output is keyed by its config hash."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import yaml

from orchestrator.cache import Cache
from orchestrator.config import PipelineConfig, config_hash
from orchestrator.data import TaskData, load_task_data, make_split
from orchestrator.data.splits import Split
from orchestrator.preflight import preflight
from orchestrator.run_context import Ctx, RunResult, cached_compute  # noqa: F401 (re-exported)
from orchestrator.stages.compute import Meter, StageCompute, forward_flops, train_flops

log = logging.getLogger(__name__)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def load_data(cfg: PipelineConfig) -> tuple[TaskData, Split, StageCompute]:
    """Load the task and choose its labeled subset (before any run is opened, so bad data fails fast)."""
    with Meter() as m:
        task = load_task_data(cfg.data, cfg.seed)
        split = make_split(task.train.labels, cfg.labels.label_fraction, cfg.labels.per_class, cfg.labels.seed,
                           cfg.labels.val_per_class, task.classes)
    m.result.images = len(task.train) + len(task.test)
    log.info("task: %d train (%d labeled, %d unlabeled), %d test, %d classes", len(task.train),
             len(split.labeled), len(split.unlabeled), len(task.test), task.num_classes)
    return task, split, m.result


def stage_data(ctx: Ctx, compute: StageCompute) -> None:
    ctx.tracker.artifact(ctx.split.save(ctx.run_dir / "split.json"))
    ctx.record("data", compute, labeled=len(ctx.split.labeled), unlabeled=len(ctx.split.unlabeled))


def stage_teacher(ctx: Ctx) -> tuple[str, str]:
    """Resolve the teacher id to a loadable id; builds the stand-in if needed. Returns (id, key)."""
    from orchestrator.ids import parse_model_id
    from orchestrator.standin import ensure_standin

    mid = parse_model_id(ctx.cfg.teacher.id)
    if mid.namespace == "pypi":
        from orchestrator.models.teachers import provenance_of

        provenance = provenance_of(mid)
        log.info("teacher %s: %s", mid, provenance)
        ctx.tracker.tags({"teacher.provenance": provenance})
    if mid.namespace != "standin":
        return ctx.cfg.teacher.id, config_hash({"id": ctx.cfg.teacher.id, "kw": ctx.cfg.teacher.model_kwargs})
    with Meter() as m:
        info = ensure_standin(ctx.cfg, ctx.task, ctx.split, ctx.cache, ctx.device)
    ctx.tracker.tags({"standin": info.meta["provenance"]})
    ctx.record("standin", m.result, info.cache_hit, linear_probe_top1=info.meta["linear_probe_top1"],
               build_seconds=info.meta["build_seconds"])
    return f"checkpoint/{info.checkpoint}", info.checkpoint.parent.name


def stage_adapt(ctx: Ctx, teacher_id: str, teacher_key: str) -> tuple[Path, str]:
    """Adapt the teacher on the labeled subset (cached). Returns (adapted checkpoint, key)."""
    from orchestrator.models.teachers import load_model_checkpoint, load_teacher, save_model_checkpoint
    from orchestrator.stages.adapt_teacher import adapt_teacher
    from orchestrator.stages.evaluate import evaluate, plot_confusion

    cfg, task = ctx.cfg, ctx.task
    key = config_hash({"teacher": teacher_key, "split": ctx.split.key(), "data": task.train.content_hash(),
                       "adapt": cfg.teacher.model_dump(mode="json", exclude={
                           "inference_batch_size", "inference_actors", "inference_gpus"})})
    labeled = task.train.subset(ctx.split.labeled)
    hit = ctx.cache.lookup("adapted_teacher", key)
    fwd = None
    if hit is None:
        meta: dict = {"teacher": teacher_id}
        with ctx.cache.write("adapted_teacher", key, meta) as tmp:
            with Meter() as m:
                teacher = load_teacher(teacher_id, cfg.teacher.model_kwargs)
                adapt_teacher(teacher, labeled, task.num_classes, cfg.teacher, cfg.seed, ctx.device)
            fwd = forward_flops(teacher, (teacher.preprocess.channels, *teacher.preprocess.size))
            # probe features once, then (LP-FT) finetune epochs at ~3x a forward pass each
            ft_images = len(labeled) * cfg.teacher.finetune.epochs if cfg.teacher.adapt == "finetune" else 0
            m.result.images = len(labeled) + ft_images
            m.result.flops = fwd * len(labeled) + 3 * fwd * ft_images
            meta["compute"] = m.result.to_dict()
            save_model_checkpoint(teacher, tmp / "teacher.pt", task.classes)
    ckpt = ctx.cache.path("adapted_teacher", key) / "teacher.pt"
    teacher = load_model_checkpoint(ckpt)
    fwd = fwd or forward_flops(teacher, (teacher.preprocess.channels, *teacher.preprocess.size))
    compute = cached_compute(ckpt.parent)
    with Meter() as me:
        res = evaluate(teacher, teacher.preprocess, task.test, task.num_classes, task.classes, device=ctx.device)
    ctx.tracker.artifact(plot_confusion(res, ctx.run_dir / "confusion_teacher.png", f"adapted teacher {res.top1:.4f}"))
    ctx.record("adapt_teacher", compute, hit is not None, top1=res.top1, forward_flops_per_image=fwd,
               params=_params(teacher), eval_seconds=me.result.wall_seconds)
    ctx.table.append({"model": teacher_id, "role": f"teacher ({cfg.teacher.adapt})", "top1": res.top1,
                      "flops": fwd, "params": _params(teacher)})
    ctx.teacher_flops = fwd
    ctx.adapted = ckpt
    return ckpt, key


def stage_transfer_set(ctx: Ctx, teacher: tuple[str, str], adapted: Path, adapted_key: str):
    """Build the transfer set with its source plug-in; log its size, provenance and (pool sources) manifest."""
    from orchestrator.ids import parse_model_id
    from orchestrator.stages.transfer_sets import TransferContext, build_transfer_set

    cfg = ctx.cfg
    kwargs = {} if parse_model_id(teacher[0]).namespace == "checkpoint" else cfg.teacher.model_kwargs
    tctx = TransferContext(ctx.task, ctx.split, ctx.cache, teacher[0], teacher[1], kwargs, adapted, adapted_key,
                           ctx.actor_gpus())
    with Meter() as mt:
        ts = build_transfer_set(tctx, cfg.transfer_set)
    ctx.record("transfer_set", mt.result, size=len(ts), **ts.info)
    ctx.tracker.tags({"transfer_set.source": ts.source, "transfer_set.key": ts.key})
    if ts.manifest is not None:
        ctx.tracker.artifact(ts.manifest, "transfer_set")
    log.info("transfer set: %s (key %s)", ts.description, ts.key)
    return ts, tctx


def stage_teacher_outputs(ctx: Ctx, ts, adapted: Path, adapted_key: str, stage: str = "teacher_inference") -> Path:
    """The adapted teacher's logits on a transfer set (cached; Ray Data). Returns the entry dir."""
    from orchestrator.ray_adapters.data import teacher_inference

    cfg = ctx.cfg
    if cfg.distill.teacher_outputs == "online":  # the teacher's compute is counted in the distill stage
        entry = stage_transfer_images(ctx, ts)
        ctx.record(stage, StageCompute(), None, teacher_forward_passes=0)
        return entry
    key = config_hash({"teacher": adapted_key, "transfer_set": ts.key, "outputs": ["logits", "features"]})
    hit = ctx.cache.lookup("teacher_outputs", key)
    forward_passes = 0
    if hit is None:
        log.info("teacher inference over %d images (%d Ray Data actors)", len(ts), cfg.teacher.inference_actors)
        meta: dict = {"transfer_set": ts.description}
        with ctx.cache.write("teacher_outputs", key, meta) as tmp:
            with Meter(devices=cfg.teacher.inference_actors) as m:
                logits, feats = teacher_inference(str(adapted), ts.images, tmp / "shards",
                                                  cfg.teacher.inference_batch_size, cfg.teacher.inference_actors,
                                                  ctx.actor_gpus(), features=True)
            m.result.images = forward_passes = len(ts)
            m.result.flops = ctx.teacher_flops * len(ts)
            meta["compute"] = m.result.to_dict()
            np.save(tmp / "logits.npy", logits)
            np.save(tmp / "features.npy", feats)  # (N, D) float16: the feature loss's targets
            np.save(tmp / "images.npy", ts.images)
    else:
        log.info("teacher outputs cache hit (%s): teacher inference skipped", key)
    entry = ctx.cache.path("teacher_outputs", key)
    ctx.record(stage, cached_compute(entry), hit is not None, teacher_forward_passes=forward_passes)
    return entry


def stage_transfer_images(ctx: Ctx, ts) -> Path:
    """Online distillation: only the transfer images are stored (cached by the transfer set's key); the
    teacher runs inside every training step instead. Returns the entry dir (images.npy)."""
    if ctx.cache.lookup("transfer_images", ts.key) is None:
        with ctx.cache.write("transfer_images", ts.key, {"transfer_set": ts.description}) as tmp:
            np.save(tmp / "images.npy", ts.images)
    return ctx.cache.path("transfer_images", ts.key)


def stage_distill(ctx: Ctx, outputs: Path, stage: str = "distill", run_name: str | None = None,
                  storage: Path | None = None, callbacks: list | None = None, extra_metrics: dict | None = None):
    """Distill on the transfer set with Ray Train. Returns the student (nn.Module) and its preprocess.

    ``outputs``: a teacher-outputs entry (images.npy, logits.npy) or, online, a transfer-images entry.
    ``run_name``/``storage``: the Ray Train run (default: keyed by the recipe under ``<storage>/ray_results``);
    ``callbacks``/``extra_metrics``: passed to :func:`orchestrator.ray_adapters.train.distill_ray`."""

    from orchestrator.models.students import create_student, student_preprocess
    from orchestrator.ray_adapters.train import distill_ray
    from orchestrator.stages.distill import steps_per_epoch, student_state
    from orchestrator.storage import join

    cfg, task = ctx.cfg, ctx.task
    pre = student_preprocess(cfg.student.id, cfg.student.model_kwargs, task)
    labeled = task.train.subset(ctx.split.labeled)
    val = task.train.subset(ctx.split.val) if len(ctx.split.val) else None
    # workers on any node find the teacher outputs in the shared cache; the few labeled images travel inline
    data = {**ctx.cache_ref(outputs), "labeled": {"images": labeled.images, "labels": labeled.labels},
            "val": {"images": val.images, "labels": val.labels} if val is not None else None}
    key = config_hash({"outputs": outputs.name, "student": cfg.student.model_dump(mode="json"),
                       "distill": cfg.distill.model_dump(mode="json"), "seed": cfg.seed, "split": ctx.split.key()})
    n = len(np.load(outputs / "images.npy", mmap_mode="r"))
    world = cfg.distill.num_workers
    with Meter(devices=world) as m:
        state, tlog = distill_ray(
            data, cfg.student.id, cfg.student.model_kwargs, task.num_classes, pre.to_dict(),
            cfg.distill.model_dump(mode="json"), cfg.seed, storage or join(cfg.storage_uri(), "ray_results"),
            run_name or f"distill-{key}", world, cfg.distill.use_gpu, cpus_per_worker=ctx.cpus_per_worker,
            teacher_checkpoint={**ctx.cache_ref(ctx.adapted.parent), "file": ctx.adapted.name} if ctx.adapted else None,
            callbacks=callbacks, extra_metrics=extra_metrics)
    student = create_student(cfg.student.id, task.num_classes, pre, cfg.student.model_kwargs)
    student.load_state_dict(student_state(state))
    per_img = train_flops(student, (pre.channels, *pre.size))
    epochs = len(tlog["loss"])  # all epochs of this training, including those before a resume
    per_step = cfg.distill.batch_size + (min(cfg.distill.batch_size, len(labeled)) if cfg.distill.ce_weight else 0)
    m.result.images = steps_per_epoch(n, cfg.distill, world) * world * per_step * epochs
    m.result.flops = per_img * m.result.images
    m.result.device_seconds = sum(tlog["seconds"]) * world
    online = cfg.distill.teacher_outputs == "online"
    teacher_passes = steps_per_epoch(n, cfg.distill, world) * world * cfg.distill.batch_size * epochs if online else 0
    m.result.flops += ctx.teacher_flops * teacher_passes
    for e, loss in enumerate(tlog["loss"]):
        ctx.tracker.metrics({f"{stage}_loss": loss, **({f"{stage}_val_top1": tlog["val_top1"][e]}
                                                        if len(tlog.get("val_top1", [])) > e else {})}, step=e)
    ctx.record(stage, m.result, None, epochs=epochs, resumed_at_epoch=max(tlog["starts"]),
               restarts=len(tlog["starts"]) - 1, final_loss=tlog["loss"][-1], train_flops_per_image=per_img,
               teacher_forward_passes=teacher_passes)
    return student.to(ctx.device), pre


def stage_supervised(ctx: Ctx, name: str, student, pre, train_cfg):
    """Train ``student`` on the labeled subset (finetune or baseline); returns it."""
    from orchestrator.stages.loop import train_supervised

    labeled = ctx.task.train.subset(ctx.split.labeled)
    with Meter() as m:
        hist = train_supervised(student, pre, labeled, train_cfg, ctx.cfg.seed, ctx.device)
    m.result.images = len(labeled) * train_cfg.epochs
    m.result.flops = train_flops(student, (pre.channels, *pre.size)) * m.result.images
    for e, loss in enumerate(hist):
        ctx.tracker.metrics({f"{name}_loss": loss}, step=e)
    ctx.record(name, m.result, None, final_loss=hist[-1] if hist else float("nan"))
    return student


def stage_random_control(ctx: Ctx, tctx, size: int, adapted: Path, adapted_key: str) -> float:
    """Retrieval's control arm: distill the same student on a same-size random sample of the same pool (same
    seed, same run) and evaluate it. Returns its top-1."""
    from orchestrator.retrieval import random_pool_sample

    with Meter() as mt:
        ts = random_pool_sample(tctx, ctx.cfg.transfer_set, size)
    ctx.record("transfer_set_random", mt.result, size=len(ts), **ts.info)
    outputs = stage_teacher_outputs(ctx, ts, adapted, adapted_key, "teacher_inference_random")
    student, pre = stage_distill(ctx, outputs, "distill_random")
    return stage_evaluate(ctx, "random_control", "student (distilled on a random pool sample)", student, pre)


def stage_evaluate(ctx: Ctx, name: str, role: str, student, pre) -> float:
    from orchestrator.stages.evaluate import evaluate, plot_confusion

    task = ctx.task
    with Meter() as m:
        res = evaluate(student, pre, task.test, task.num_classes, task.classes, device=ctx.device)
    m.result.images = len(task.test)
    fwd = forward_flops(student, (pre.channels, *pre.size))
    m.result.flops = fwd * len(task.test)
    ctx.tracker.artifact(plot_confusion(res, ctx.run_dir / f"confusion_{name}.png", f"{role} {res.top1:.4f}"))
    ctx.tracker.metrics(res.metrics(f"{name}."))
    ctx.record(f"evaluate_{name}", m.result, None, top1=res.top1)
    ctx.table.append({"model": ctx.cfg.student.id, "role": role, "top1": res.top1, "flops": fwd,
                      "params": _params(student)})
    return res.top1


def run(config: PipelineConfig) -> RunResult:
    """Run the whole pipeline for a validated config on local Ray (or ``$RAY_ADDRESS``), tracked in MLflow.

    Raises ConfigError/DataError/ModelLoadError/UnknownNameError for bad input (before heavy work where
    possible), ray.train.TrainingFailedError if distillation fails after retries.
    """
    import torch

    from orchestrator.models.export import export_deployable
    from orchestrator.models.students import create_student
    from orchestrator.tracking import Tracker, default_tracking_uri

    cfg = config
    storage = cfg.storage_path()
    storage.mkdir(parents=True, exist_ok=True)
    preflight(cfg)
    task, split, data_compute = load_data(cfg)
    uri = cfg.tracking.tracking_uri or default_tracking_uri(storage)
    tracker = Tracker(uri, cfg.tracking.experiment, storage / "mlartifacts")
    run_dir = storage / "runs" / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ctx = Ctx(cfg, Cache(cfg.storage_uri()), tracker, run_dir, device, task, split)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    t0 = time.perf_counter()
    with tracker.run(cfg.name, tags={"teacher": cfg.teacher.id, "student": cfg.student.id,
                                     "transfer_set.source": cfg.transfer_set.source}) as parent:
        from orchestrator.tracking import flatten

        tracker.params(flatten(cfg.model_dump(mode="json", exclude={"smoke"})))
        tracker.artifact(run_dir / "config.yaml")
        stage_data(ctx, data_compute)
        teacher_id, teacher_key = stage_teacher(ctx)
        adapted, adapted_key = stage_adapt(ctx, teacher_id, teacher_key)
        ts, tctx = stage_transfer_set(ctx, (teacher_id, teacher_key), adapted, adapted_key)
        outputs = stage_teacher_outputs(ctx, ts, adapted, adapted_key)
        student, pre = stage_distill(ctx, outputs)
        distilled_top1 = stage_evaluate(ctx, "distilled", "student (distilled)", student, pre)
        rcfg = cfg.transfer_set.retrieval
        if cfg.transfer_set.source == "retrieval" and rcfg is not None and rcfg.random_control:
            random_top1 = stage_random_control(ctx, tctx, len(ts), adapted, adapted_key)
            ctx.metrics.update({"random_control_top1": random_top1,
                                "retrieval_gain_over_random": distilled_top1 - random_top1})
        ts_key = ts.key
        del ts
        student = stage_supervised(ctx, "finetune", student, pre, cfg.finetune)
        student_top1 = stage_evaluate(ctx, "student", "student (distilled + finetuned)", student, pre)
        lineage = {"method": "task_oriented", "task": cfg.name, "teacher": teacher_id,
                   "adapted_teacher.key": adapted_key, "transfer_set.source": cfg.transfer_set.source, "transfer_set.key": ts_key,
                   "teacher_outputs.key": outputs.name, "test_top1": student_top1,
                   "student_flops": ctx.table[-1]["flops"], "student_params": ctx.table[-1]["params"]}
        files, model_parts = export_deployable(student, pre, run_dir / "student", model_id=cfg.student.id,
                                               model_kwargs=cfg.student.model_kwargs, classes=task.classes,
                                               test_images=task.test.images, lineage=lineage)
        for p in files:
            tracker.artifact(p, "student")
        model_uri = tracker.model(model_parts) if model_parts else None
        if cfg.baseline.enabled:
            torch.manual_seed(cfg.seed)
            base = create_student(cfg.student.id, ctx.task.num_classes, pre, cfg.student.model_kwargs).to(ctx.device)
            base = stage_supervised(ctx, "baseline", base, pre, cfg.baseline)
            base_top1 = stage_evaluate(ctx, "baseline", "student (supervised-only)", base, pre)
            ctx.metrics["gain_over_supervised"] = student_top1 - base_top1
        transfer_keys = ["adapt_teacher", "teacher_inference", "distill", "finetune"]
        ctx.metrics.update({
            "student_top1": student_top1, "distilled_top1": distilled_top1,
            "teacher_top1": ctx.stages["adapt_teacher"]["top1"],
            "transfer_flops_total": sum(ctx.stages[k]["flops"] for k in transfer_keys),
            "transfer_device_seconds_total": sum(ctx.stages[k]["device_seconds"] for k in transfer_keys),
            "transfer_images_total": sum(ctx.stages[k]["images"] for k in transfer_keys),
            "wall_seconds_total": time.perf_counter() - t0,
            **{k: float(v) for k, v in ctx.cache.counters().items()},
        })
        tracker.metrics({k: v for k, v in ctx.metrics.items() if "." not in k})
        (run_dir / "result.json").write_text(json.dumps({"table": ctx.table, "metrics": ctx.metrics, "run_id": (
            parent.info.run_id), "tracking_uri": uri, "student": {"files": [p.name for p in files],
                                                                  "model_uri": model_uri}}, indent=1))
        tracker.artifact(run_dir / "result.json")
        return RunResult(parent.info.run_id, uri, run_dir, ctx.table, ctx.metrics, ctx.stages)
