"""Sweep wall time with cached teacher outputs against an online teacher, measured in the same run.

The same small sweep (8 trials over KD temperature and loss weights, TPE, same seed, so the same trials)
runs twice on local Ray:

* cached: the sweep's prepare stage runs the teacher over the transfer set once (Ray Data); every trial
  reads those soft labels (the cost of that teacher pass is inside the measured time: a fresh transfer-set
  seed makes it a cache miss);
* online: every distillation step runs the teacher on its batch (the usual KD loop, `distill.teacher_outputs
  = online`).

The stand-in and adapted teacher are built (or found in the cache) before timing: both variants share them.

    python benchmarks/sweep_cache.py                 # about 15 minutes on a 2-core CPU machine
    python benchmarks/sweep_cache.py --trials 4 --epochs 2 --images 3000   # quicker
    python benchmarks/sweep_cache.py --teacher resnet50                    # a teacher nearer a VFM's cost
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

STUDENT = {"id": "timm/resnet10t", "model_kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8}}


def space(args) -> dict:
    return {
        "name": "sweep_cache_bench",
        "search": {"num_trials": args.trials, "max_concurrent_trials": 2, "seed": 0,
                   "startup_trials": args.trials},  # draws independent of results: the same trials both times
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 0.9, "trial_driver_cpus": 0.1},
        "fixed": {"distill.epochs": args.epochs, "distill.batch_size": 128, "distill.augment": False,
                  "finetune.epochs": 2, "transfer_set.max_images": args.images, "student": STUDENT},
        "space": {"distill.temperature": {"loguniform": [1.0, 8.0]}, "distill.kd_weight": {"uniform": [0.5, 1.0]},
                  "distill.ce_weight": {"uniform": [0.0, 1.0]}}}


def resnet50_teacher(storage: str, size: int) -> str:
    """A randomly initialised timm ResNet-50 at ``size`` px, saved as a kt-model/1 checkpoint (teacher compute
    closer to a VFM's than the demo's stand-in; its accuracy is beside the point here). Returns its model id."""
    from orchestrator.models import Preprocess, load_teacher, save_model_checkpoint

    path = Path(storage) / "bench" / f"resnet50_{size}px.pt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        t = load_teacher("timm/resnet50")
        t.preprocess = Preprocess(3, (size, size), t.preprocess.mean, t.preprocess.std)
        save_model_checkpoint(t, path)
    return f"checkpoint/{path}"


def warm_teacher(task: str, overrides: list[str]):
    """Build or find the (stand-in) and adapted teacher; returns (teacher FLOPs/image, student FLOPs/image)."""
    import torch

    from orchestrator.cache import Cache
    from orchestrator.config import load_config
    from orchestrator.models.preprocess import Preprocess
    from orchestrator.models.students import create_student
    from orchestrator.methods.common import ensure_adapted, load_data, stage_data
    from orchestrator.run_context import Ctx
    from orchestrator.stages.compute import forward_flops
    from orchestrator.tracking import NullTracker

    cfg = load_config(task, overrides)
    data, split, dcomp = load_data(cfg)
    ctx = Ctx(cfg, Cache(cfg.storage_uri()), NullTracker(), cfg.storage_path() / "runs", "cpu", data, split)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    stage_data(ctx, dcomp)
    ensure_adapted(ctx)
    h, w, c = data.train.images.shape[1:]
    mean, std = data.pixel_stats()
    student = create_student(STUDENT["id"], data.num_classes, Preprocess(c, (h, w), tuple(mean), tuple(std)),
                             STUDENT["model_kwargs"])
    torch.set_num_threads(2)
    return ctx.teacher_flops, forward_flops(student, (c, h, w))


def timed_sweep(args, mode: str, seed: int) -> tuple[float, object]:
    import orchestrator

    t0 = time.perf_counter()
    res = orchestrator.sweep(space(args), args.task, args.overrides + [
        f"transfer_set.seed={seed}", f"distill.teacher_outputs={mode}", "tracking.experiment=sweep_cache_benchmark"],
        name=f"bench-{args.teacher}-{mode}-{seed}")
    return time.perf_counter() - t0, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default=str(ROOT / "tasks" / "fashion_mnist.yaml"))
    ap.add_argument("--storage", default=str(ROOT / "kt_runs"))
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--images", type=int, default=6000, help="transfer-set size")
    ap.add_argument("--teacher", default="standin", choices=["standin", "resnet50"],
                    help="standin: the demo's adapted stand-in (36 MFLOPs/img); resnet50: a random-init ResNet-50 "
                    "at --teacher-size px, linear-probed (167 MFLOPs/img at 32 px)")
    ap.add_argument("--teacher-size", type=int, default=32)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3", "filelock", "timm", "matplotlib", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    args.overrides = [f"storage={args.storage}"]
    if args.teacher == "resnet50":
        args.overrides += [f"teacher.id={resnet50_teacher(args.storage, args.teacher_size)}",
                           "teacher.adapt=linear_probe", "teacher.probe_epochs=100"]
    t_flops, s_flops = warm_teacher(args.task, args.overrides)
    seed = int(time.time())  # a transfer set no earlier run labeled: the cached variant pays its teacher pass
    cached_s, cached = timed_sweep(args, "cached", seed)
    online_s, online = timed_sweep(args, "online", seed)
    drawn = [sorted(json.dumps(r["params"], sort_keys=True) for r in res.rows) for res in (cached, online)]
    same = drawn[0] == drawn[1]
    passes = {name: res.metrics.get("trial_teacher_forward_passes", 0) for name, res in
              (("cached", cached), ("online", online))}
    import mlflow

    prep = mlflow.MlflowClient(cached.tracking_uri).get_run(cached.parent_run_id).data.metrics
    passes["cached"] += prep.get("prepare.teacher_forward_passes", 0)
    print(f"\nteacher {t_flops / 1e6:.1f} MFLOPs/img, student {s_flops / 1e6:.2f} MFLOPs/img: "
          f"teacher/student = {t_flops / s_flops:.1f}x" + ("" if t_flops >= 10 * s_flops else "  (< 10x!)"))
    print(f"{args.trials} trials x {args.epochs} epochs on {args.images} transfer images; same trials drawn: {same}")
    print(f"{'variant':<8} {'wall s':>8} {'teacher fwd':>12} {'mean val top-1':>15}")
    for name, secs, res in (("cached", cached_s, cached), ("online", online_s, online)):
        vals = [r["val_top1"] for r in res.rows if r["status"] == "completed"]
        print(f"{name:<8} {secs:>8.0f} {int(passes[name]):>12,} {sum(vals) / max(1, len(vals)):>15.4f}")
    print(f"cache speed-up: {online_s / cached_s:.2f}x  (online / cached wall time)")


if __name__ == "__main__":
    main()
