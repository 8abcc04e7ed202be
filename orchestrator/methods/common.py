"""The shared stages every method composes, each run through :func:`orchestrator.graph.run_stage` (one key
derivation, cache lookup, atomic write, compute meter and record): teacher, adaptation, transfer set, teacher
outputs, distillation (Ray Train), supervised training and evaluation."""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from orchestrator.config import PipelineConfig, config_hash
from orchestrator.data import TaskData, load_task_data, make_split
from orchestrator.data.shards import save_images
from orchestrator.data.splits import Split
from orchestrator.graph import run_stage, stage_inputs, stage_key
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


def stage_adapt(ctx: Ctx, record_as: str = "adapt_teacher", role: str = "teacher") -> Path:
    """Adapt the teacher on the labeled subset and evaluate it on the test split, both cached (the entry holds
    ``teacher.pt`` and ``test_eval.npz``). Sets and returns ``ctx.adapted`` (the adapted checkpoint).

    With ``teacher.ensemble`` every member is adapted as a teacher of its own (its own cache entry, key and
    record ``adapt_teacher_<i>``; the first is the one a single-teacher run adapts), then the ensemble's entry
    holds them as one :class:`~orchestrator.models.ensemble.EnsembleTeacher` (mean of their probabilities), with
    its own test top-1 (record ``adapt_teacher``); ``ctx.teacher_id`` stays the first member's (the default
    retrieval embedder)."""
    from orchestrator.models.teachers import load_teacher
    from orchestrator.stages.adapt_teacher import adapt_teacher
    from orchestrator.stages.schedule import supervised_plan

    members = ctx.cfg.teacher.members()
    if len(members) > 1:
        return _adapt_ensemble(ctx, members)
    cfg = ctx.cfg
    labeled = ctx.task.train.subset(ctx.split.labeled)
    seed = cfg.seed if cfg.teacher.seed is None else cfg.teacher.seed

    def build(c: StageCompute):
        with Meter() as me:
            teacher = load_teacher(ctx.teacher_id, teacher_kwargs(ctx))
            adapt_teacher(teacher, labeled, ctx.task.num_classes, cfg.teacher, seed, ctx.device,
                          augment=cfg.data.augment_policy())
        fwd = forward_flops(teacher, (teacher.preprocess.channels, *teacher.preprocess.size))
        # probe features once, then (LP-FT) finetune epochs at ~3x a forward pass each
        ft = cfg.teacher.adapt == "finetune"
        ft_images = supervised_plan(len(labeled), cfg.teacher.finetune).images() if ft else 0
        c.images, c.flops = len(labeled) + ft_images, fwd * len(labeled) + 3 * fwd * ft_images
        c.device_seconds = me.result.wall_seconds  # the adaptation's, not the test evaluation's
        return teacher

    return _adapted_entry(ctx, build, f"{role} ({cfg.teacher.adapt})", ctx.teacher_id, record_as)


def _adapt_ensemble(ctx: Ctx, members) -> Path:
    """Each member adapted as a single teacher, then their ensemble's entry (see :func:`stage_adapt`)."""
    from orchestrator.models.ensemble import EnsembleTeacher
    from orchestrator.models.teachers import load_model_checkpoint

    adapted: list[tuple[str, Path, str]] = []  # (key, checkpoint, model id) of each member
    for i, member in enumerate(members):
        with derived_config(ctx, ctx.cfg.model_copy(update={"teacher": member})):
            stage_teacher(ctx)
            path = stage_adapt(ctx, f"adapt_teacher_{i}", f"teacher {i}")
            adapted.append((ctx.keys["adapted_teacher"], path, member.id))
    stage_teacher(ctx)  # the first member's id and key again

    def build(c: StageCompute):  # the members' compute is in their own records
        teachers = [load_model_checkpoint(p) for _, p, _ in adapted]
        names = [f"{mid}@{t.preprocess.size[0]}" for (_, _, mid), t in zip(adapted, teachers)]
        return EnsembleTeacher(teachers, names)

    return _adapted_entry(ctx, build, "teacher ensemble (mean of probabilities)", None,
                          content={"members": [k for k, _, _ in adapted]})


