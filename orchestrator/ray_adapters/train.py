"""Ray Train adapter: student distillation in process or on a TorchTrainer worker group (gloo on CPU, NCCL
on GPU), as :mod:`orchestrator.ray_adapters.loop_session` decides.

The loop reads the cached transfer images (an array, or rows of image shards) and teacher logits from shared
storage (memory-mapped .npy locally, row by row from a storage URI: nothing is mirrored), runs
``stages.distill.distill_epoch`` on its shard, and rank 0 persists the loop's state after every reporting epoch
(``<storage>/<run name>/kt_state.pt``). Re-running with the same ``name`` and ``storage_path`` resumes from it,
in any mode.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from orchestrator.ray_adapters.loop_session import LoopSession, run_loop
from orchestrator.ray_adapters.session import quiet_train_worker, say

log = logging.getLogger(__name__)

EPOCH_HISTORY = ("loss", "val_top1")  # the training log's per-epoch lists a resumed driver may need again


def _train_fn(config: dict, report: Callable[[dict], None] | None = None) -> None:
    """The distillation loop (see :func:`distill_ray`); ``report``: set when it runs in a Tune trial's process."""
    import numpy as np
    import torch

    from orchestrator.config import AugmentPolicy, DistillConfig
    from orchestrator.data.shards import open_array, open_images
    from orchestrator.models.preprocess import Preprocess
    from orchestrator.models.students import create_student
    from orchestrator.stages.distill import (DistillData, distill_epoch, load_state, make_optimizer, new_log,
                                             FeatureStudent, online_teacher, save_state)
    from orchestrator.stages.accel import prepare_model
    from orchestrator.stages.evaluate import evaluate
    from orchestrator.stages.schedule import distill_plan
    from orchestrator.stages.views import open_soft_labels

    session = LoopSession(config, report)
    if session.mode == "worker_group":
        quiet_train_worker()
    rank, world = session.rank, session.world
    torch.set_num_threads(config["threads_per_worker"])
    cfg = DistillConfig(**config["distill"])
    augment = AugmentPolicy(**config["augment"]) if config.get("augment") else None
    device = session.device(cfg.use_gpu)
    pre = Preprocess.from_dict(config["preprocess"])
    d, lab, val = _inputs(config["data"])
    online = cfg.teacher_outputs == "online"
    use_feat = cfg.feature_weight > 0
    data = DistillData(open_images(d), None if online else open_soft_labels(d, cfg, config["num_classes"]), lab,
                       online_teacher(resolve_ref(config["teacher_checkpoint"]), device) if online else None,
                       open_array(d, "features.npy") if use_feat and not online else None,
                       open_array(d, "views.npy") if cfg.views else None, max(1, cfg.views))
    val = val if rank == 0 else None  # held-out labeled images: rank 0 reports the per-epoch selection metric
    torch.manual_seed(config["seed"])
    model = create_student(config["student"], config["num_classes"], pre, config["model_kwargs"])
    if use_feat:  # the projection's width: the teacher's feature dimension
        dim = data.teacher(np.asarray(data.images[:1]))[1].shape[1] if online else data.teacher_features.shape[1]
        model = FeatureStudent(model, int(dim))
    model = prepare_model(model, device)  # channels-last on CUDA
    plan = distill_plan(data.items, cfg, world)  # the budget's steps, reporting epochs and LR schedule
    opt, sched = make_optimizer(model, cfg, data.items, world)
    start, log = session.restore(lambda p: load_state(p, model, opt, sched)) or (0, new_log())
    kt = f"[kt] {config['label']}: " if config.get("label") else "[kt] "  # a sweep's trials print side by side
    if start and rank == 0:
        say(f"{kt}resumed distillation from its checkpoint at epoch {start}/{plan.epochs}")
    log["starts"].append(start)
    ddp = ray_ddp(model) if world > 1 else model
    hooks = config.get("epoch_hooks") or []
    if rank == 0 and start == 0:
        say(f"{kt}distillation ({_where(session)}): {plan.describe()}")
    for epoch in range(start, plan.epochs):
        t0 = time.perf_counter()
        loss = distill_epoch(ddp, opt, sched, data, pre, cfg, epoch, config["seed"], rank, world, device, augment)
        seconds = time.perf_counter() - t0
        log["loss"].append(loss)
        log["seconds"].append(seconds)
        log.setdefault("steps", []).append(len(plan.steps_of(epoch)))
        metrics = {**config.get("extra_metrics", {}), "epoch": epoch + 1, "loss": loss, "epoch_seconds": seconds,
                   "device_seconds": sum(log["seconds"]) * world, "steps": sum(log["steps"])}
        if val is not None:
            net = model.student if use_feat else model
            metrics["val_top1"] = evaluate(net, pre, val, config["num_classes"], device=str(device)).top1
            log.setdefault("val_top1", []).append(metrics["val_top1"])
        if epoch == start > 0:  # the first report after a resume: the epochs before it, for a driver that
            metrics["kt_earlier"] = {k: log[k][:epoch] for k in EPOCH_HISTORY if k in log}  # missed them
        if rank == 0:
            shown = f", val top-1 {metrics['val_top1']:.4f}" if val is not None else ""
            say(f"{kt}distill epoch {epoch + 1}/{plan.epochs}: loss {loss:.4f}{shown} ({seconds:.0f} s)")
        session.report(metrics, lambda p: save_state(p, model, opt, sched, epoch, log))
        for hook in hooks:  # after the epoch's checkpoint (e.g. a test's fault injection)
            hook(epoch, rank)


