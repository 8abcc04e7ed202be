"""Where a sweep trial's wall time goes: its fixed part against its training steps, measured in one run.

A small sweep of demo trials (search_spaces/quick.yaml's fixed recipe: 6 distillation epochs on its 6,000
target-task images, 5 finetune epochs, 1 Ray Train worker per trial, 2 trials side by side) runs on local Ray.
Every trial records the seconds of each of its parts (``time_*`` in its row, :mod:`orchestrator.sweeps.trial`);
the driver's ledger adds when Tune started the trial and how long its MLflow writes took
(:class:`orchestrator.ray_adapters.tune.TrialLedger`). Parts:

* actor start: Tune started the trial -> its function runs (a new Ray worker process, imports);
* data load: the task's images and split in the trial;
* set-up: the trial's config, the student's FLOP count;
* distill set-up: the distill stage's wall time less its steps (in process, the default for the demo's one CPU
  worker: the student, the data and per-epoch validation, reports and checkpoints; on a worker group, also Ray
  Train's controller and worker start-up and shutdown). ``--execution worker_group`` measures the latter;
* distillation steps, finetune (training on the labels), evaluation (validation and test), saving the student;
* tracking: the driver's MLflow writes for the trial; result: the trial's end -> Tune's completion callback.

The fixed part is everything but the distillation steps and the finetune. The teacher is linear-probed (the
trials read its cached outputs; its quality does not change a trial's cost); the prepare step is outside the
trials and not counted. The last line is the fixed part's share of a trial.

    python benchmarks/trial_overhead.py                 # about 6 minutes on a 2-core CPU machine
    python benchmarks/trial_overhead.py --trials 2 --epochs 2 --images 3000
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = (("actor start", "time_actor_start_s"), ("data load", "time_data_s"), ("set-up", "time_setup_s"),
         ("distill set-up", "time_worker_group_s"), ("distillation steps", "time_distill_steps_s"),
         ("finetune", "time_finetune_s"), ("evaluation", "time_evaluate_s"), ("save student", "time_save_s"),
         ("result", "time_result_s"), ("tracking (driver)", "time_tracking_s"))
TRAINING = ("time_distill_steps_s", "time_finetune_s")


def space(args) -> dict:
    quick = json.loads(json.dumps(__import__("yaml").safe_load((ROOT / "search_spaces" / "quick.yaml").read_text())))
    images = args.images or quick["fixed"]["transfer_set.max_images"]
    fixed = {**quick["fixed"], "distill.epochs": args.epochs, "transfer_set.max_images": images,
             "transfer_set.source": "target_unlabeled",
             "student": quick["space"]["student"]["choice"]["resnet10t_w16"]}
    for k in ("transfer_set.pool", "transfer_set.retrieval"):
        fixed.pop(k)
    return {"name": f"trial_overhead_{int(time.time())}", "objective": {"metric": "val_top1"},
            "search": {"num_trials": args.trials, "max_concurrent_trials": 2, "seed": 0,
                       "startup_trials": args.trials},
            "resources": quick["resources"], "validation_per_class": quick["validation_per_class"],
            "fixed": fixed, "space": {"distill.temperature": {"loguniform": [1.0, 8.0]}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default=str(ROOT / "tasks" / "fashion_mnist.yaml"))
    ap.add_argument("--storage", default=str(ROOT / "kt_runs"))
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--images", type=int, default=None, help="transfer-set size [quick.yaml's]")
    ap.add_argument("--execution", default="auto", choices=["auto", "in_process", "worker_group"],
                    help="where each trial's distillation runs [auto: in the trial's process for one CPU worker]")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3", "filelock", "timm", "matplotlib", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import orchestrator

    overrides = [f"storage={args.storage}", "teacher.adapt=linear_probe", "tracking.experiment=trial_overhead"]
    sp = space(args)
    sp["fixed"]["distill.execution"] = args.execution
    t0 = time.perf_counter()
    res = orchestrator.sweep(sp, args.task, overrides, name=sp["name"])
    wall = time.perf_counter() - t0
    rows = [r for r in res.rows if r["status"] == "completed"]
    if not rows:
        raise SystemExit(f"no trial completed: {[r.get('error') for r in res.rows]}")
    n_images = sp["fixed"]["transfer_set.max_images"]
    print(f"\n{len(rows)} demo trials ({args.epochs} distillation epochs on {n_images} images, "
          f"2 side by side, distillation {'/'.join(sorted({str(r.get('execution')) for r in rows}))}), "
          f"sweep wall {wall:.0f} s including its prepare step")
    print(f"{'part':<20} " + " ".join(f"{r['trial_id'][-5:]:>8}" for r in rows) + f" {'mean':>8}")
    for name, key in PARTS:
        vals = [float(r.get(key) or 0.0) for r in rows]
        print(f"{name:<20} " + " ".join(f"{v:>8.1f}" for v in vals) + f" {sum(vals) / len(vals):>8.1f}")
    totals = [float(r["time_trial_s"]) for r in rows]
    fixed = [t - sum(float(r.get(k) or 0.0) for k in TRAINING) for t, r in zip(totals, rows)]
    print(f"{'trial (Tune start -> completion)':<20} " + " ".join(f"{v:>8.1f}" for v in totals)
          + f" {sum(totals) / len(totals):>8.1f}")
    mean_fixed, mean_total = sum(fixed) / len(fixed), sum(totals) / len(totals)
    print(f"fixed part per trial: {mean_fixed:.1f} s of {mean_total:.1f} s")
    print(f"ratio fixed / trial wall: {mean_fixed / mean_total:.2f}")


if __name__ == "__main__":
    main()
