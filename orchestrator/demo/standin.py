"""Build (or fetch from cache) the local stand-in teacher: SimCLR on the task's unlabeled images."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from orchestrator.cache import Cache
from orchestrator.config import PipelineConfig, TeacherConfig, config_hash
from orchestrator.data.images import TaskData
from orchestrator.data.shards import take
from orchestrator.data.splits import Split
from orchestrator.models.teachers import save_model_checkpoint
from orchestrator.stages.compute import Meter

log = logging.getLogger(__name__)


@dataclass
class StandinInfo:
    """checkpoint: the stand-in's ``kt-model/1`` file (no head). meta: provenance, linear-probe top-1 on the
    test split (probe trained on the labeled subset), build seconds. cache_hit: whether it was reused."""

    checkpoint: Path
    meta: dict
    cache_hit: bool


def standin_key(cfg: PipelineConfig, task: TaskData, split: Split) -> str:
    """Cache key: stand-in settings + content of the unlabeled images it trains on."""
    flip = {} if cfg.data.augment_policy().hflip else {"hflip": False}  # views mirrored only where the task allows
    return config_hash({"standin": cfg.standin.model_dump(mode="json"), **flip,
                        "images": task.train.subset(split.without_labels()).content_hash()})


def ensure_standin(cfg: PipelineConfig, task: TaskData, split: Split, cache: Cache,
                   device: str = "cpu") -> StandinInfo:
    """Return the cached stand-in for this task, building it first if needed (atomic cache write)."""
    from orchestrator.stages.adapt_teacher import adapt_teacher
    from orchestrator.stages.evaluate import evaluate
    from orchestrator.stages.pretrain import pretrain_standin

    key = standin_key(cfg, task, split)
    hit = cache.lookup("standin", key)
    if hit:
        meta = json.loads((hit / "_meta.json").read_text())
        log.warning("using cached %s (linear probe top-1 %.4f)", meta["provenance"], meta["linear_probe_top1"])
        return StandinInfo(hit / "teacher.pt", meta, True)
    mean, std = task.pixel_stats()
    unlabeled = take(task.train.images, split.without_labels())  # a validation subset's labels are not used either
    with Meter() as m:
        teacher = pretrain_standin(unlabeled, cfg.standin, mean, std, device,
                                   hflip=bool(cfg.data.augment_policy().hflip))
    probe = adapt_teacher(teacher, task.train.subset(split.labeled), task.num_classes,
                          TeacherConfig(adapt="linear_probe"), cfg.seed, device)
    top1 = evaluate(probe, probe.preprocess, task.test, task.num_classes, device=device).top1
    teacher.head = None
    meta = {"provenance": teacher.provenance, "linear_probe_top1": top1, "build_seconds": m.result.wall_seconds,
            "images": len(unlabeled), "epochs": cfg.standin.epochs}
    log.warning("built %s in %.0f s; linear probe top-1 %.4f", teacher.provenance, m.result.wall_seconds, top1)
    with cache.write("standin", key, meta) as tmp:
        save_model_checkpoint(teacher, tmp / "teacher.pt", task.classes, extra=meta)
    return StandinInfo(cache.path("standin", key) / "teacher.pt", meta, False)
