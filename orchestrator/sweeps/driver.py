"""`kt sweep`: prepare what every trial shares, run the search (Ray Tune + Optuna), summarise the trials.

1. Prepare (cached, once per sweep): data and split with a held-out validation subset, the (stand-in)
   teacher, its adaptation, and for every transfer set a trial can draw, the transfer set and its teacher
   outputs: the teacher runs over a given transfer set once, however many trials use it.
2. Search: one Tune trial per drawn configuration (distill with Ray Train, finetune, evaluate); MLflow child
   runs under one parent run per sweep.
3. Summarise: trials CSV, Pareto plot (accuracy against student FLOPs and device-seconds) on the parent run.

State lives in ``<storage>/sweeps/<name>/`` (``sweep.json``, ``tune/``, ``trials/<id>/``), so a sweep whose
driver was killed continues with ``--resume``.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.cache import Cache, write_atomic
from orchestrator.config import ConfigError, PipelineConfig, config_hash, load_task_yaml, resolve_config
from orchestrator.sweeps.space import (SearchSpace, apply_overrides, base_tree, check_trial_budget, check_values,
                                       describe, load_space)
from orchestrator.storage import join
from orchestrator.sweeps.trial import SweepContext

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """What a sweep returns: its name and directory, the MLflow parent run, and one row per trial (see
    :mod:`orchestrator.sweeps.pareto`)."""

    name: str
    sweep_dir: Path
    parent_run_id: str
    tracking_uri: str
    experiment: str
    rows: list[dict]
    metrics: dict[str, float]


def _task_tree(task: str | Path | dict, overrides: list[str] | None, smoke: bool) -> dict:
    """The validated task config as a tree, with its storage made absolute (a path or URI): Tune runs each
    trial in a working directory of its own, where a relative ``kt_runs`` would be another directory."""
    raw = task if isinstance(task, dict) else load_task_yaml(task)
    cfg = resolve_config(raw, overrides, smoke, source=str(task))
    return {**cfg.model_dump(mode="json"), "storage": cfg.storage_uri()}


def sweep_methods(space: SearchSpace, base: dict) -> list[str]:
    """The methods a trial can draw: the choices of a ``method`` dimension, else the base config's."""
    dim = space.space.get("method")
    return [dim.value(v) for v in dim.names()] if dim is not None else [resolve_config(base).method]


def prepare(name: str, space: SearchSpace, base: dict, parent_tracker, sweep_dir: Path) -> SweepContext:
    """Shared stages, cached: data, and when a method the trials can draw uses it, the teacher (stand-in if
    needed), its adaptation, every transfer set and its teacher outputs. Stage metrics go on the sweep's parent
    run as ``<stage>.<metric>``."""
    import torch

    from orchestrator.methods import METHODS
    from orchestrator.methods.common import load_data, stage_data, stage_teacher_outputs, stage_transfer_set, transfer_slot
    from orchestrator.run_context import Ctx

    cfg0 = resolve_config(base, source="(sweep base)")
    task, split, dcomp = load_data(cfg0)
    ctx = Ctx(cfg0, Cache(cfg0.storage_uri()), parent_tracker, sweep_dir, "cuda" if torch.cuda.is_available()
              else "cpu", task, split, nested_stages=False)
    stage_data(ctx, dcomp)
    sets: dict[str, dict] = {}
    teachers: dict[str, dict] = {}
    if any(METHODS.get(m).uses_teacher for m in sweep_methods(space, base)):
        data_keys = dict(ctx.keys)
        for i, labels in enumerate([None] + space.transfer_set_variants(), start=-1):  # None: the base teacher
            ctx.cfg = resolve_config(apply_overrides(base, space.overrides(labels or {})),
                                     source=f"(transfer set {describe(labels or {})})")
            ctx.keys = dict(data_keys)
            prepare_teacher(ctx, teachers)
            if labels is None:
                shared, base_teacher = dict(ctx.keys), (ctx.teacher_id, ctx.adapted, ctx.teacher_flops)
                top1 = ctx.stages["adapt_teacher"]["top1"]
                continue
            slot = transfer_slot(ctx)
            if slot in sets:
                continue
            ts = stage_transfer_set(ctx, record_as=f"transfer_set_{i}")
            entry = stage_teacher_outputs(ctx, ts, record_as=f"teacher_inference_{i}")
            n = int(ctx.stages[f"teacher_inference_{i}"]["teacher_forward_passes"])
            sets[slot] = {"dir": str(entry), "key": ts.key, "source": ts.source, "description": ts.description,
                          "size": len(ts), "labels": labels, "teacher_forward_passes": n,
                          "keys": {k: ctx.keys[k] for k in ("transfer_set", "teacher_outputs")}}
            log.info("transfer set %d (%s): %s; teacher forward passes now %d", i, describe(labels) or "fixed",
                     ts.description, n)
            del ts
        ctx.cfg, ctx.keys = cfg0, shared
        ctx.teacher_id, ctx.adapted, ctx.teacher_flops = base_teacher
        parent_tracker.metrics({"teacher_top1": top1})
    _carry_passes(sweep_dir / "transfer_sets.json", sets)
    passes = sum(s["teacher_forward_passes"] for s in sets.values())
    parent_tracker.metrics({"prepare.teacher_forward_passes": passes, "prepare.transfer_sets": len(sets)})
    return SweepContext(name=name, sweep_dir=str(sweep_dir), remote_dir=join(cfg0.storage_uri(), "sweeps", name),
                        base=base, space=space, teacher_id=ctx.teacher_id, keys=dict(ctx.keys),
                        adapted=str(ctx.adapted) if ctx.adapted else None, teacher_flops=int(ctx.teacher_flops),
                        transfer_sets=sets, teachers=teachers)


