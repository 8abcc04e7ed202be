"""Students: small timm models built at the task's native resolution and channel count."""
from __future__ import annotations

from torch import nn

from orchestrator.ids import parse_model_id
from orchestrator.models.preprocess import Preprocess
from orchestrator.models.teachers import ModelLoadError


def create_student(model_id: str, num_classes: int, preprocess: Preprocess,
                   model_kwargs: dict | None = None) -> nn.Module:
    """Build a randomly initialised student.

    Args:
        model_id: ``timm/<arch>`` (e.g. ``timm/resnet10t``, ``timm/mobilenetv3_small_100``).
        num_classes: K, the width of the output logits.
        preprocess: the student's input (``channels`` sets timm's ``in_chans``).
        model_kwargs: extra timm kwargs (e.g. ``drop_rate``).
    Returns:
        nn.Module mapping (B, channels, H, W) float32 -> (B, K) float32 logits.
    Raises:
        ModelLoadError: not a timm id, or an unknown timm architecture.
    """
    import timm

    mid = parse_model_id(model_id)
    if mid.namespace != "timm":
        raise ModelLoadError(f"student {model_id!r}: students are timm models; use timm/<arch>, e.g. timm/resnet10t")
    if not timm.is_model(mid.name):
        raise ModelLoadError(f"timm has no model {mid.name!r}; list them with timm.list_models('*pattern*')")
    return timm.create_model(mid.name, pretrained=False, num_classes=num_classes,
                             in_chans=preprocess.channels, **(model_kwargs or {}))


def export_student(model: nn.Module, preprocess: Preprocess, out_dir, classes: list[str]) -> list:
    """Write the student as ``student_state_dict.pt`` (weights + preprocessing + classes) and
    ``student.torchscript.pt`` (traced; input (B, channels, H, W) float32 normalised as ``preprocess``).
    Returns the written paths."""
    from pathlib import Path

    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    sd = out / "student_state_dict.pt"
    torch.save({"state_dict": model.state_dict(), "preprocess": preprocess.to_dict(), "classes": classes}, sd)
    ts = out / "student.torchscript.pt"
    example = torch.zeros(1, preprocess.channels, *preprocess.size)  # (1, C, H, W) float32
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in torch 2.15 but still loads
        torch.jit.save(torch.jit.trace(model, example), str(ts))
    return [sd, ts]
