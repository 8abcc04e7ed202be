"""Results of a hyper-parameter sweep: Pareto fronts (accuracy against compute), best configuration per
compute budget, a CSV of all trials and a PNG of the fronts. Pure Python: no Ray, no MLflow.

A trial row is a dict::

    {"trial_id": str, "status": "completed" | "stopped" | "error",
     "val_top1": float | None,        # validation top-1, fraction 0..1
     "test_top1": float | None,       # test top-1, fraction 0..1
     "student_flops": float | None,   # student forward FLOPs per image
     "device_seconds": float | None,  # training device-seconds
     "train_flops": float | None,     # training FLOPs, total
     "images_seen": float | None,     # training images, total
     "params": {dotted_key: value}, "error": str | None, ...extra keys}

Only ``completed`` rows take part in fronts and budgets; ``stopped`` (early-stopped) rows are plotted hollow;
``error`` rows appear in the CSV (and in ``report.print_sweep``) with their message.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

from orchestrator.cache import write_atomic

COSTS = {"student_flops": "student forward FLOPs / image", "device_seconds": "training device-seconds"}
METRICS = ("val_top1", "test_top1", "student_flops", "device_seconds", "train_flops", "images_seen")
PARETO_FLAGS = {"pareto_flops": "student_flops", "pareto_seconds": "device_seconds"}
_BASE_KEYS = {"trial_id", "status", "params", "error", *METRICS}


def trial_label(row: dict) -> str:
    """Short label of a trial: the last 5 characters of its id."""
    return str(row["trial_id"])[-5:]


def _value(row: dict, key: str) -> float | None:
    """``row[key]`` as a float, or None when missing or not finite."""
    v = row.get(key)
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _points(rows: list[dict], objective: str, cost: str) -> list[tuple[float, float, dict]]:
    """(cost, objective, row) of the completed rows that have both values (not those that reused another
    trial's result: that trial is the point)."""
    pts = []
    for r in rows:
        c, o = _value(r, cost), _value(r, objective)
        if r.get("status") == "completed" and not r.get("reused_from") and c is not None and o is not None:
            pts.append((c, o, r))
    return pts


def _dominates(a: tuple[float, float, Any], b: tuple[float, float, Any]) -> bool:
    """True when point a is at least as cheap and as good as b, and strictly better in one."""
    return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])


def pareto_front(rows: list[dict], objective: str = "val_top1", cost: str = "student_flops") -> list[dict]:
    """Non-dominated completed rows (objective maximised, cost minimised), sorted by cost ascending.

    A row with the same cost and a lower objective, or the same objective and a higher cost, is dominated;
    rows at identical (cost, objective) points are all kept. Rows missing either value are skipped.
    """
    pts = _points(rows, objective, cost)
    front = [p for p in pts if not any(_dominates(q, p) for q in pts)]
    return [r for _, _, r in sorted(front, key=lambda p: (p[0], -p[1]))]


def best_per_budget(rows: list[dict], objective: str = "val_top1", cost: str = "student_flops",
                    budgets: list[float] | None = None) -> list[tuple[float, dict | None]]:
    """For each budget (in the unit of ``cost``; default: the distinct costs of the Pareto-front points,
    ascending), the completed row with the best objective among those costing <= budget (the cheaper on
    ties), or None if none fits."""
    pts = _points(rows, objective, cost)
    if budgets is None:
        budgets = sorted({_value(r, cost) for r in pareto_front(rows, objective, cost)})
    out: list[tuple[float, dict | None]] = []
    for b in budgets:
        fits = [p for p in pts if p[0] <= b]
        best = max(fits, key=lambda p: (p[1], -p[0]))[2] if fits else None
        out.append((float(b), best))
    return out


def varying_params(rows: list[dict]) -> list[str]:
    """The sorted params keys whose value differs between the trials that did not fail (missing counts as a
    value); all trials if every one failed."""
    rows = [r for r in rows if r.get("status") != "error"] or rows
    keys = sorted({k for r in rows for k in (r.get("params") or {})})
    seen = {k: {json.dumps((r.get("params") or {}).get(k), sort_keys=True, default=str) for r in rows}
            for k in keys}
    return [k for k in keys if len(seen[k]) > 1]


