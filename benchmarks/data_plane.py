"""The streaming data plane at growing N: a teacher pass and a distillation epoch over encoded-image shards, with
the peak resident memory (RSS) of every process, against a plain PyTorch ``DataLoader`` over the same shards.

The pool: Fashion-MNIST images upscaled to ``--px`` (default 224) with seeded crops and colour, JPEG-encoded
(quality 90), written once into image shards (:mod:`orchestrator.data.shards`) under ``--root``; a size N reads
the view of its first N rows. The models are tiny and random-init (a timm ResNet with 8-64 channels, inputs
resized to ``--model-px``, default 64), so the data plane (read, decode, resize, batches) is what is measured.

For each N:

* teacher pass, ours: :func:`orchestrator.ray_adapters.data.teacher_inference` (a Ray Data actor pool of
  ``--actors``, each reading and decoding its batches from the shards);
* teacher pass, DataLoader: ``torch.utils.data.DataLoader`` (``--actors`` worker processes decoding single rows,
  the teacher in the main process);
* distillation epoch, ours: :func:`orchestrator.stages.distill.distill_epoch` in this process (the loop
  ``kt run`` runs in process), batches decoded from the shards on a prefetch thread;
* distillation epoch, DataLoader: the same student steps with batches from a shuffling DataLoader.

Printed per N and pass: wall seconds, images/s, the ratio ours / DataLoader, and the peak RSS of the driver, of
the largest other process (Ray workers, DataLoader workers) and of the whole process tree, sampled every 0.25 s
with psutil. Results are appended to ``--out`` as JSON lines.

    python benchmarks/data_plane.py --sizes 25000,100000,200000      # about 40 min on 2 cores
    python benchmarks/data_plane.py --sizes 2000,8000 --px 128       # a quick look (2 min)
    python benchmarks/data_plane.py --sizes "" --folder-sizes 4000,16000   # only `kt run` on ImageFolders
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = {"channels": [8, 16, 32, 64], "stem_width": 8}


class RssSampler:
    """Peak RSS (bytes) of this process and of each descendant process, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.25, pid: int | None = None):
        import psutil

        self.me, self.interval, self.stop = psutil.Process(pid), interval, threading.Event()
        self.peak: dict[int, tuple[str, int]] = {}
        self.tree_peak = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self.stop.is_set():
            total = 0
            for p in [self.me, *self.me.children(recursive=True)]:
                try:
                    rss, name = p.memory_info().rss, " ".join(Path(c).name for c in p.cmdline()[:2])[-60:]
                except psutil.Error:
                    continue
                total += rss
                if rss > self.peak.get(p.pid, ("", 0))[1]:
                    self.peak[p.pid] = (name, rss)
            self.tree_peak = max(self.tree_peak, total)
            self.stop.wait(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def summary(self) -> dict:
        """Peak RSS in MiB: driver, the largest other process (and its name), the process tree."""
        me = self.peak.get(self.me.pid, ("", 0))[1]
        others = [(rss, name) for pid, (name, rss) in self.peak.items() if pid != self.me.pid]
        top = max(others, default=(0, ""))
        return {"driver_mib": me / 2**20, "worker_max_mib": top[0] / 2**20, "worker_max": top[1],
                "tree_mib": self.tree_peak / 2**20}


def _encode(args) -> list[bytes]:
    """Worker: JPEG bytes of images ``start..stop`` of the pool (seeded by their index)."""
    start, stop, px, src = args
    import io

    from PIL import Image

    out = []
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        g = src[i % len(src), ..., 0]  # (28, 28) uint8
        s = int(rng.integers(20, 29))
        y, x = rng.integers(0, 29 - s, 2)
        crop = Image.fromarray(np.ascontiguousarray(g[y:y + s, x:x + s])).resize((px, px), Image.BILINEAR)
        rgb = (np.asarray(crop, np.float32)[..., None] * rng.uniform(0.3, 1.0, 3) + rng.uniform(0, 60, 3))
        b = io.BytesIO()
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB").save(b, "JPEG", quality=90)
        out.append(b.getvalue())
    return out


def build_pool(root: Path, n: int, px: int) -> Path:
    """The image store of ``n`` JPEGs at ``px`` (built once; reused when complete)."""
    from multiprocessing import Pool

    from orchestrator.config import DatasetConfig
    from orchestrator.data import load_task_data
    from orchestrator.data.shards import ShardWriter

    store = root / f"pool_{n}_{px}"
    if (store / "index.parquet").is_file():
        return store
    src = load_task_data(DatasetConfig()).train.images  # (60000, 28, 28, 1) uint8, real
    tmp = root / f".tmp_pool_{n}_{px}"
    writer = ShardWriter(tmp)
    t0 = time.perf_counter()
    chunks = [(s, min(s + 1000, n), px, src) for s in range(0, n, 1000)]
    with Pool(os.cpu_count()) as pool:
        for (start, _, _, _), blobs in zip(chunks, pool.imap(_encode, chunks)):
            for i, data in enumerate(blobs):
                writer.add(start + i, data, -1, "pool", f"{start + i:09d}.jpg", px, px)
    writer.close()
    tmp.rename(store)
    print(f"pool: {n} JPEGs at {px} px written in {time.perf_counter() - t0:.0f} s "
          f"({sum(f.stat().st_size for f in store.glob('*.tar')) / 2**20:.0f} MiB)", flush=True)
    return store


def tiny_teacher(path: Path, model_px: int) -> Path:
    import torch

    from orchestrator.models import Preprocess, load_teacher, save_model_checkpoint

    torch.manual_seed(0)
    t = load_teacher("timm/resnet18", TINY)
    t.preprocess = Preprocess(3, (model_px, model_px), (0.5,) * 3, (0.25,) * 3)
    t.head = torch.nn.Linear(t.feature_dim, 10)
    return save_model_checkpoint(t, path, [str(i) for i in range(10)])


class Rows:
    """A map-style torch Dataset over a view's images (one decode per item), for the plain DataLoader."""

    def __init__(self, view):
        self.view = view

    def __len__(self):
        return len(self.view)

    def __getitem__(self, i):
        import torch

        return torch.from_numpy(self.view.decode(self.view.rows[[i]])[0]), i


def loader(view, batch_size: int, workers: int, shuffle: bool, seed: int = 0):
    import torch

    return torch.utils.data.DataLoader(Rows(view), batch_size=batch_size, num_workers=workers, shuffle=shuffle,
                                       generator=torch.Generator().manual_seed(seed), persistent_workers=False,
                                       prefetch_factor=2)


def timed(fn) -> tuple[float, dict, object]:
    with RssSampler() as s:
        t0 = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
    return wall, s.summary(), out


def run_size(n: int, store: Path, px: int, ckpt: Path, args, work: Path) -> list[dict]:
    import torch

    from orchestrator.config import DistillConfig
    from orchestrator.data.shards import ShardedImages
    from orchestrator.models import Preprocess
    from orchestrator.models.students import create_student
    from orchestrator.ray_adapters.data import teacher_inference
    from orchestrator.stages.distill import DistillData, distill_epoch, make_optimizer
    from orchestrator.stages.teacher_outputs import TeacherPredictor

    view = ShardedImages(str(store), np.arange(n), (px, px), 3, resize=False)
    rows = []

    def row(pass_, kind, wall, rss):
        r = {"n": n, "px": px, "pass": pass_, "loader": kind, "seconds": wall, "images_per_s": n / wall, **rss}
        rows.append(r)
        print(f"N={n:>7} {pass_:<8} {kind:<10} {wall:7.1f} s {n / wall:7.0f} img/s  driver {rss['driver_mib']:6.0f} "
              f"MiB  worker max {rss['worker_max_mib']:6.0f} MiB  tree {rss['tree_mib']:6.0f} MiB", flush=True)
        return r

    wall, rss, logits = timed(lambda: teacher_inference(str(ckpt), view, work / f"t_{n}", args.batch_size,
                                                        args.actors))
    row("teacher", "ours", wall, rss)

    def dl_teacher():
        pred, out = TeacherPredictor(str(ckpt)), []
        for x, _ in loader(view, args.batch_size, args.actors, shuffle=False):
            out.append(pred.outputs(x.numpy())[0].numpy())
        return np.concatenate(out)

    wall, rss, _ = timed(dl_teacher)
    row("teacher", "dataloader", wall, rss)

    cfg = DistillConfig(epochs=1, steps=None, batch_size=args.batch_size, lr=1e-3, ce_weight=0.0, augment=False)
    pre = Preprocess(3, (args.model_px, args.model_px), (0.5,) * 3, (0.25,) * 3)

    def student():
        torch.manual_seed(0)
        m = create_student("timm/resnet10t", 10, pre, TINY)
        opt, sched = make_optimizer(m, cfg, n)
        return m, opt, sched

    m, opt, sched = student()
    data = DistillData(view, logits)
    wall, rss, _ = timed(lambda: distill_epoch(m, opt, sched, data, pre, cfg, 0))
    row("distill", "ours", wall, rss)

    def dl_distill():
        from orchestrator.stages.loop import model_input
        from orchestrator.stages.losses import LOSSES
        from orchestrator.stages.schedule import optimizer_step

        m, opt, sched = student()
        m.train()
        for x, idx in loader(view, args.batch_size, args.actors, shuffle=True):
            xb = model_input(x.numpy(), slice(None), pre, None)
            t = torch.from_numpy(logits[idx.numpy()])
            optimizer_step(opt, sched, LOSSES.get("kd_kl")(m(xb), t, 4.0))

    wall, rss, _ = timed(dl_distill)
    row("distill", "dataloader", wall, rss)
    return rows


def image_folder_run(root: Path, n: int, px: int, store: Path) -> dict:
    """`kt run` (the font-digits task's smoke budgets, RGB) on an ImageFolder of ``n`` train JPEGs at ``px`` (the
    pool's first images, 10 classes, plus n/4 test) in a subprocess: its wall time and the peak RSS of its
    process tree (the issue's original measurement: 4,000 and 16,000 160-px images)."""
    import subprocess

    from orchestrator.data.shards import ImageStore

    folder = root / f"folder_{n}_{px}"
    if not (folder / ".done").is_file():
        src = ImageStore(store)
        total = n + n // 4
        if total > len(src):
            raise SystemExit(f"--folder-sizes {n}: the pool holds {len(src)} images; raise --sizes")
        for i, data in zip(range(total), src.read(np.arange(total))):
            d = folder / ("test" if i >= n else "train") / f"c{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:07d}.jpg").write_bytes(data)
        (folder / ".done").write_text("")
    storage = root / f"kt_storage_{n}_{px}"
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", str(ROOT / "tasks" / "font_digits.yaml"), "--smoke",
           "--storage", str(storage), "--set", f"data.root={folder}", "--set", "data.channels=3"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with RssSampler(0.5, proc.pid) as s:
        out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"kt run on {folder} failed:\n{out[-3000:]}")
    r = {"n": n, "px": px, "pass": "kt run", "loader": "image_folder", "seconds": wall,
         "decoded_mib": n * px * px * 3 / 2**20, **s.summary()}
    print(f"kt run  N={n:>6} ({r['decoded_mib']:.0f} MiB decoded): {wall:.0f} s, process tree peak "
          f"{r['tree_mib']:.0f} MiB, kt process {r['driver_mib']:.0f} MiB, largest other {r['worker_max_mib']:.0f} MiB",
          flush=True)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="25000,100000,200000")
    ap.add_argument("--px", type=int, default=224)
    ap.add_argument("--model-px", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--root", default="/tmp/kt_data_plane")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_plane.jsonl"))
    ap.add_argument("--folder-sizes", default="", help="also `kt run` on ImageFolders of these many train images "
                    "(the issue's table: 4000,16000 at --folder-px 160)")
    ap.add_argument("--folder-px", type=int, default=160)
    ap.add_argument("--only", type=int, help=argparse.SUPPRESS)  # one size, in a fresh process
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if args.only:
        from orchestrator.ray_adapters.session import ensure_ray

        ensure_ray()
        for r in run_size(args.only, root / f"pool_{max(sizes)}_{args.px}", args.px, root / "teacher.pt", args, root):
            print("JSON " + json.dumps(r), flush=True)
        return
    import subprocess

    t0 = time.perf_counter()
    if sizes:
        build_pool(root, max(sizes), args.px)
        tiny_teacher(root / "teacher.pt", args.model_px)
    rows = []
    for n in sizes:  # each size in a fresh process (and a fresh local Ray): its peaks are its own
        p = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", str(n)], text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "RAY_ADDRESS": ""})
        for line in p.stdout.splitlines():
            if line.startswith("JSON "):
                rows.append(json.loads(line[5:]))
            elif line.startswith("N="):
                print(line, flush=True)
        if p.returncode:
            raise SystemExit(f"size {n} failed:\n{p.stdout[-3000:]}")
    if args.folder_sizes:
        fpool = build_pool(root, max(int(s) * 5 // 4 for s in args.folder_sizes.split(",")), args.folder_px)
        rows += [image_folder_run(root, int(s), args.folder_px, fpool) for s in args.folder_sizes.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wall {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
