"""A cost model for paper 1's ImageNet 1% shape (Vemulapalli et al., ICML 2024: distil on the 1.27 M unlabeled
ImageNet train images at 224 px), built from what is measured here and stated assumptions.

Measured (this machine): the teacher's and the student's FLOPs per image (``torch.utils.flop_counter`` on the
random-init architectures: ViT-L/14 at 224 px, CLIP's image tower in timm, and the student), and the data plane's
read + decode rate per CPU core at 224 px (``benchmarks/data_plane.py``'s JSON lines: the in-process distillation
rows, images/s over the CPUs it had). Assumed (printed, change them with flags): the GPU's dense bf16 peak and the
fraction of it reached (MFU), the CPU cores per GPU, ImageNet's mean JPEG size (about 110 KB: 140 GB / 1.28 M).

Printed: disk (encoded shards, teacher outputs), memory per node, teacher-inference and distillation hours, and
what a second sweep trial costs once the teacher outputs are cached (distillation only).

    python benchmarks/cost_model.py --gpus 8                     # after benchmarks/data_plane.py
    python benchmarks/cost_model.py --gpus 8 --peak-tflops 989 --mfu 0.4 --cores-per-gpu 12
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def flops_per_image(model_id: str, px: int, train: bool) -> float:
    """FLOPs of one image through a random-init timm architecture (forward; x3 for forward + backward)."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    m = timm.create_model(model_id, pretrained=False, num_classes=1000).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(torch.zeros(1, 3, px, px))
    return fc.get_total_flops() * (3 if train else 1)


def measured_decode_rate(path: Path) -> tuple[float, dict]:
    """Images/s per CPU core of the data plane at its largest N (the in-process distillation pass: read,
    decode, batch; its student is tiny, so the data plane bounds it), and that row."""
    import os

    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("pass") == "distill" and r.get("loader") == "ours"]
    if not rows:
        raise SystemExit(f"{path} has no data_plane rows; run benchmarks/data_plane.py first")
    r = max(rows, key=lambda r: (r["px"], r["n"]))
    return r["images_per_s"] / (os.cpu_count() or 1), r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1_270_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--teacher", default="vit_large_patch14_clip_224")
    ap.add_argument("--student", default="resnet50")
    ap.add_argument("--px", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=100, help="distillation passes over the transfer set")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--peak-tflops", type=float, default=312.0, help="dense bf16 peak per GPU (A100: 312)")
    ap.add_argument("--mfu", type=float, default=0.35, help="assumed fraction of the peak reached")
    ap.add_argument("--cores-per-gpu", type=int, default=8)
    ap.add_argument("--jpeg-kb", type=float, default=110.0)
    ap.add_argument("--feature-dim", type=int, default=1024)
    ap.add_argument("--rows", default=str(ROOT / "benchmarks" / "results" / "data_plane.jsonl"))
    a = ap.parse_args()

    per_core, row = measured_decode_rate(Path(a.rows))
    t_fwd = flops_per_image(f"{a.teacher}", a.px, train=False)
    s_train = flops_per_image(a.student, a.px, train=True)
    gpu_rate = a.peak_tflops * 1e12 * a.mfu * a.gpus  # FLOP/s of the GPUs together
    cpu_rate = per_core * a.cores_per_gpu * a.gpus  # decoded images/s the nodes' CPUs feed
    n = a.images

    def hours(flops_per_img: float, passes: float) -> tuple[float, str]:
        gpu_s = n * passes * flops_per_img / gpu_rate
        cpu_s = n * passes / cpu_rate
        return max(gpu_s, cpu_s) / 3600, "GPU-bound" if gpu_s >= cpu_s else "decode-bound"

    teach_h, teach_bound = hours(t_fwd, 1)
    dist_h, dist_bound = hours(s_train, a.epochs)
    shards_gb = n * a.jpeg_kb * 1e3 / 1e9
    outputs_gb = n * (a.classes * 4 + a.feature_dim * 2) / 1e9
    index_mb = n * 70 / 1e6  # index.parquet columns + keys, read by every process that opens the store
    print(f"measured here: data plane {per_core:.0f} images/s per core at {row['px']} px "
          f"(benchmarks/data_plane.py, N={row['n']}); teacher {a.teacher} {t_fwd / 1e9:.1f} GFLOPs/image; "
          f"student {a.student} {s_train / 1e9:.1f} GFLOPs/image trained (forward + backward)")
    print(f"assumed: {a.gpus} GPUs x {a.peak_tflops:.0f} TFLOP/s bf16 x MFU {a.mfu}; {a.cores_per_gpu} decoding "
          f"cores per GPU; {a.jpeg_kb:.0f} KB per JPEG")
    print()
    print("| quantity | value |")
    print("|---|---|")
    print(f"| transfer images | {n:,} at {a.px} px |")
    print(f"| disk: encoded image shards | {shards_gb:.0f} GB (decoded it would be {n * a.px * a.px * 3 / 1e9:.0f} GB)|")
    print(f"| disk: teacher outputs (logits float32 + features float16) | {outputs_gb:.1f} GB |")
    print(f"| memory per process: shard index | {index_mb:.0f} MB (rows of outputs are read on demand) |")
    print(f"| teacher inference, one pass | {teach_h:.1f} h on {a.gpus} GPUs ({teach_bound}) |")
    print(f"| distillation, {a.epochs} passes | {dist_h:.1f} h on {a.gpus} GPUs ({dist_bound}) |")
    print(f"| first sweep trial (teacher pass + distillation) | {teach_h + dist_h:.1f} h |")
    print(f"| every further trial on the same teacher and transfer set | {dist_h:.1f} h (teacher outputs cached) |")


if __name__ == "__main__":
    main()
