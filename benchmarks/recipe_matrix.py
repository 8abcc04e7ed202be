"""The default recipe on every offline task the project ships, x seeds: does the final student beat the labels
alone, and how close does it come to its adapted teacher? (issue: "the default recipe must not make a user's
student worse than training on the labels alone").

Tasks: ``fashion_mnist`` (1% labels), ``mnist`` (10 per class), ``font_digits`` (an ImageFolder of the digits
0-9 rendered in the machine's fonts, 10 per class; built into the storage by ``build_font_digits``). Each
(task, seed) is one whole ``kt run`` (``orchestrator.commands.run.run``: MLflow tracking, Ray Train distillation,
the exported student) with the task file's defaults; only ``seed`` varies (the labeled split, ``labels.seed``,
and the adapted teacher, ``teacher.seed: 0``, are the same for every seed, as ``kt compare`` pins them).

Prints per task: teacher, distilled, final and supervised-only test top-1 (mean +- std over the seeds), the
gaps final - supervised and final - teacher, how often the finetune was kept, and as its last line the
worst-case gap "final - supervised-only" over the tasks.

Usage::

    .venv/bin/python benchmarks/recipe_matrix.py [--tasks fashion_mnist,mnist,font_digits] [--seeds 0,1,2]
        [--storage /tmp/kt_recipe] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ("fashion_mnist", "mnist", "font_digits")
COLUMNS = (("teacher", "teacher_top1"), ("distilled", "distilled_top1"), ("final", "student_top1"),
           ("supervised", "baseline_top1"))


def run_task_seed(name: str, seed: int, storage: Path, extra: list[str]) -> dict:
    """One ``kt run`` of ``tasks/<name>.yaml`` at ``seed``; returns its row (top-1s in [0, 1], seconds)."""
    from orchestrator.config import load_config
    from orchestrator.commands.run import run

    over = [f"storage={storage}", f"seed={seed}", "teacher.seed=0", f"tracking.experiment=recipe_{name}", *extra]
    if name == "font_digits":
        from orchestrator.demo.tasks import build_font_digits

        root = storage / "data" / "font_digits"
        build_font_digits(root)
        over.append(f"data.root={root}")
    cfg = load_config(ROOT / "tasks" / f"{name}.yaml", over)
    t0 = time.perf_counter()
    res = run(cfg)
    ft = res.stages.get("finetune", {})
    row = {"task": name, "seed": seed, "wall_s": time.perf_counter() - t0,
           **{col: res.metrics.get(key, float("nan")) for col, key in COLUMNS},
           "finetune_kept": ft.get("kept"), "finetune_checked": ft.get("checked"),
           "val_before": ft.get("val_top1_before"), "val_after": ft.get("val_top1_after")}
    logging.info("%s seed %d: %s", name, seed, {k: (round(v, 4) if isinstance(v, float) else v)
                                                 for k, v in row.items()})
    return row


def summarise(rows: list[dict]) -> list[dict]:
    """Per task: mean and std (percentage points) of each column and of the two gaps, the finetune kept count."""
    out = []
    for name in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == name]
        s = {"task": name, "seeds": len(rs), "wall_s": sum(r["wall_s"] for r in rs)}
        for col, _ in COLUMNS:
            v = 100 * np.array([r[col] for r in rs])
            s[col] = (float(v.mean()), float(v.std()))
        for gap, a, b in (("final-supervised", "final", "supervised"), ("final-teacher", "final", "teacher")):
            v = 100 * np.array([r[a] - r[b] for r in rs])
            s[gap] = (float(v.mean()), float(v.std()))
        s["finetune_kept"] = sum(bool(r["finetune_kept"]) for r in rs)
        out.append(s)
    return out


def print_table(summary: list[dict], seeds: list[int], wall: float) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"default recipe, test top-1 (%) mean ± std over seeds {seeds}")
    for c in ("task", "teacher", "distilled", "final", "supervised-only", "final − supervised",
              "final − teacher", "finetune kept", "wall (min)"):
        t.add_column(c, justify="left" if c == "task" else "right")
    for s in summary:
        f = lambda k: f"{s[k][0]:.2f} ± {s[k][1]:.2f}"  # noqa: E731
        t.add_row(s["task"], f("teacher"), f("distilled"), f("final"), f("supervised"),
                  f"{s['final-supervised'][0]:+.2f} ± {s['final-supervised'][1]:.2f}",
                  f"{s['final-teacher'][0]:+.2f} ± {s['final-teacher'][1]:.2f}",
                  f"{s['finetune_kept']}/{s['seeds']}", f"{s['wall_s'] / 60:.1f}")
    Console(width=170).print(t)
    print(f"wall time {wall / 60:.1f} min")
    worst = min(summary, key=lambda s: s["final-supervised"][0])
    print(f"worst-case gap final - supervised-only over {len(summary)} tasks: {worst['final-supervised'][0]:+.2f} "
          f"points ({worst['task']})", flush=True)


def main() -> None:
    from orchestrator.cache import write_atomic

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--storage", default="/tmp/kt_recipe")
    ap.add_argument("--set", action="append", default=[], help="config override for every run (key=value)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("orchestrator", "ray", "timm", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    storage, seeds = Path(args.storage).resolve(), [int(s) for s in args.seeds.split(",")]
    storage.mkdir(parents=True, exist_ok=True)
    out = storage / "recipe_matrix.json"
    rows = json.loads(out.read_text()) if out.is_file() else []  # a re-run continues where it stopped
    t0 = time.perf_counter()
    for seed in seeds:  # seed-major: a partial run still covers every task
        for name in args.tasks.split(","):
            if any(r["task"] == name and r["seed"] == seed for r in rows):
                continue
            rows.append(run_task_seed(name, seed, storage, args.set))
            write_atomic(out, json.dumps(rows, indent=1))
    rows = [r for r in rows if r["task"] in args.tasks.split(",") and r["seed"] in seeds]
    print(f"rows: {out}")
    print_table(summarise(rows), seeds, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
