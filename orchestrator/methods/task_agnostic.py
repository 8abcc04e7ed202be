"""``task_agnostic``: paper 1's task-agnostic baseline (Vemulapalli et al., ICML 2024, Sec. 4): the frozen,
*un-adapted* teacher's image features are distilled into the student's (through a linear projection head;
cosine or InfoNCE loss) on the same transfer set, then the student is finetuned on the labels."""
from __future__ import annotations

from pathlib import Path

from orchestrator.data.shards import save_images
from orchestrator.graph import run_stage
from orchestrator.methods.base import Method, MethodResult, register
from orchestrator.methods.common import (frozen_model_outputs, inference_actors, stage_teacher, stage_transfer_set,
                                         teacher_kwargs)
from orchestrator.methods.common import derived_config
from orchestrator.methods.student_stages import stage_distill, stage_evaluate, stage_train


def stage_frozen_teacher(ctx) -> Path:
    """The un-adapted teacher as a checkpoint (cached): its features are the targets; its head is a zero
    (K, D) layer whose logits the feature-only loss never reads."""
    import torch

    from orchestrator.models.teachers import load_teacher, save_model_checkpoint
    from orchestrator.stages.compute import forward_flops

    def body(tmp: Path, c) -> dict:
        teacher = load_teacher(ctx.teacher_id, teacher_kwargs(ctx))
        teacher.head = torch.nn.Linear(teacher.feature_dim, ctx.task.num_classes)
        torch.nn.init.zeros_(teacher.head.weight)
        torch.nn.init.zeros_(teacher.head.bias)
        save_model_checkpoint(teacher, tmp / "teacher.pt", ctx.task.classes)
        return {"forward_flops": forward_flops(teacher, (teacher.preprocess.channels, *teacher.preprocess.size))}

    run = run_stage(ctx, "frozen_teacher", body, record=False)
    import json

    ctx.teacher_flops = json.loads((run.entry / "_meta.json").read_text())["forward_flops"]
    return run.entry / "teacher.pt"


def stage_teacher_features(ctx, ts, frozen: Path) -> Path:
    """The frozen teacher's (N, D) float16 features on the transfer set (Ray Data, or in this process for a small
    pass: :func:`orchestrator.methods.common.inference_actors`; cached)."""
    import numpy as np

    cfg = ctx.cfg
    actors = inference_actors(ctx, len(ts), ctx.teacher_flops, cfg.teacher.inference_actors)

    def body(tmp: Path, c) -> dict:
        logits, feats = frozen_model_outputs(ctx, frozen, ts.images, tmp / "shards", cfg.teacher.inference_batch_size,
                                             actors, "frozen teacher features")
        c.images, c.flops = len(ts), ctx.teacher_flops * len(ts)
        save_images(tmp, ts.images)
        np.save(tmp / "logits.npy", logits)  # zeros: never read by the feature-only loss
        np.save(tmp / "features.npy", feats)
        return {"transfer_set": ts.description}

    return run_stage(ctx, "teacher_features", body, record_as="teacher_inference", devices=max(1, actors),
                     after=lambda r: {"teacher_forward_passes": 0 if r.hit else len(ts)}).entry


def train(ctx) -> MethodResult:
    """Frozen teacher features on the transfer set -> feature distillation (Ray Train) -> finetune."""
    cfg = ctx.cfg
    if ctx.teacher_id is None:
        stage_teacher(ctx)
    frozen = stage_frozen_teacher(ctx)
    outputs = stage_teacher_features(ctx, stage_transfer_set(ctx), frozen)
    ta = cfg.task_agnostic
    distill = cfg.distill.model_copy(update={"kd_weight": 0.0, "ce_weight": 0.0, "feature_weight": 1.0,
                                             "teacher_outputs": "cached", "feature_loss": ta.loss,
                                             "feature_temperature": ta.infonce_temperature})
    with derived_config(ctx, cfg.model_copy(update={"distill": distill})):
        student, pre = stage_distill(ctx, outputs, "feature_distill", record_as="distill")
    metrics = {"distilled_top1": stage_evaluate(ctx, "distilled", "student (feature-distilled, untuned head)",
                                                student, pre)}
    student = stage_train(ctx, "ta_finetune", student, pre, ta.finetune, record_as="finetune")
    return MethodResult(student, pre, cfg.student.id, cfg.student.model_kwargs, metrics)


METHOD = register(Method(
    "task_agnostic", train, "distill the frozen teacher's features (no adaptation), finetune",
    "Vemulapalli et al., ICML 2024, Sec. 4 (task-agnostic distillation)", "student (feature-distilled + finetuned)",
    False, ("teacher_inference", "distill")))