def _cell(v: Any) -> Any:
    """A CSV cell: scalars as is, None as empty, anything else as JSON."""
    if v is None:
        return ""
    if isinstance(v, (str, int, float, bool)):
        return v
    return json.dumps(v, sort_keys=True, default=str)


def write_trials_csv(rows: list[dict], path: str | Path) -> Path:
    """Write one line per trial (every status), atomically.

    Columns: trial_id, status, the metrics (fractions, FLOPs, device-seconds, images), ``pareto_flops`` and
    ``pareto_seconds`` (on the val-top-1 front against student FLOPs / device-seconds), ``param.<key>`` for
    the union of params keys (sorted), any extra row keys (sorted), error last.
    """
    params = sorted({k for r in rows for k in (r.get("params") or {})})
    extra = sorted({k for r in rows for k in r} - _BASE_KEYS)
    on_front = {flag: {id(r) for r in pareto_front(rows, cost=c)} for flag, c in PARETO_FLAGS.items()}
    header = ["trial_id", "status", *METRICS, *PARETO_FLAGS, *(f"param.{k}" for k in params), *extra, "error"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        p = r.get("params") or {}
        w.writerow([_cell(r.get("trial_id")), _cell(r.get("status")), *(_cell(r.get(m)) for m in METRICS),
                    *(id(r) in on_front[f] for f in PARETO_FLAGS), *(_cell(p.get(k)) for k in params),
                    *(_cell(r.get(k)) for k in extra), _cell(r.get("error"))])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, buf.getvalue())


def _stopped_points(rows: list[dict], objective: str, cost: str) -> list[tuple[float, float, dict]]:
    """(cost, objective, row) of the early-stopped rows that have both values."""
    return _points([{**r, "status": "completed"} for r in rows if r.get("status") == "stopped"],
                   objective, cost)


def _panel(ax, rows: list[dict], objective: str, cost: str, scale: float, log: bool) -> None:
    """One panel: objective in percent against ``cost / scale`` (log x axis if ``log`` and all positive)."""
    done, stopped = _points(rows, objective, cost), _stopped_points(rows, objective, cost)
    front = [(_value(r, cost), _value(r, objective)) for r in pareto_front(rows, objective, cost)]
    if stopped:
        ax.scatter([c / scale for c, _, _ in stopped], [100 * o for _, o, _ in stopped], s=36,
                   facecolors="none", edgecolors="grey", label="stopped early")
    if done:
        ax.scatter([c / scale for c, _, _ in done], [100 * o for _, o, _ in done], s=24, color="tab:blue",
                   alpha=0.6, label="completed")
    if front:
        xs, ys = [c / scale for c, _ in front], [100 * o for _, o in front]
        ax.step(xs, ys, where="post", color="tab:red", lw=1.5)
        ax.scatter(xs, ys, s=60, color="tab:red", zorder=3, label="Pareto front")
    labels: dict[tuple[float, float], list[str]] = {}  # trials at one point share one label
    for c, o, r in done + stopped:
        labels.setdefault((c / scale, 100 * o), []).append(trial_label(r))
    for xy, names in labels.items():
        ax.annotate(",".join(names), xy, fontsize=7, xytext=(3, 3), textcoords="offset points")
    if not done and not stopped:
        ax.text(0.5, 0.5, "no trials with these metrics", ha="center", va="center", transform=ax.transAxes)
    elif log and all(c > 0 for c, _, _ in done + stopped):
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
    ax.grid(True, which="both", alpha=0.3)
    if done or stopped:
        ax.legend(fontsize=8, loc="lower right")


def plot_pareto(rows: list[dict], path: str | Path, objective: str = "val_top1", title: str = "") -> Path:
    """Write a PNG with two panels: objective (percent) against student forward MFLOPs / image (log x axis)
    and against training device-seconds. Completed trials are points, the Pareto front a step line with its
    points highlighted, early-stopped trials hollow grey markers; each point is labelled (last 5 characters of
    the trial id). Written atomically (temporary sibling, then rename). Returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    _panel(left, rows, objective, "student_flops", 1e6, log=True)
    left.set_xlabel("student forward MFLOPs / image (log scale)")
    _panel(right, rows, objective, "device_seconds", 1.0, log=False)
    right.set_xlabel("training device-seconds")
    for ax in (left, right):
        ax.set_ylabel(f"{objective} (%)")
    fig.suptitle(title or f"{objective} against compute")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
