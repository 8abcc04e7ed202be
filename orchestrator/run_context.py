"""What a run's stages share: the run context (config, cache, tracker, recorded stage compute) and the result
a run returns."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.cache import Cache
from orchestrator.config import PipelineConfig
from orchestrator.data import TaskData
from orchestrator.data.splits import Split
from orchestrator.stages.compute import StageCompute


@dataclass
class RunResult:
    """What a run returns. ``table``: rows (model, role, top-1, forward FLOPs/image, params);
    ``metrics``: every logged metric of the parent run; ``stages``: per-stage compute and cache hits.

    Stage compute is the compute that produced the stage's output (a recipe's cost, comparable across runs):
    a cached output reports the compute recorded when it was made, with ``cache_hit = 1``; what actually ran
    now shows in ``teacher_forward_passes`` and the distillation's ``restarts``."""

    run_id: str
    tracking_uri: str
    run_dir: Path
    table: list[dict]
    metrics: dict[str, float]
    stages: dict[str, dict] = field(default_factory=dict)
    experiment_id: str | None = None  # the MLflow experiment of ``run_id`` (its printed link)


@dataclass
class Ctx:
    cfg: PipelineConfig
    cache: Cache
    tracker: object
    run_dir: Path
    device: str
    task: TaskData | None = None
    split: Split | None = None
    stages: dict[str, dict] = field(default_factory=dict)
    experiment_id: str | None = None  # the MLflow experiment of ``run_id`` (its printed link)
    metrics: dict[str, float] = field(default_factory=dict)
    table: list[dict] = field(default_factory=list)
    teacher_flops: int = 0  # adapted teacher's forward FLOPs per image
    adapted: Path | None = None  # adapted teacher checkpoint (online distillation loads it)
    cpus_per_worker: float = 1.0  # Ray Train worker CPUs (a sweep trial may use fractions)
    nested_stages: bool = True  # one nested MLflow run per stage; False: ``<stage>.<metric>`` on the current run
    keys: dict[str, str] = field(default_factory=dict)  # stage name -> key (orchestrator.graph), as stages run
    teacher_id: str | None = None  # the loadable teacher id (a stand-in resolves to its checkpoint)
    prepared: dict[str, dict] = field(default_factory=dict)  # a sweep's prepared transfer sets (see methods.common)
    plots: bool = True  # confusion-matrix PNGs (a sweep trial skips them)
    train_hooks: dict = field(default_factory=dict)  # Ray Train run_name/storage/callbacks/extra_metrics (trials)

    def actor_gpus(self) -> float:
        """GPUs per Ray Data actor (teacher inference, pool embedding): ``teacher.inference_gpus``, else 1 when
        this driver sees a GPU."""
        g = self.cfg.teacher.inference_gpus
        return float(g) if g is not None else (1.0 if self.device == "cuda" else 0.0)

    def cache_ref(self, entry: Path) -> dict:
        """A reference to cache entry ``entry`` (``<root>/<kind>/<key>``) that Ray workers on any node resolve."""
        return {"storage": self.cfg.storage_uri(), "kind": entry.parent.name, "key": entry.name}

    def record(self, stage: str, compute: StageCompute, cache_hit: bool | None = None, **extra) -> None:
        info = {**compute.metrics(""), **({} if cache_hit is None else {"cache_hit": float(cache_hit)}), **extra}
        self.stages[stage] = info
        numbers = {k: v for k, v in info.items() if isinstance(v, (int, float))}
        if self.nested_stages:
            with self.tracker.run(stage, nested=True):
                self.tracker.metrics(numbers)
        else:
            self.tracker.metrics({f"{stage}.{k}": v for k, v in numbers.items()})
        self.metrics.update({f"{stage}.{k}": v for k, v in numbers.items()})


def cached_compute(entry: Path) -> StageCompute:
    """The compute recorded in a cache entry's metadata when it was made (zeros if it has none)."""
    return StageCompute.from_dict(json.loads((entry / "_meta.json").read_text()).get("compute") or {})
