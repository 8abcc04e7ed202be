"""Ray Train's cost against the same distillation loop run in this process, measured in one run.

Four measurements on real Fashion-MNIST images (teacher logits drawn at random: their values do not change
the cost of a step), the demo's student at 28 px, the same ``DistillConfig``:

* plain: :func:`orchestrator.stages.distill.distill_local` in this process, one thread per core;
* in process x1: :func:`orchestrator.ray_adapters.train.distill_ray` with one CPU worker, which runs in this
  process (Ray Train's local mode, the default for one CPU worker; as many threads);
* ray x1: the same forced onto a Ray Train worker group of one (``execution="worker_group"``);
* ray x2: two workers on the machine's cores (one thread each), reported as a scaling efficiency
  (plain wall / (2 x ray x2 wall) is 1.0 for perfect scaling of the same total steps);
* fixed cost: a trivial ``fit()`` (one report) with Ray's stock ``TorchTrainer`` and with the project's
  :func:`orchestrator.ray_adapters.session.torch_trainer` (no PlacementGroupCleaner).

It also reports the student's training FLOP/s (:func:`orchestrator.stages.compute.train_flops`) as a fraction of
this machine's float32 GEMM FLOP/s at the same threads. The last line is the ratio in process x1 / plain.

    python benchmarks/train_overhead.py                  # about 4 minutes on a 2-core CPU machine
    python benchmarks/train_overhead.py --images 20000 --epochs 3
    python benchmarks/train_overhead.py --steps 2000     # the default recipe's budget: about 11 minutes
    python benchmarks/train_overhead.py --images 6000 --epochs 6 --batch-size 128   # a demo trial's budget

With ``--steps`` the budget is in optimizer steps, reported every 100 (the default recipe's ``distill``); two
workers then take ``2 x batch_size`` images a step, and the scaling efficiency counts images, not steps.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STUDENT = ("timm/resnet10t", {"channels": [16, 32, 64, 128], "stem_width": 16})


def gemm_flops(threads: int, n: int = 1024, reps: int = 20) -> float:
    """Measured float32 matmul FLOP/s at ``threads`` threads (2 n^3 per product)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def trivial_fit(stock: bool, storage: str, name: str) -> float:
    """Wall seconds of a 2-worker fit() whose workers report once and return."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.ray_adapters.session import torch_trainer

    def fn(config):
        import ray.train

        ray.train.report({"x": 1})

    make = TorchTrainer if stock else torch_trainer
    t = time.perf_counter()
    make(fn, scaling_config=ScalingConfig(num_workers=2),
         run_config=RunConfig(name=name, storage_path=storage)).fit()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=12000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="a steps budget instead of --epochs")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()

    import numpy as np
    import torch

    from orchestrator.config import DatasetConfig, DistillConfig
    from orchestrator.data import load_task_data
    from orchestrator.models.students import create_student, student_preprocess
    from orchestrator.ray_adapters.session import ensure_ray
    from orchestrator.ray_adapters.train import distill_ray
    from orchestrator.stages.compute import train_flops
    from orchestrator.stages.distill import DistillData, distill_local
    from orchestrator.stages.schedule import distill_plan

    cores = len(os.sched_getaffinity(0))
    task = load_task_data(DatasetConfig(limit_train=args.images, limit_test=100))
    images = task.train.images[: args.images]  # (N, 28, 28, 1) uint8
    logits = np.random.default_rng(0).normal(size=(len(images), 10)).astype(np.float32)  # (N, 10) float32
    labeled = task.train.subset(np.arange(100))
    budget = {"steps": args.steps, "epochs": None} if args.steps else {"epochs": args.epochs}
    cfg = DistillConfig(**budget, batch_size=args.batch_size, lr=3e-3, ce_weight=0.5, augment=False)
    pre = student_preprocess(STUDENT[0], STUDENT[1], task)
    tmp = Path(tempfile.mkdtemp(prefix="train_overhead-"))
    d = tmp / "data"
    d.mkdir()
    np.save(d / "images.npy", images)
    np.save(d / "logits.npy", logits)
    np.savez(d / "labeled.npz", images=labeled.images, labels=labeled.labels)
    steps = distill_plan(len(images), cfg, 1).total_steps

    torch.set_num_threads(cores)
    model = create_student(STUDENT[0], 10, pre, STUDENT[1])
    per_image = train_flops(model, (pre.channels, *pre.size))  # forward + backward FLOPs per image
    t = time.perf_counter()
    plain_log = distill_local(model, DistillData(images, logits, labeled), pre, cfg, tmp / "plain")
    plain = time.perf_counter() - t
    total = per_image * args.batch_size * steps
    gemm = gemm_flops(cores)

    ensure_ray(num_cpus=cores)
    common = dict(data=d, student=STUDENT[0], model_kwargs=STUDENT[1], num_classes=10, preprocess=pre.to_dict(),
                  distill=cfg.model_dump(mode="json"), seed=0, storage_path=tmp / "ray", use_gpu=False)
    t = time.perf_counter()
    _, log0 = distill_ray(**common, name="x0", num_workers=1, cpus_per_worker=float(cores))  # auto: in process
    local = time.perf_counter() - t
    t = time.perf_counter()
    _, log1 = distill_ray(**common, name="x1", num_workers=1, cpus_per_worker=float(cores), execution="worker_group")
    ray1 = time.perf_counter() - t
    t = time.perf_counter()
    _, log2 = distill_ray(**common, name="x2", num_workers=2, cpus_per_worker=max(1.0, cores / 2))
    ray2 = time.perf_counter() - t
    stock = trivial_fit(True, str(tmp / "ray"), "stock")
    ours = trivial_fit(False, str(tmp / "ray"), "ours")

    print(f"{len(images)} images, {steps} optimizer steps of {args.batch_size}, {cores} cores")
    print(f"plain loop      {plain:7.1f} s  (epochs {sum(plain_log['seconds']):.1f} s)")
    print(f"in process x1   {local:7.1f} s  (epochs {sum(log0['seconds']):.1f} s; fixed "
          f"{local - sum(log0['seconds']):.1f} s; {log0['execution']}: Ray Train's local mode)")
    print(f"Ray Train x1    {ray1:7.1f} s  (epochs {sum(log1['seconds']):.1f} s; fixed {ray1 - sum(log1['seconds']):.1f} s;"
          f" a worker group of 1, execution: worker_group)")
    x2 = sum(log2["steps"]) * 2 / sum(plain_log["steps"])  # images two workers took, relative to the plain loop
    print(f"Ray Train x2    {ray2:7.1f} s  (epochs {sum(log2['seconds']):.1f} s per rank; "
          f"scaling efficiency {x2 * plain / (2 * ray2):.2f}, epochs only "
          f"{x2 * sum(plain_log['seconds']) / (2 * sum(log2['seconds'])):.2f})")
    print(f"trivial fit()   stock TorchTrainer {stock:.1f} s, torch_trainer {ours:.1f} s (ratio {ours / stock:.2f})")
    rate = total / sum(plain_log["seconds"])
    print(f"machine limit   student training {rate / 1e9:.2f} GFLOP/s = {rate / gemm:.3f} of float32 GEMM "
          f"{gemm / 1e9:.1f} GFLOP/s")
    print(f"ratio Ray Train x1 (worker group) / plain loop: {ray1 / plain:.2f}")
    print(f"ratio one-worker distillation (in process, the default) / plain loop: {local / plain:.2f}")


if __name__ == "__main__":
    main()
