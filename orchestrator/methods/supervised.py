"""``supervised``: the student trained on the labeled images alone (every method's reference)."""
from __future__ import annotations

from orchestrator.methods.base import Method, MethodResult, register
from orchestrator.methods.student_stages import stage_train


def train(ctx) -> MethodResult:
    """A randomly initialised student, trained with the ``baseline`` recipe."""
    import torch

    from orchestrator.models.students import create_student, student_preprocess

    cfg = ctx.cfg
    pre = student_preprocess(cfg.student.id, cfg.student.model_kwargs, ctx.task)
    torch.manual_seed(cfg.seed)
    student = create_student(cfg.student.id, ctx.task.num_classes, pre, cfg.student.model_kwargs).to(ctx.device)
    student = stage_train(ctx, "baseline", student, pre, cfg.baseline)
    return MethodResult(student, pre, cfg.student.id, cfg.student.model_kwargs)


METHOD = register(Method("supervised", train, "the labels alone", "the reference of both papers",
                         "student (supervised-only)", False, ()))
