"""Ray Train adapter for paper 2's multi-source distillation (Borup et al., ICCV 2023): a loop that reads every
source's cached signals (memory-mapped .npy from the shared stage cache) and runs
:func:`orchestrator.stages.multi_distill.multi_distill_epoch` on its shard, in process or on a TorchTrainer
worker group (DDP, gloo on CPU, NCCL on GPU) as :mod:`orchestrator.ray_adapters.loop_session` decides. Rank 0
persists the loop's state every epoch; re-running with the same ``name`` and ``storage_path`` resumes, in any
mode. Modelled on :mod:`orchestrator.ray_adapters.train` (single-teacher distillation).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from orchestrator.data.shards import open_array, open_images
from orchestrator.ray_adapters.loop_session import LoopSession, run_loop
from orchestrator.ray_adapters.session import quiet_train_worker, say
from orchestrator.ray_adapters.train import ray_ddp, resolve_ref  # the same cache references

log = logging.getLogger(__name__)


def load_data(config: dict):
    """The worker's :class:`~orchestrator.stages.multi_distill.MultiDistillData` from the train-loop config."""

    from orchestrator.data.images import ImageSet
    from orchestrator.stages.multi_distill import MultiDistillData, SourceTargets

    dirs = [resolve_ref(s["entry"], mirror=False) for s in config["sources"]]
    targets = [SourceTargets(s["name"], float(s["weight"]), open_array(d, "pseudo.npy"), open_array(d, "features.npy"))
               for s, d in zip(config["sources"], dirs)]
    lab = config["labeled"]
    return MultiDistillData(open_images(dirs[0]), targets,
                            ImageSet(lab["images"], lab["labels"]) if lab else None)


def _train_fn(config: dict, report: Callable[[dict], None] | None = None) -> None:
    import torch

    from orchestrator.config import SourceTransferConfig
    from orchestrator.models.preprocess import Preprocess
    from orchestrator.models.students import create_student
    from orchestrator.stages.accel import prepare_model
    from orchestrator.stages.distill import load_state, save_state
    from orchestrator.stages.schedule import distill_plan
    from orchestrator.stages.multi_distill import MultiSourceStudent, make_optimizer, multi_distill_epoch, new_log

    session = LoopSession(config, report)
    if session.mode == "worker_group":
        quiet_train_worker()
    rank, world = session.rank, session.world
    torch.set_num_threads(config["threads_per_worker"])
    cfg = SourceTransferConfig(**config["sources_cfg"])
    device = session.device(cfg.distill.use_gpu)
    pre = Preprocess.from_dict(config["preprocess"])
    data = load_data(config)
    torch.manual_seed(config["seed"])
    student = create_student(config["student"], config["num_classes"], pre, config["model_kwargs"])
    model = prepare_model(MultiSourceStudent(student, [s.features.shape[1] for s in data.sources]), device)
    opt, sched = make_optimizer(model, cfg.distill, len(data.images), world)
    start, tlog = session.restore(lambda p: load_state(p, model, opt, sched)) or (0, new_log())
    tlog["starts"].append(start)
    ddp = ray_ddp(model) if world > 1 else model
    plan = distill_plan(len(data.images), cfg.distill, world)  # the budget's steps and reporting epochs
    for epoch in range(start, plan.epochs):
        t0 = time.perf_counter()
        loss = multi_distill_epoch(ddp, opt, sched, data, pre, cfg, epoch, config["seed"], rank, world, device)
        seconds = time.perf_counter() - t0
        tlog["loss"].append(loss)
        tlog["seconds"].append(seconds)
        if rank == 0:
            say(f"[kt] multi-source distill epoch {epoch + 1}/{plan.epochs}: loss {loss:.4f} ({seconds:.0f} s)")
        session.report({"epoch": epoch + 1, "loss": loss, "epoch_seconds": seconds},
                       lambda p: save_state(p, model, opt, sched, epoch, tlog))


def multi_distill_ray(sources: list[dict], labeled: dict | None, student: str, model_kwargs: dict,
                      num_classes: int, preprocess: dict, sources_cfg: dict, seed: int, storage_path: str,
                      name: str, cpus_per_worker: float = 1.0, report: Callable[[dict], None] | None = None):
    """Multi-source distillation, in process or with a TorchTrainer of ``sources_cfg["distill"]["num_workers"]``
    workers (:func:`orchestrator.ray_adapters.loop_session.resolve_execution` of ``distill.execution``;
    the config resolves ``distill.backend: local`` to ``execution: in_process``).

    Args:
        sources: ``[{"name", "weight", "entry"}]``, ``entry`` a cache reference ``{"storage", "kind", "key"}``
            (or a path) of a ``source_signals`` entry (images.npy, pseudo.npy, features.npy; the images are
            read from the first).
        labeled: ``{"images": (N_l, H, W, C) uint8, "labels": (N_l,) int64}`` (travels inline) or None.
        sources_cfg: ``SourceTransferConfig.model_dump()`` (loss weights, temperature, ``distill`` recipe).
        name, storage_path: the run identity (the same pair resumes from ``<storage_path>/<name>/kt_state.pt``).
        report: inside a Ray Tune trial, ``ray.tune.report`` (an in-process loop reports to it).
    Returns:
        (state dict of the :class:`~orchestrator.stages.multi_distill.MultiSourceStudent`, training log:
        per-epoch "loss" and rank-0 "seconds", "starts" and "execution").
    Raises:
        ray.train.TrainingFailedError after a worker group's retries run out; whatever the loop raises in process.
    """
    from orchestrator.stages.distill import read_state

    d = sources_cfg["distill"]
    config = dict(sources=sources, labeled=labeled, student=student, model_kwargs=model_kwargs,
                  num_classes=num_classes, preprocess=preprocess, sources_cfg=sources_cfg, seed=seed,
                  threads_per_worker=max(1, int(cpus_per_worker)))
    (model, tlog), mode = run_loop(_train_fn, config, name=name, storage_path=storage_path,
                                   execution=d.get("execution", "auto"),
                                   num_workers=d["num_workers"], use_gpu=d["use_gpu"],
                                   cpus_per_worker=cpus_per_worker, report=report, read=read_state)
    return model, {**tlog, "execution": mode}
