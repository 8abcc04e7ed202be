"""Ray Train adapter for paper 2's multi-source distillation (Borup et al., ICCV 2023): a TorchTrainer whose
workers read every source's cached signals (memory-mapped .npy from the shared stage cache) and run
:func:`orchestrator.stages.multi_distill.multi_distill_epoch` on their shard (DDP, gloo on CPU, NCCL on GPU).
Rank 0 checkpoints every epoch; re-running with the same ``name`` and ``storage_path`` resumes. Modelled on
:mod:`orchestrator.ray_adapters.train` (single-teacher distillation), which it leaves unchanged.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from orchestrator.ray_adapters.session import fit_state, quiet_train_worker, report_epoch, say
from orchestrator.ray_adapters.train import resolve_ref  # the same cache references

log = logging.getLogger(__name__)


def load_data(config: dict):
    """The worker's :class:`~orchestrator.stages.multi_distill.MultiDistillData` from the train-loop config."""
    import numpy as np

    from orchestrator.data.images import ImageSet
    from orchestrator.stages.multi_distill import MultiDistillData, SourceTargets

    dirs = [resolve_ref(s["entry"]) for s in config["sources"]]
    targets = [SourceTargets(s["name"], float(s["weight"]), np.load(d / "pseudo.npy", mmap_mode="r"),
                             np.load(d / "features.npy", mmap_mode="r")) for s, d in zip(config["sources"], dirs)]
    lab = config["labeled"]
    return MultiDistillData(np.load(dirs[0] / "images.npy", mmap_mode="r"), targets,
                            ImageSet(lab["images"], lab["labels"]) if lab else None)


def _train_fn(config: dict) -> None:
    import ray.train
    import torch

    from orchestrator.config import SourceTransferConfig
    from orchestrator.models.preprocess import Preprocess
    from orchestrator.models.students import create_student
    from orchestrator.stages.accel import prepare_model
    from orchestrator.stages.distill import load_state, save_state
    from orchestrator.stages.schedule import distill_plan
    from orchestrator.stages.multi_distill import MultiSourceStudent, make_optimizer, multi_distill_epoch, new_log

    quiet_train_worker()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads_per_worker"])
    cfg = SourceTransferConfig(**config["sources_cfg"])
    device = ray.train.torch.get_device() if cfg.distill.use_gpu else torch.device("cpu")
    pre = Preprocess.from_dict(config["preprocess"])
    data = load_data(config)
    torch.manual_seed(config["seed"])
    student = create_student(config["student"], config["num_classes"], pre, config["model_kwargs"])
    model = prepare_model(MultiSourceStudent(student, [s.features.shape[1] for s in data.sources]), device)
    opt, sched = make_optimizer(model, cfg.distill, len(data.images), world)
    start, tlog = 0, new_log()
    ck = ray.train.get_checkpoint()
    if ck:
        with ck.as_directory() as cd:
            start, tlog = load_state(Path(cd) / "state.pt", model, opt, sched)
    tlog["starts"].append(start)
    ddp = ray.train.torch.prepare_model(model) if world > 1 else model
    plan = distill_plan(len(data.images), cfg.distill, world)  # the budget's steps and reporting epochs
    for epoch in range(start, plan.epochs):
        t0 = time.perf_counter()
        loss = multi_distill_epoch(ddp, opt, sched, data, pre, cfg, epoch, config["seed"], rank, world, device)
        seconds = time.perf_counter() - t0
        tlog["loss"].append(loss)
        tlog["seconds"].append(seconds)
        if rank == 0:
            say(f"[kt] multi-source distill epoch {epoch + 1}/{plan.epochs}: loss {loss:.4f} ({seconds:.0f} s)")
        report_epoch({"epoch": epoch + 1, "loss": loss, "epoch_seconds": seconds}, rank,
                     lambda d: save_state(d / "state.pt", model, opt, sched, epoch, tlog))


def multi_distill_ray(sources: list[dict], labeled: dict | None, student: str, model_kwargs: dict,
                      num_classes: int, preprocess: dict, sources_cfg: dict, seed: int, storage_path: str,
                      name: str, cpus_per_worker: float = 1.0):
    """Multi-source distillation with a TorchTrainer of ``sources_cfg["distill"]["num_workers"]`` workers.

    Args:
        sources: ``[{"name", "weight", "entry"}]``, ``entry`` a cache reference ``{"storage", "kind", "key"}``
            (or a path) of a ``source_signals`` entry (images.npy, pseudo.npy, features.npy; the images are
            read from the first).
        labeled: ``{"images": (N_l, H, W, C) uint8, "labels": (N_l,) int64}`` (travels inline) or None.
        sources_cfg: ``SourceTransferConfig.model_dump()`` (loss weights, temperature, ``distill`` recipe).
        name, storage_path: the Ray Train run identity (the same pair resumes from its latest checkpoint).
    Returns:
        (state dict of the :class:`~orchestrator.stages.multi_distill.MultiSourceStudent`, training log:
        per-epoch "loss" and rank-0 "seconds", and "starts").
    Raises:
        ray.train.TrainingFailedError after the worker retries run out.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from orchestrator.ray_adapters.session import ensure_ray, torch_trainer

    ensure_ray()
    d = sources_cfg["distill"]
    trainer = torch_trainer(
        _train_fn,
        train_loop_config=dict(sources=sources, labeled=labeled, student=student, model_kwargs=model_kwargs,
                               num_classes=num_classes, preprocess=preprocess, sources_cfg=sources_cfg, seed=seed,
                               threads_per_worker=max(1, int(cpus_per_worker))),
        scaling_config=ScalingConfig(num_workers=d["num_workers"], use_gpu=d["use_gpu"],
                                     resources_per_worker={"CPU": cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if d["use_gpu"] else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(storage_path),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=1)),
    )
    return fit_state(trainer)