def _adapted_entry(ctx: Ctx, build, role: str, model: str | None, record_as: str = "adapt_teacher",
                   content: dict | None = None) -> Path:
    """The ``adapted_teacher`` stage around ``build(compute) -> teacher``: the checkpoint and its test evaluation
    cached, the table row and the record ``record_as``. ``model`` names the teacher in the table (None: the
    built teacher's own ``model_id``, an ensemble's)."""
    from orchestrator.models.teachers import load_model_checkpoint, save_model_checkpoint
    from orchestrator.stages.evaluate import EvalResult, evaluate, plot_confusion

    task = ctx.task

    def test_eval(teacher) -> tuple[EvalResult, float]:
        with Meter() as me:
            res = evaluate(teacher, teacher.preprocess, task.test, task.num_classes, task.classes, device=ctx.device)
        return res, me.result.wall_seconds

    def body(tmp: Path, c: StageCompute) -> dict:
        teacher = build(c)
        save_model_checkpoint(teacher, tmp / "teacher.pt", task.classes)
        # the test evaluation travels with the entry: every later method and seed reads it (60 s at 10,000
        # test images and 64 px on 2 cores, once per kt compare row before)
        res, secs = test_eval(teacher)
        np.savez(tmp / "test_eval.npz", top1=res.top1, per_class=res.per_class, confusion=res.confusion,
                 seconds=secs)
        return {"teacher": model or teacher.model_id}

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
        ctx.tracker.artifact(plot_confusion(res, ctx.run_dir / f"confusion_{record_as.replace('adapt_', '')}.png",
                                            f"adapted {role} {res.top1:.4f}"))
        ctx.table.append({"model": model or teacher.model_id, "role": role, "top1": res.top1, "flops": ctx.teacher_flops,
                          "params": params(teacher)})
        return {"top1": res.top1, "forward_flops_per_image": ctx.teacher_flops, "params": params(teacher),
                "eval_seconds": secs}

    run = run_stage(ctx, "adapted_teacher", body, record_as=record_as, after=after, content=content)
    ctx.adapted = run.entry / "teacher.pt"
    return ctx.adapted


@contextmanager
def derived_config(ctx: Ctx, cfg: PipelineConfig) -> Iterator[Ctx]:
    """Run stages under a derived config (an ensemble member's teacher, the task-agnostic method's feature-only
    loss weights): their keys then derive from what they actually use."""
    old, ctx.cfg = ctx.cfg, cfg
    try:
        yield ctx
    finally:
        ctx.cfg = old


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


def teacher_slot(cfg: PipelineConfig) -> str:
    """What identifies an adapted teacher of this task before it is adapted (the config the ``adapted_teacher``
    stage reads: the teacher, its ensemble and adaptation): a sweep's prepare step files each one under this."""
    inputs = stage_inputs("adapted_teacher", cfg, {"teacher": "", "data": ""})
    return config_hash({"config": inputs["config"], "derived": inputs["derived"]})


def transfer_slot(ctx: Ctx) -> str:
    """What identifies a transfer set and its teacher outputs before they are built (the transfer-set recipe,
    its upstream keys, and what the teacher-outputs stage reads: the mode, the cached views): the sweep's prepare
    step files each one under this."""
    outputs = stage_inputs("teacher_outputs", ctx.cfg, {"adapted_teacher": "", "transfer_set": ""})["config"]
    return config_hash({"transfer_set": stage_key("transfer_set", ctx.cfg, ctx.keys), "outputs": outputs,
                        "adapted": ctx.keys.get("adapted_teacher")})


def inference_actors(ctx: Ctx, images: int, flops_per_image: float, actors: int) -> int:
    """How many Ray Data actors run a frozen model over ``images`` images: ``actors``, or 0 (in this process)
    when ``teacher.inference`` is ``in_process``, or ``auto`` and the pass (``images`` x ``flops_per_image``
    FLOPs) is at most ``teacher.inference_in_process_max_tflops`` x 1e12."""
    t = ctx.cfg.teacher
    if t.inference == "auto":
        return 0 if images * flops_per_image <= t.inference_in_process_max_tflops * 1e12 else actors
    return 0 if t.inference == "in_process" else actors


