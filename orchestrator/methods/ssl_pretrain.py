"""``ssl_pretrain``: paper 1's self-supervised baseline (Vemulapalli et al., ICML 2024, Sec. 4 pretrain the
student by DINO on the transfer set; here SimCLR through lightly, the SSL method this project already runs on a
2-core CPU): the student is pretrained on the transfer set's images without labels, then finetuned on them."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from orchestrator.graph import run_stage
from orchestrator.methods.base import Method, MethodResult, register
from orchestrator.methods.common import stage_transfer_set
from orchestrator.methods.student_stages import stage_train


class PenultimateEncoder(nn.Module):
    """A timm classifier's penultimate features: (B, C, H, W) float32 -> (B, num_features) float32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def train(ctx) -> MethodResult:
    """SimCLR on the transfer set's images (cached student weights) -> finetune with ``ssl.finetune``."""
    import torch

    from orchestrator.models.students import create_student, student_preprocess
    from orchestrator.stages.compute import train_flops
    from orchestrator.stages.pretrain import pretrain_simclr

    cfg, scfg = ctx.cfg, ctx.cfg.ssl
    pre = student_preprocess(cfg.student.id, cfg.student.model_kwargs, ctx.task)

    def new_student():
        torch.manual_seed(cfg.seed)
        return create_student(cfg.student.id, ctx.task.num_classes, pre, cfg.student.model_kwargs)

    ts = stage_transfer_set(ctx)

    def body(tmp: Path, c) -> dict:
        student = new_student()
        hist = pretrain_simclr(PenultimateEncoder(student), student.num_features, ts.images, pre, scfg.epochs,
                               scfg.batch_size, scfg.lr, scfg.weight_decay, scfg.temperature, scfg.proj_dim,
                               cfg.seed, ctx.device, label="student SimCLR",
                               hflip=bool(cfg.data.augment_policy().hflip))
        c.images = 2 * len(ts) * scfg.epochs  # two views per image
        c.flops = train_flops(student, (pre.channels, *pre.size)) * c.images
        torch.save(student.state_dict(), tmp / "student.pt")
        return {"loss": hist}

    run = run_stage(ctx, "ssl_pretrain", body, after=lambda r: {"images_pretrained_on": len(ts)})
    student = new_student()
    student.load_state_dict(torch.load(run.entry / "student.pt", map_location="cpu"))
    student = stage_train(ctx, "ssl_finetune", student.to(ctx.device), pre, scfg.finetune, record_as="finetune")
    return MethodResult(student, pre, cfg.student.id, cfg.student.model_kwargs)


METHOD = register(Method(
    "ssl_pretrain", train, "pretrain the student self-supervised (SimCLR) on the transfer set, finetune",
    "Vemulapalli et al., ICML 2024, Sec. 4 (self-supervised pretraining baseline; DINO there, SimCLR here)",
    "student (SimCLR-pretrained + finetuned)", False, ("ssl_pretrain",)))
