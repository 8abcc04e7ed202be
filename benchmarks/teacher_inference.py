"""Teacher-inference throughput: Ray Data actor pool against a plain PyTorch loop, same model, same images,
measured in the same run. Prints images/s of each, the actor pool's start-up (a 1,024-image pass) and the rate
beyond it, the break-even pass size in TFLOPs (where ``teacher.inference: auto`` switches from the driver to
the actor pool: ``teacher.inference_in_process_max_tflops``), and the ratio.

    python benchmarks/teacher_inference.py [--images 20000] [--actors 2] [--teacher checkpoint/<path>]

Without --teacher it uses a randomly initialised copy of the demo's stand-in architecture (timm resnet18 at
half width, 3x32x32 input) with a 10-way head: throughput does not depend on the weights.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--teacher", default=None, help="a checkpoint/<path> teacher id (default: random stand-in)")
    args = ap.parse_args()

    from orchestrator.config import DatasetConfig
    from orchestrator.data import load_task_data
    from orchestrator.models import Preprocess, load_teacher, save_model_checkpoint
    from orchestrator.ray_adapters.data import teacher_inference
    from orchestrator.ray_adapters.session import ensure_ray
    from orchestrator.models.teachers import load_model_checkpoint
    from orchestrator.stages.compute import forward_flops
    from orchestrator.stages.teacher_outputs import teacher_logits

    images = load_task_data(DatasetConfig()).train.images[: args.images]  # (N, 28, 28, 1) uint8, real images
    tmp = Path(tempfile.mkdtemp(prefix="kt-bench-"))
    if args.teacher:
        ckpt = args.teacher.removeprefix("checkpoint/")
    else:
        t = load_teacher("timm/resnet18", {"channels": [32, 64, 128, 256], "stem_width": 32})
        t.preprocess = Preprocess(3, (32, 32), (0.286,) * 3, (0.353,) * 3)
        t.head = torch.nn.Linear(t.feature_dim, 10)
        ckpt = str(save_model_checkpoint(t, tmp / "teacher.pt"))

    torch.set_num_threads(torch.get_num_threads())  # the plain loop uses every core
    teacher_logits(ckpt, images[:512])  # warm-up
    t0 = time.perf_counter()
    ref = teacher_logits(ckpt, images, args.batch_size)
    plain = time.perf_counter() - t0

    t0 = time.perf_counter()
    ensure_ray()
    init = time.perf_counter() - t0
    t0 = time.perf_counter()
    teacher_inference(ckpt, images[:1024], tmp / "warm", args.batch_size, args.actors)  # warm-up
    small = time.perf_counter() - t0  # mostly the actor pool's start-up: it starts again for every dataset
    t0 = time.perf_counter()
    got = teacher_inference(ckpt, images, tmp / "shards", args.batch_size, args.actors)
    ray_s = time.perf_counter() - t0
    assert np.allclose(got, ref, atol=1e-3), "Ray Data and the plain loop disagree"

    n = len(images)
    print(f"images: {n} real Fashion-MNIST, teacher: {ckpt}, torch threads (plain loop): {torch.get_num_threads()}")
    print(f"plain PyTorch loop : {plain:7.2f} s  {n / plain:9.0f} images/s")
    print(f"Ray Data, {args.actors} actors: {ray_s:7.2f} s  {n / ray_s:9.0f} images/s  (+ {init:.1f} s ray.init, "
          "excluded; parquet shards written)")
    rate = (n - 1024) / max(1e-9, ray_s - small)
    print(f"Ray Data on 1,024 images: {small:.2f} s (the actor pool's start-up, paid by every pass); beyond it "
          f"{rate:.0f} images/s = {rate / (n / plain):.2f}x the plain loop's rate")
    tm = load_model_checkpoint(ckpt)
    fwd = forward_flops(tm, (tm.preprocess.channels, *tm.preprocess.size))  # FLOPs per image
    plain_rate = n * fwd / plain  # FLOP/s of the driver's loop
    speedup = rate / (n / plain)
    if speedup > 1:  # the pass size (FLOPs) at which start-up + work at the pool's rate = work at the plain rate
        even = small * plain_rate / (1 - 1 / speedup)
        print(f"break-even: a pass of {even / 1e12:.2f} TFLOPs ({even / plain_rate:.0f} s of the plain loop; "
              f"teacher {fwd / 1e6:.1f} MFLOPs per image, plain loop {plain_rate / 1e9:.1f} GFLOP/s): "
              "teacher.inference_in_process_max_tflops")
    else:
        print(f"break-even: none on this node (beyond its start-up the pool is {speedup:.2f}x the plain loop)")
    print(f"ratio Ray Data / plain loop throughput: {plain / ray_s:.2f}x")


if __name__ == "__main__":
    main()