def ray_ddp(model):
    """``model`` wrapped for DDP across the Ray Train worker group (``ray.train.torch.prepare_model``)."""
    import ray.train.torch

    return ray.train.torch.prepare_model(model)


def _where(session: LoopSession) -> str:
    return "in process" if session.mode == "in_process" else f"a Ray Train worker group of {session.world}"


def resolve_ref(ref, mirror: bool = True) -> str | Path:
    """A cache reference ``{"storage", "kind", "key"[, "file"]}`` -> where this node reads the entry: with
    ``mirror``, this node's copy (downloaded from a storage URI when needed: a model file); without, the entry's
    URI on a storage URI (rows are read with ranged reads, nothing is mirrored) or its local directory. A path ->
    itself. Raises FileNotFoundError when the entry is not complete there."""
    if not isinstance(ref, dict):
        return Path(ref)
    from orchestrator.cache import Cache
    from orchestrator.storage import is_uri, join

    cache = Cache(ref["storage"])
    entry = cache.lookup(ref["kind"], ref["key"]) if mirror else cache.location(ref["kind"], ref["key"])
    if entry is None:
        raise FileNotFoundError(f"cache entry {ref['kind']}/{ref['key']} is not under {ref['storage']}; "
                                "this node cannot see the driver's storage (use a storage URI on a cluster)")
    if is_uri(str(entry)):
        return join(str(entry), ref["file"]) if ref.get("file") else str(entry)
    return Path(entry) / ref["file"] if ref.get("file") else Path(entry)


def _inputs(src):
    """(the teacher-outputs entry: a local dir or a URI with images.npy or images.json, logits.npy and
    features.npy; labeled ImageSet; validation ImageSet or None)."""
    import numpy as np

    from orchestrator.data.images import ImageSet

    if isinstance(src, dict) and "kind" in src:
        lab, val = src["labeled"], src.get("val")
        return (resolve_ref(src, mirror=False), ImageSet(lab["images"], lab["labels"]),
                ImageSet(val["images"], val["labels"]) if val else None)
    d = Path(src)
    lab = np.load(d / "labeled.npz")
    val = np.load(d / "val.npz") if (d / "val.npz").is_file() else None
    return d, ImageSet(lab["images"], lab["labels"]), ImageSet(val["images"], val["labels"]) if val else None