def frozen_model_outputs(ctx: Ctx, checkpoint: Path, images: np.ndarray, out_dir: Path, batch_size: int,
                         actors: int, what: str, views: tuple[np.ndarray, int] | None = None):
    """A frozen model's ((N, K) float32 logits, (N, D) float16 features) on ``images`` ((N, H, W, C) uint8),
    with (index, logits) parquet shards under ``out_dir``: by a Ray Data actor pool of ``actors``, or in this
    process when ``actors`` is 0 (:func:`inference_actors`). ``what`` names the pass in the log. With ``views``
    (``(params, k)``: :mod:`orchestrator.stages.views`) only the (N x k, K) float32 logits of the views."""
    n, features = (len(views[0]), False) if views is not None else (len(images), True)
    if actors == 0:
        from orchestrator.stages.teacher_outputs import teacher_outputs_in_process

        log.info("%s over %d %s, in this process (a pass too small for a Ray Data actor pool: "
                 "teacher.inference)", what, n, "views" if views is not None else "images")
        return teacher_outputs_in_process(str(checkpoint), images, out_dir, batch_size, features, views)
    from orchestrator.ray_adapters.data import teacher_inference

    log.info("%s over %d %s (%d Ray Data actors)", what, n, "views" if views is not None else "images", actors)
    return teacher_inference(str(checkpoint), images, out_dir, batch_size, actors, ctx.actor_gpus(), features,
                             views)


def label_views(ctx: Ctx, ts, tmp: Path, actors: int) -> dict:
    """The teacher's soft labels of ``distill.views`` cached views of every transfer image (FKD;
    :mod:`orchestrator.stages.views`): writes ``views.npy`` ((N x K, 7) float32 view parameters) and
    ``logits.npy`` ((N x K, C) float32), or with ``distill.view_topk`` = k the compressed
    ``soft_topk_classes.npy`` / ``soft_topk_logprob.npy`` ((N x K, k) int32 / float16). Returns what the
    compression costs (:func:`~orchestrator.stages.views.compression_cost`), or {}."""
    from orchestrator.stages.views import compress, compression_cost, draw_views

    d = ctx.cfg.distill
    policy = ctx.cfg.data.augment_policy()
    min_area = policy.crop_scale[0] if d.view_min_area is None else d.view_min_area
    params = draw_views(len(ts), d.views, policy, min_area, ctx.cfg.transfer_set.seed)
    np.save(tmp / "views.npy", params)
    logits = frozen_model_outputs(ctx, ctx.adapted, ts.images, tmp / "shards", ctx.cfg.teacher.inference_batch_size,
                                  actors, f"teacher inference ({d.views} views per image)", (params, d.views))
    if d.view_topk is None:
        np.save(tmp / "logits.npy", logits)
        return {}
    classes, logp = compress(logits, d.view_topk)
    np.save(tmp / "soft_topk_classes.npy", classes)
    np.save(tmp / "soft_topk_logprob.npy", logp)
    return {f"topk_{k}": v for k, v in compression_cost(logits, d.view_topk, d.temperature).items()}


def stage_teacher_outputs(ctx: Ctx, ts, record_as: str = "teacher_inference") -> Path:
    """The adapted teacher's logits and features on a transfer set (cached; Ray Data, or in this process for a
    small pass: :func:`inference_actors`); online distillation stores only the images (the teacher then runs
    in every training step). Returns the entry dir."""
    cfg = ctx.cfg
    online = cfg.distill.teacher_outputs == "online"
    views = max(1, cfg.distill.views)  # teacher passes per transfer image
    actors = inference_actors(ctx, len(ts) * views, ctx.teacher_flops, cfg.teacher.inference_actors)

    def body(tmp: Path, c: StageCompute) -> dict:
        save_images(tmp, ts.images)  # images.npy, or a lazy set's manifest of image-shard rows
        if online:  # the teacher's compute is counted in the distill stage
            return {"transfer_set": ts.description}
        if cfg.distill.views:
            cost = label_views(ctx, ts, tmp, actors)
            c.images, c.flops = len(ts) * views, ctx.teacher_flops * len(ts) * views
            return {"transfer_set": ts.description, "views": cfg.distill.views, **cost}
        logits, feats = frozen_model_outputs(ctx, ctx.adapted, ts.images, tmp / "shards",
                                             cfg.teacher.inference_batch_size, actors, "teacher inference")
        c.images, c.flops = len(ts), ctx.teacher_flops * len(ts)
        np.save(tmp / "logits.npy", logits)
        np.save(tmp / "features.npy", feats)  # (N, D) float16: the feature loss's targets
        return {"transfer_set": ts.description}

    def after(r) -> dict:  # the views and what their compression cost, as the entry recorded them
        meta = json.loads((r.entry / "_meta.json").read_text())
        return {"teacher_forward_passes": 0 if (r.hit or online) else len(ts) * views,
                **{k: v for k, v in meta.items() if k == "views" or k.startswith("topk_")}}

    run = run_stage(ctx, "teacher_outputs", body, record_as=record_as, devices=max(1, actors), after=after)
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