def prepare_teacher(ctx, teachers: dict[str, dict]) -> None:
    """The adapted teacher of ``ctx.cfg`` (a sweep may vary ``teacher.ensemble``): adapted (cached) the first
    time its :func:`~orchestrator.methods.common.teacher_slot` is met and filed in ``teachers``, else set on
    ``ctx`` from there (keys, checkpoint, id, FLOPs)."""
    from orchestrator.methods.common import stage_adapt, stage_teacher, teacher_slot

    slot = teacher_slot(ctx.cfg)
    if slot not in teachers:
        ctx.adapted = None
        stage_teacher(ctx)
        stage_adapt(ctx)
        teachers[slot] = {"adapted": str(ctx.adapted), "teacher_id": ctx.teacher_id,
                          "teacher_flops": int(ctx.teacher_flops),
                          "keys": {k: ctx.keys[k] for k in ("teacher", "adapted_teacher")}}
    t = teachers[slot]
    ctx.keys.update(t["keys"])
    ctx.adapted, ctx.teacher_id, ctx.teacher_flops = Path(t["adapted"]), t["teacher_id"], t["teacher_flops"]


def _carry_passes(previous: Path, sets: dict[str, dict]) -> None:
    """A resumed sweep's prepare step finds its teacher outputs in the cache (no forward passes): add the passes
    its earlier starts made (``transfer_sets.json``), so the counts are the sweep's, over all its starts."""
    if not previous.is_file():
        return
    before = json.loads(previous.read_text())
    for slot, s in sets.items():
        s["teacher_forward_passes"] += int(before.get(slot, {}).get("teacher_forward_passes", 0))


def _max_epochs(space: SearchSpace, base: dict) -> int:
    from orchestrator.stages.schedule import report_epochs

    distill = resolve_config(base).distill
    for key in ("distill.epochs", "distill.steps"):
        dim = space.space.get(key)
        if dim is not None:
            field = key.split(".")[1]
            other = "steps" if field == "epochs" else "epochs"
            return max(report_epochs(distill.model_copy(update={field: int(dim.value(v)), other: None}))
                       for v in dim.extremes())
    return report_epochs(distill)


def sweep(space: str | Path | dict, task: str | Path | dict, overrides: list[str] | None = None,
          space_overrides: list[str] | None = None, smoke: bool = False, name: str | None = None,
          resume: bool = False) -> SweepResult:
    """Run a sweep (see module doc). ``overrides`` apply to the task (``--set``), ``space_overrides`` to the
    search-space file (``--space-set search.num_trials=3``).

    Raises:
        ConfigError: bad space/task, a space with fewer distinct configurations than ``search.num_trials``, a
            sweep of that name exists without ``resume`` (or is missing with it), or the space/task changed since
            the sweep started.
    """
    from orchestrator.tracking import Tracker, default_tracking_uri

    sp = load_space(space, space_overrides)
    src = str(space) if not isinstance(space, dict) else "(python dict)"
    check_trial_budget(sp, src)  # N trials run N distinct configurations: a smaller space is refused here
    task_tree = _task_tree(task, overrides, smoke)
    cfg0 = PipelineConfig.model_validate(task_tree)
    base = base_tree(task_tree, sp)
    check_values(sp, base, src)
    name = name or f"{sp.name}-{cfg0.name}"
    storage = cfg0.storage_path()
    sweep_dir = storage / "sweeps" / name
    state_file = sweep_dir / "sweep.json"
    spec = config_hash({"space": sp.model_dump(mode="json", by_alias=True), "base": base})
    state = _check_state(state_file, name, spec, resume)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    uri = cfg0.tracking.tracking_uri or default_tracking_uri(storage)
    tracker = Tracker(uri, cfg0.tracking.experiment, storage / "mlartifacts")
    t0 = time.perf_counter()
    tags = {"kt.kind": "sweep", "kt.sweep": name, "kt.space": sp.name, "teacher": cfg0.teacher.id}
    with tracker.run(name, tags=None if state else tags, run_id=state.get("parent_run_id") if state else None) as run:
        parent = run.info.run_id
        if not state:
            from orchestrator.tracking import flatten

            tracker.params(flatten({"space": sp.model_dump(mode="json", by_alias=True, exclude={"space"}),
                                    "task": cfg0.name, "dimensions": ",".join(sp.space)}))
            write_atomic(sweep_dir / "space.json", json.dumps(sp.model_dump(mode="json", by_alias=True), indent=1))
            tracker.artifact(sweep_dir / "space.json")
        write_atomic(state_file, json.dumps({"name": name, "spec": spec, "parent_run_id": parent,
                                             "tracking_uri": uri, "experiment": cfg0.tracking.experiment,
                                             "experiment_id": tracker.experiment_id, "status": "running"}, indent=1))
        sctx = prepare(name, sp, base, tracker, sweep_dir)
        write_atomic(sweep_dir / "transfer_sets.json", json.dumps(sctx.transfer_sets, indent=1, default=str))
        from orchestrator.ray_adapters.tune import TrialLedger, run_tune

        from orchestrator.sweeps.trial import run_trial, trial_row

        ledger = TrialLedger(uri, tracker.experiment_id, parent, str(sweep_dir), name, trial_row, sp.search.num_trials)

        run_tune(sctx, run_trial, _max_epochs(sp, base), [ledger], resume=bool(state))
        rows = load_rows(sweep_dir)
        metrics = summarise(rows, sp, sweep_dir, tracker, time.perf_counter() - t0)
        write_atomic(state_file, json.dumps({**json.loads(state_file.read_text()), "status": "finished"}, indent=1))
    return SweepResult(name, sweep_dir, parent, uri, cfg0.tracking.experiment, rows, metrics)


