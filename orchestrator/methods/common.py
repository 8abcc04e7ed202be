"""The shared stages every method composes, each run through :func:`orchestrator.graph.run_stage` (one key
derivation, cache lookup, atomic write, compute meter and record): teacher, adaptation, transfer set, teacher
outputs, distillation (Ray Train), supervised training and evaluation."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from orchestrator.config import PipelineConfig, config_hash
from orchestrator.data import TaskData, load_task_data, make_split
from orchestrator.data.shards import save_images
from orchestrator.data.splits import Split
from orchestrator.graph import run_stage, stage_key
from orchestrator.run_context import Ctx
from orchestrator.stages.compute import Meter, StageCompute, forward_flops

log = logging.getLogger(__name__)


def params(model) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def student_arch(cfg: PipelineConfig) -> tuple[str, dict]:
    """The (model id, model kwargs) of the student the configured method trains (``pretrained_init`` trains
    its pretrained architecture; every other method ``student``)."""
    if cfg.method == "pretrained_init":
        return cfg.pretrained_init.id, cfg.pretrained_init.model_kwargs
    return cfg.student.id, cfg.student.model_kwargs


def load_data(cfg: PipelineConfig) -> tuple[TaskData, Split, StageCompute]:
    """Load the task and choose its labeled subset (before any run is opened, so bad data fails fast)."""
    with Meter() as m:
        task = load_task_data(cfg.data, cfg.seed, cfg.storage_uri(), ingest_runner(cfg))
        split = make_split(task.train.labels, cfg.labels.label_fraction, cfg.labels.per_class, cfg.labels.seed,
                           cfg.labels.val_per_class, task.classes)
    m.result.images = len(task.train) + len(task.test)
    log.info("task: %d train (%d labeled, %d unlabeled), %d test, %d classes", len(task.train),
             len(split.labeled), len(split.unlabeled), len(task.test), task.num_classes)
    return task, split, m.result


def ingest_runner(cfg: PipelineConfig):
    """What checks an ImageFolder's files on first use (``data.ingest``: :func:`~orchestrator.ray_adapters.ingest
    .runner_for`), or None for formats that ingest no files."""
    if cfg.data.format != "image_folder":
        return None
    from orchestrator.ray_adapters.ingest import runner_for

    return runner_for(cfg.data.ingest)


def stage_data(ctx: Ctx, compute: StageCompute) -> None:
    """Key the task's images and labeled split (the root of the graph); save the split as an artifact."""
    ctx.tracker.artifact(ctx.split.save(ctx.run_dir / "split.json"))
    run_stage(ctx, "data", content={"train": ctx.task.train.content_hash(), "split": ctx.split.key()},
              measured=compute, after=lambda r: {"labeled": len(ctx.split.labeled),
                                                 "unlabeled": len(ctx.split.unlabeled)})


def stage_teacher(ctx: Ctx) -> str:
    """Resolve the teacher id to a loadable id (building the stand-in if needed); sets ``ctx.teacher_id``."""
    from orchestrator.ids import parse_model_id
    from orchestrator.methods.base import BUILDERS

    mid = parse_model_id(ctx.cfg.teacher.id)
    if mid.namespace == "pypi":
        from orchestrator.models.teachers import provenance_of

        provenance = provenance_of(mid)
        log.info("teacher %s: %s", mid, provenance)
        ctx.tracker.tags({"teacher.provenance": provenance})
    if mid.namespace != "standin":
        run_stage(ctx, "teacher", record=False)
        ctx.teacher_id = ctx.cfg.teacher.id
        return ctx.teacher_id
    with Meter() as m:
        info = BUILDERS.get("standin")(ctx.cfg, ctx.task, ctx.split, ctx.cache, ctx.device)
    ctx.tracker.tags({"standin": info.meta["provenance"]})
    run_stage(ctx, "teacher", content={"standin": info.checkpoint.parent.name}, measured=m.result,
              record_as="standin", hit=info.cache_hit,
              after=lambda r: {"linear_probe_top1": info.meta["linear_probe_top1"],
                               "build_seconds": info.meta["build_seconds"]})
    ctx.teacher_id = f"checkpoint/{info.checkpoint}"
    return ctx.teacher_id


def teacher_kwargs(ctx: Ctx) -> dict:
    """The teacher's model kwargs (a checkpoint carries its own)."""
    from orchestrator.ids import parse_model_id

    return {} if parse_model_id(ctx.teacher_id).namespace == "checkpoint" else ctx.cfg.teacher.model_kwargs


def stage_adapt(ctx: Ctx) -> Path:
    """Adapt the teacher on the labeled subset and evaluate it on the test split, both cached (the entry holds
    ``teacher.pt`` and ``test_eval.npz``). Sets and returns ``ctx.adapted`` (the adapted checkpoint)."""
    from orchestrator.models.teachers import load_model_checkpoint, load_teacher, save_model_checkpoint
    from orchestrator.stages.adapt_teacher import adapt_teacher
    from orchestrator.stages.evaluate import EvalResult, evaluate, plot_confusion
    from orchestrator.stages.schedule import supervised_plan

    cfg, task = ctx.cfg, ctx.task
    labeled = task.train.subset(ctx.split.labeled)
    seed = cfg.seed if cfg.teacher.seed is None else cfg.teacher.seed

    def test_eval(teacher) -> tuple[EvalResult, float]:
        with Meter() as me:
            res = evaluate(teacher, teacher.preprocess, task.test, task.num_classes, task.classes, device=ctx.device)
        return res, me.result.wall_seconds

    def body(tmp: Path, c: StageCompute) -> dict:
        with Meter() as me:
            teacher = load_teacher(ctx.teacher_id, teacher_kwargs(ctx))
            adapt_teacher(teacher, labeled, task.num_classes, cfg.teacher, seed, ctx.device,
                          augment=cfg.data.augment_policy())
        fwd = forward_flops(teacher, (teacher.preprocess.channels, *teacher.preprocess.size))
        # probe features once, then (LP-FT) finetune epochs at ~3x a forward pass each
        ft = cfg.teacher.adapt == "finetune"
        ft_images = supervised_plan(len(labeled), cfg.teacher.finetune).images() if ft else 0
        c.images, c.flops = len(labeled) + ft_images, fwd * len(labeled) + 3 * fwd * ft_images
        c.device_seconds = me.result.wall_seconds  # the adaptation's, not the test evaluation's below
        save_model_checkpoint(teacher, tmp / "teacher.pt", task.classes)
        # the test evaluation travels with the entry: every later method and seed reads it (60 s at 10,000
        # test images and 64 px on 2 cores, once per kt compare row before)
        res, secs = test_eval(teacher)
        np.savez(tmp / "test_eval.npz", top1=res.top1, per_class=res.per_class, confusion=res.confusion,
                 seconds=secs)
        return {"teacher": ctx.teacher_id}

    def after(run) -> dict:
        teacher = load_model_checkpoint(run.entry / "teacher.pt")
        ctx.teacher_flops = forward_flops(teacher, (teacher.preprocess.channels, *teacher.preprocess.size))
        saved = run.entry / "test_eval.npz"
        if saved.is_file():
            z = np.load(saved)
            res = EvalResult(float(z["top1"]), z["per_class"], z["confusion"], list(task.classes))
            secs = float(z["seconds"])
        else:  # an entry written before test_eval.npz existed
            res, secs = test_eval(teacher)
        ctx.tracker.artifact(plot_confusion(res, ctx.run_dir / "confusion_teacher.png",
                                            f"adapted teacher {res.top1:.4f}"))
        ctx.table.append({"model": ctx.teacher_id, "role": f"teacher ({cfg.teacher.adapt})", "top1": res.top1,
                          "flops": ctx.teacher_flops, "params": params(teacher)})
        return {"top1": res.top1, "forward_flops_per_image": ctx.teacher_flops, "params": params(teacher),
                "eval_seconds": secs}

    run = run_stage(ctx, "adapted_teacher", body, record_as="adapt_teacher", after=after)
    ctx.adapted = run.entry / "teacher.pt"
    return ctx.adapted


def ensure_adapted(ctx: Ctx) -> Path:
    """The adapted teacher: the one a sweep prepared (``ctx.adapted`` already set), else teacher + adaptation."""
    if ctx.adapted is None:
        stage_teacher(ctx)
        stage_adapt(ctx)
    return ctx.adapted


def transfer_context(ctx: Ctx):
    """What the transfer-set sources may use (:class:`~orchestrator.transfer_sets.base.TransferContext`)."""
    from orchestrator.transfer_sets.base import TransferContext

    if ctx.teacher_id is None and ctx.cfg.transfer_set.source == "retrieval":  # the default pool embedder
        stage_teacher(ctx)
    kwargs = teacher_kwargs(ctx) if ctx.teacher_id else {}
    return TransferContext(ctx.task, ctx.split, ctx.cache, ctx.teacher_id, ctx.keys.get("teacher"), kwargs,
                           ctx.adapted, ctx.keys.get("adapted_teacher"), ctx.actor_gpus())


def stage_transfer_set(ctx: Ctx, record_as: str = "transfer_set"):
    """Build the transfer set with its source plug-in; key it by its images; log its size, provenance and
    (pool sources) manifest. Returns the TransferSet."""
    from orchestrator.transfer_sets.pools import build_transfer_set

    with Meter() as mt:
        ts = build_transfer_set(transfer_context(ctx), ctx.cfg.transfer_set)
    run_stage(ctx, "transfer_set", content={"images": ts.key}, measured=mt.result, record_as=record_as,
              after=lambda r: {"size": len(ts), **ts.info})
    ctx.tracker.tags({"transfer_set.source": ts.source, "transfer_set.key": ts.key})
    if ts.manifest is not None:
        ctx.tracker.artifact(ts.manifest, "transfer_set")
    log.info("transfer set: %s (key %s)", ts.description, ts.key)
    return ts


def transfer_slot(ctx: Ctx) -> str:
    """What identifies a transfer set and its teacher outputs before they are built (the transfer-set recipe,
    its upstream keys and the teacher-outputs mode): the sweep's prepare step files each one under this."""
    return config_hash({"transfer_set": stage_key("transfer_set", ctx.cfg, ctx.keys),
                        "mode": ctx.cfg.distill.teacher_outputs, "adapted": ctx.keys.get("adapted_teacher")})


def inference_actors(ctx: Ctx, images: int, flops_per_image: float, actors: int) -> int:
    """How many Ray Data actors run a frozen model over ``images`` images: ``actors``, or 0 (in this process)
    when ``teacher.inference`` is ``in_process``, or ``auto`` and the pass (``images`` x ``flops_per_image``
    FLOPs) is at most ``teacher.inference_in_process_max_tflops`` x 1e12."""
    t = ctx.cfg.teacher
    if t.inference == "auto":
        return 0 if images * flops_per_image <= t.inference_in_process_max_tflops * 1e12 else actors
    return 0 if t.inference == "in_process" else actors


def frozen_model_outputs(ctx: Ctx, checkpoint: Path, images: np.ndarray, out_dir: Path, batch_size: int,
                         actors: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A frozen model's ((N, K) float32 logits, (N, D) float16 features) on ``images`` ((N, H, W, C) uint8),
    with (index, logits) parquet shards under ``out_dir``: by a Ray Data actor pool of ``actors``, or in this
    process when ``actors`` is 0 (:func:`inference_actors`). ``what`` names the pass in the log."""
    if actors == 0:
        from orchestrator.stages.teacher_outputs import teacher_outputs_in_process

        log.info("%s over %d images, in this process (a pass too small for a Ray Data actor pool: "
                 "teacher.inference)", what, len(images))
        return teacher_outputs_in_process(str(checkpoint), images, out_dir, batch_size, features=True)
    from orchestrator.ray_adapters.data import teacher_inference

    log.info("%s over %d images (%d Ray Data actors)", what, len(images), actors)
    return teacher_inference(str(checkpoint), images, out_dir, batch_size, actors, ctx.actor_gpus(), features=True)


def stage_teacher_outputs(ctx: Ctx, ts, record_as: str = "teacher_inference") -> Path:
    """The adapted teacher's logits and features on a transfer set (cached; Ray Data, or in this process for a
    small pass: :func:`inference_actors`); online distillation stores only the images (the teacher then runs
    in every training step). Returns the entry dir."""
    cfg = ctx.cfg
    online = cfg.distill.teacher_outputs == "online"
    actors = inference_actors(ctx, len(ts), ctx.teacher_flops, cfg.teacher.inference_actors)

    def body(tmp: Path, c: StageCompute) -> dict:
        save_images(tmp, ts.images)  # images.npy, or a lazy set's manifest of image-shard rows
        if online:  # the teacher's compute is counted in the distill stage
            return {"transfer_set": ts.description}
        logits, feats = frozen_model_outputs(ctx, ctx.adapted, ts.images, tmp / "shards",
                                             cfg.teacher.inference_batch_size, actors, "teacher inference")
        c.images, c.flops = len(ts), ctx.teacher_flops * len(ts)
        np.save(tmp / "logits.npy", logits)
        np.save(tmp / "features.npy", feats)  # (N, D) float16: the feature loss's targets
        return {"transfer_set": ts.description}

    run = run_stage(ctx, "teacher_outputs", body, record_as=record_as, devices=max(1, actors),
                    after=lambda r: {"teacher_forward_passes": 0 if (r.hit or online) else len(ts)})
    if run.hit:
        log.info("teacher outputs cache hit (%s): teacher inference skipped", run.key)
    return run.entry


def prepared_outputs(ctx: Ctx) -> Path:
    """This config's transfer set and teacher outputs: the entry a sweep prepared for it (no teacher pass),
    else built here (transfer set + teacher inference, cached)."""
    slot = ctx.prepared.get(transfer_slot(ctx))
    if slot and Path(slot["dir"], "_COMPLETE").is_file():
        ctx.keys.update(slot["keys"])
        ctx.stages["teacher_inference"] = {"teacher_forward_passes": 0, "cache_hit": 1.0}
        ctx.stages["transfer_set"] = {"size": slot["size"]}
        return Path(slot["dir"])
    if ctx.prepared:
        log.warning("transfer set of this trial was not prepared; building it in the trial")
    ts = stage_transfer_set(ctx)
    return stage_teacher_outputs(ctx, ts)
