"""One `kt run`: the configured method (default ``task_oriented``, paper 1's recipe: adapt teacher -> transfer
set -> teacher inference (Ray Data) -> distill (Ray Train) -> finetune) over the stage graph of
:mod:`orchestrator.graph`, then evaluation, the deployable student, and the supervised-only student as a same-run
baseline. Every stage's key derives from its declared inputs (:mod:`orchestrator.graph`)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import yaml

from orchestrator.cache import Cache
from orchestrator.config import PipelineConfig
from orchestrator.methods.common import load_data, stage_data  # noqa: F401 (re-exported)
from orchestrator.methods.preflight import preflight
from orchestrator.run_context import Ctx, RunResult  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


def open_session(cfg: PipelineConfig, kind: str):
    """What a run, a comparison or a source ranking opens first: its directory
    ``<storage>/<kind>/<name>-<YYYYmmdd-HHMMSS>`` (:func:`new_dir`), the MLflow store (``tracking.tracking_uri``, else the sqlite
    file under the storage root) and its Tracker, and the device ("cuda" when visible, else "cpu").
    Returns (dir, tracking URI, Tracker, device)."""
    import torch

    from orchestrator.tracking import Tracker, default_tracking_uri

    storage = cfg.storage_path()
    out_dir = new_dir(storage / kind, f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    uri = cfg.tracking.tracking_uri or default_tracking_uri(storage)
    return out_dir, uri, Tracker(uri, cfg.tracking.experiment, storage / "mlartifacts"), (
        "cuda" if torch.cuda.is_available() else "cpu")


def new_dir(parent: Path, name: str) -> Path:
    """Create and return ``parent/name``, or ``name-2``, ``name-3``... when taken: two runs started in the same
    second (side by side on one machine) get directories of their own (``mkdir`` is atomic)."""
    parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        d = parent / (name if i == 1 else f"{name}-{i}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent / name}: 999 directories of that name exist; clean up {parent}")


def run(config: PipelineConfig) -> RunResult:
    """Run the whole pipeline for a validated config on local Ray (or ``$RAY_ADDRESS``), tracked in MLflow.

    Raises ConfigError/DataError/ModelLoadError/UnknownNameError for bad input (before heavy work where
    possible), ray.train.TrainingFailedError if distillation fails after retries.
    """
    cfg = config
    preflight(cfg)
    task, split, data_compute = load_data(cfg)
    run_dir, uri, tracker, device = open_session(cfg, "runs")
    ctx = Ctx(cfg, Cache(cfg.storage_uri()), tracker, run_dir, device, task, split)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    t0 = time.perf_counter()
    with tracker.run(cfg.name, tags={"teacher": cfg.teacher.id, "student": cfg.student.id, "method": cfg.method,
                                     "transfer_set.source": cfg.transfer_set.source}) as parent:
        from orchestrator.tracking import flatten

        tracker.params(flatten(cfg.model_dump(mode="json", exclude={"smoke"})))
        tracker.artifact(run_dir / "config.yaml")
        stage_data(ctx, data_compute)
        result = run_method(ctx)
        files, model_uri = _ship(ctx, result)
        ctx.metrics["wall_seconds_total"] = time.perf_counter() - t0
        ctx.metrics.update({k: float(v) for k, v in ctx.cache.counters().items()})
        tracker.metrics({k: v for k, v in ctx.metrics.items() if "." not in k})
        (run_dir / "result.json").write_text(json.dumps({"table": ctx.table, "metrics": ctx.metrics, "run_id": (
            parent.info.run_id), "tracking_uri": uri, "keys": ctx.keys,
            "student": {"files": [p.name for p in files], "model_uri": model_uri}}, indent=1))
        tracker.artifact(run_dir / "result.json")
        return RunResult(parent.info.run_id, uri, run_dir, ctx.table, ctx.metrics, ctx.stages,
                         parent.info.experiment_id)


def run_method(ctx: Ctx):
    """Train with ``ctx.cfg.method``, evaluate the final student, and (``baseline.enabled``) the supervised-only
    student of the same run. Fills ``ctx.metrics``: ``student_top1``, the method's own (e.g. ``distilled_top1``,
    ``teacher_top1``), ``gain_over_supervised`` and the transfer compute (``transfer_flops_total``,
    ``transfer_device_seconds_total``, ``transfer_images_total``: the method's transfer stages). Returns the
    :class:`~orchestrator.methods.MethodResult`."""
    from orchestrator.methods import METHODS
    from orchestrator.methods.student_stages import stage_evaluate

    method = METHODS.get(ctx.cfg.method)
    log.info("method %s: %s (%s)", method.name, method.summary, method.source)
    result = method.train(ctx)
    top1 = stage_evaluate(ctx, "student", method.role, result.student, result.preprocess, result.model_id)
    ctx.metrics.update({"student_top1": top1, **result.metrics})
    if "adapt_teacher" in ctx.stages:
        ctx.metrics["teacher_top1"] = ctx.stages["adapt_teacher"]["top1"]
    if ctx.cfg.baseline.enabled and method.name != "supervised":
        base = METHODS.get("supervised").train(ctx)
        base_top1 = stage_evaluate(ctx, "baseline", "student (supervised-only)", base.student, base.preprocess)
        ctx.metrics.update(baseline_top1=base_top1, gain_over_supervised=top1 - base_top1)
    stages = [ctx.stages[k] for k in method.transfer_stages if k in ctx.stages]
    ctx.metrics.update({f"transfer_{k}_total": float(sum(s.get(k, 0.0) for s in stages))
                        for k in ("flops", "device_seconds", "images")})
    return result


def _ship(ctx: Ctx, result) -> tuple[list, str | None]:
    """The final student as a deployable bundle (+ ONNX, MLflow model); returns (files, model URI or None)."""
    from orchestrator.methods import METHODS
    from orchestrator.models.export import export_deployable

    cfg, role = ctx.cfg, METHODS.get(ctx.cfg.method).role
    row = next(r for r in reversed(ctx.table) if r["role"] == role)
    lineage = {"method": cfg.method, "task": cfg.name, "teacher": ctx.teacher_id, "role": role,
               **{f"{k}.key": v for k, v in ctx.keys.items()}, "transfer_set.source": cfg.transfer_set.source,
               "test_top1": ctx.metrics["student_top1"], "student_flops": row["flops"], "student_params": row["params"]}
    files, parts = export_deployable(result.student, result.preprocess, ctx.run_dir / "student",
                                     model_id=result.model_id, model_kwargs=result.model_kwargs,
                                     classes=ctx.task.classes, test_images=ctx.task.test.images, lineage=lineage)
    for p in files:
        ctx.tracker.artifact(p, "student")
    return files, (ctx.tracker.model(parts) if parts else None)