def distill_ray(data, student: str, model_kwargs: dict, num_classes: int, preprocess: dict,
                distill: dict, seed: int, storage_path: Path, name: str, num_workers: int, use_gpu: bool,
                cpus_per_worker: float = 1.0, epoch_hooks: list | None = None, teacher_checkpoint: str | None = None,
                callbacks: list | None = None, extra_metrics: dict | None = None, augment: dict | None = None,
                report: Callable[[dict], None] | None = None, execution: str | None = None,
                label: str | None = None):
    """Distill in process or with a TorchTrainer of ``num_workers`` workers
    (:func:`orchestrator.ray_adapters.loop_session.resolve_execution` of ``execution``, default
    ``distill["execution"]``).

    Args:
        data: the transfer set, its teacher outputs and the labeled images. Either a directory with images.npy
            ((N, H, W, C) uint8), logits.npy ((N, K) float32), features.npy ((N, D) float16), labeled.npz and
            optionally val.npz; or (what the pipeline passes, so workers on any node find it) a cache reference
            ``{"storage": URI or path, "kind", "key", "labeled": {"images", "labels"}, "val": ... or None}``.
            logits/features are not read in online mode; with validation images rank 0 reports ``val_top1``
            after every epoch.
        name, storage_path: the run identity; the same pair resumes from the loop's state
            (``<storage_path>/<name>/kt_state.pt``), whichever mode ran before.
        teacher_checkpoint: the adapted teacher (a kt-model/1 path, or a cache reference with ``file``),
            loaded by every worker in online mode.
        callbacks: Ray Train callbacks of a worker group, e.g. Tune's TuneReportCallback inside a sweep trial.
        report: inside a Ray Tune trial, ``ray.tune.report``: an in-process loop reports to it directly.
        label: what the loop's progress lines start with (``trial <id>`` in a sweep), or None.
        extra_metrics: constants added to every epoch's report (e.g. the student's FLOPs for a sweep).
        augment: the task's augmentation, ``cfg.data.augment_policy().model_dump(mode="json")`` (used when
            ``distill.augment``); None: the label-preserving default (shift only, no flip).
        epoch_hooks: picklable callables the loop runs as ``hook(epoch, rank)`` after each epoch's checkpoint
            and report (tests kill the worker group, or the process, with one).
    Budget: ``distill.steps`` optimizer steps (or ``distill.epochs`` passes), split into reporting epochs of
        ``epoch_steps`` steps (:func:`orchestrator.stages.schedule.distill_plan`); one report and checkpoint per
        reporting epoch (its metrics include ``steps``, the optimizer steps so far).
    Returns:
        (state_dict of the student, training log: per-epoch "loss", rank-0 "seconds", "steps" and (with val.npz)
        "val_top1", "starts", the epoch each (re)start began at: more than one entry means the run resumed from
        its checkpoint, and "execution": ``"in_process"`` or ``"worker_group"``).
    Raises:
        ray.train.TrainingFailedError after a worker group's retries run out; whatever the loop raises in process.
    """
    from orchestrator.stages.distill import read_state

    config = dict(data=data if isinstance(data, dict) else str(data), student=student, model_kwargs=model_kwargs,
                  num_classes=num_classes, preprocess=preprocess, distill=distill, seed=seed,
                  threads_per_worker=max(1, int(cpus_per_worker)), epoch_hooks=epoch_hooks or [],
                  teacher_checkpoint=teacher_checkpoint, extra_metrics=extra_metrics or {}, augment=augment,
                  label=label)
    (model, tlog), mode = run_loop(
        _train_fn, config, name=name, storage_path=storage_path,
        execution=execution or distill.get("execution", "auto"), num_workers=num_workers, use_gpu=use_gpu,
        cpus_per_worker=cpus_per_worker, callbacks=callbacks, report=report, read=read_state)
    return model, {**tlog, "execution": mode}
