"""``task_oriented``: paper 1's recipe (Vemulapalli et al., ICML 2024, Sec. 3): (1) adapt the teacher on the
labeled images, (2) distill it into the student on the unlabeled transfer set, (3) finetune on the labels."""
from __future__ import annotations

from orchestrator.methods.base import Method, MethodResult, register
from orchestrator.methods.common import ensure_adapted, prepared_outputs
from orchestrator.methods.student_stages import stage_distill, stage_evaluate, stage_random_control, stage_train


def train(ctx) -> MethodResult:
    """Adapted teacher (shared, cached) -> teacher outputs on the transfer set (cached) -> distill (Ray Train)
    -> finetune. A retrieval transfer set with ``random_control`` also distils on a same-size random pool sample."""
    cfg = ctx.cfg
    ensure_adapted(ctx)
    outputs = prepared_outputs(ctx)
    student, pre = stage_distill(ctx, outputs)
    metrics = {"distilled_top1": stage_evaluate(ctx, "distilled", "student (distilled)", student, pre)}
    rcfg = cfg.transfer_set.retrieval
    if cfg.transfer_set.source == "retrieval" and rcfg is not None and rcfg.random_control and not ctx.prepared:
        random_top1 = stage_random_control(ctx, int(ctx.stages["transfer_set"]["size"]))  # keeps ctx.keys
        metrics.update(random_control_top1=random_top1, retrieval_gain_over_random=metrics["distilled_top1"] - random_top1)
    student = stage_train(ctx, "finetune", student, pre, cfg.finetune, finetune=True)
    return MethodResult(student, pre, cfg.student.id, cfg.student.model_kwargs, metrics)


METHOD = register(Method(
    "task_oriented", train, "adapt the teacher, distill it on the transfer set, finetune",
    "Vemulapalli et al., ICML 2024 (arXiv 2311.18237), Sec. 3", "student (distilled + finetuned)", True,
    ("adapt_teacher", "teacher_inference", "distill")))