def _check_state(state_file: Path, name: str, spec: str, resume: bool) -> dict:
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if not resume:
            raise ConfigError(f"sweep {name!r} already exists ({state_file.parent}); continue it with --resume, "
                              "or start another with --name NEW")
        if state["spec"] != spec:
            raise ConfigError(f"the search space or task changed since sweep {name!r} started; resume it with the "
                              "same files and --set values, or start a new sweep with --name NEW")
        return state
    if resume:
        raise ConfigError(f"no sweep {name!r} to resume under {state_file.parent.parent}; drop --resume to start it")
    return {}


def sweep_state(sweep_dir: Path) -> dict:
    """A sweep's ``sweep.json`` (name, parent run, tracking URI, experiment, status), with its MLflow experiment's
    id (read from the store for a sweep started before the id was recorded there; None where unreadable)."""
    state = json.loads((Path(sweep_dir) / "sweep.json").read_text())
    if not state.get("experiment_id"):
        from orchestrator.tracking import run_experiment_id

        state["experiment_id"] = run_experiment_id(state["tracking_uri"], state["parent_run_id"])
    return state


def load_rows(sweep_dir: Path) -> list[dict]:
    """Every ended trial's row, by trial id: the one the driver's ledger wrote (``row.json``), except that a
    trial's commit (``final.json``) wins over a missing or not-completed row (the driver died between the two:
    :func:`orchestrator.sweeps.trial.committed_row`)."""
    from orchestrator.sweeps.trial import committed_row

    rows = []
    for tdir in sorted(d for d in (sweep_dir / "trials").glob("*") if d.is_dir()):
        row = json.loads((tdir / "row.json").read_text()) if (tdir / "row.json").is_file() else None
        if row is None or row["status"] != "completed":
            row = committed_row(tdir) or row
        if row is not None:
            rows.append(row)
    return rows


def summarise(rows: list[dict], space: SearchSpace, sweep_dir: Path, tracker, wall: float) -> dict[str, float]:
    """Trials CSV and Pareto plot as parent-run artifacts; counts, best trial and teacher passes as metrics."""
    from orchestrator.sweeps.pareto import plot_pareto, write_trials_csv

    done = [r for r in rows if r["status"] == "completed"]
    csv = write_trials_csv(rows, sweep_dir / "trials.csv")
    png = plot_pareto(rows, sweep_dir / "pareto.png", title=f"sweep {sweep_dir.name}")
    tracker.artifact(csv)
    tracker.artifact(png)
    metrics: dict[str, Any] = {
        "trials_completed": len(done), "trials_stopped": sum(r["status"] == "stopped" for r in rows),
        "trials_failed": sum(r["status"] == "error" for r in rows), "sweep_wall_seconds": wall,
        "trial_teacher_forward_passes": sum(r.get("teacher_forward_passes") or 0 for r in done)}
    if done:
        best = max(done, key=lambda r: r["val_top1"])
        metrics.update(best_val_top1=best["val_top1"], best_test_top1=best["test_top1"])
        tracker.tags({"kt.best_trial": best["trial_id"]})
    tracker.metrics(metrics)
    return metrics
