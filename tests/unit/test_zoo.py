"""The offline source zoo (paper 2): config validation and the label-leak rule, the real source domains, a tiny
cached build, and source outputs (features + source-class logits)."""
from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from orchestrator.cache import Cache
from orchestrator.config import ConfigError
from orchestrator.data import DataError
from orchestrator.zoo import LabelLeakError, SourceConfig, ZooConfig, check_label_leak, load_zoo
from orchestrator.zoo.config import normalize_domain
from tests.conftest import TINY_RESNET

LITE0 = {"name": "lite0", "id": "pypi/efficientnet_lite0", "trained_on": "imagenet-1k"}
FAST = {"font_glyphs": {"per_font": 1}, "icons": {"sizes": (32,)}}  # small but real renders / icon files
TINY_DOMAINS = ["lfw_faces", "sklearn_digits", "mnist"]


def test_zoo_rejects_duplicate_names_empty_lists_and_unknown_keys():
    with pytest.raises(ValidationError, match=r"duplicate names \['lite0'\]"):
        ZooConfig(sources=[LITE0, {**LITE0, "id": "pypi/efficientnet_lite1"}])
    with pytest.raises(ValidationError, match="empty"):
        ZooConfig(sources=[])
    with pytest.raises(ValidationError, match="extra"):
        SourceConfig(**LITE0, weights="x")


def test_label_leak_refuses_a_source_trained_on_the_target():
    zoo = ZooConfig(sources=[LITE0, {"name": "m", "id": "checkpoint/m.pt", "trained_on": "mnist"}])
    for target in ("mnist", "MNIST", "mnist_smoke", "mnist_csv"):
        with pytest.raises(LabelLeakError, match=r"\['m'\] were trained on 'mnist'"):
            check_label_leak(zoo, target)
    check_label_leak(zoo, "fashion_mnist")  # other domains pass
    assert normalize_domain("Fashion-MNIST") == "fashion_mnist" and normalize_domain("ImageNet-1k") == "imagenet-1k"


def test_load_zoo_reads_yaml_and_names_the_file_on_errors(tmp_path):
    p = tmp_path / "zoo.yaml"
    p.write_text("sources:\n  - {name: lite0, id: pypi/efficientnet_lite0, model_kwargs: {input_size: 64}}\n")
    assert load_zoo(p).sources[0].model_kwargs == {"input_size": 64}
    p.write_text("sources: []\n")
    with pytest.raises(ConfigError, match="(?s)zoo.yaml.*sources is empty"):
        load_zoo(p)
    p.write_text("sources:\n  - {name: a, id: pypi/efficientnet_lite0, wieghts: x}\n")
    with pytest.raises(ConfigError, match="unknown config key 'sources.0.wieghts'"):
        load_zoo(p)


@pytest.mark.parametrize("name", ["mnist", "sklearn_digits", "font_glyphs", "icons", "lfw_faces"])
def test_domain_loaders_return_real_labeled_images(name):
    from orchestrator.demo.zoo_domains import find_icons, load_domain

    if name == "icons" and not find_icons():
        pytest.skip("no freedesktop icon theme PNGs under /usr/share/icons (apt-get install adwaita-icon-theme)")
    d = load_domain(name, **FAST.get(name, {}))
    n = len(d.labels)
    assert d.images.dtype == np.uint8 and d.images.shape[:3] == (n, 28, 28)
    assert d.images.ndim == 3 or d.images.shape[3] == 3
    assert d.labels.dtype == np.int64 and d.groups.shape == (n,)
    k = len(d.classes)
    assert k >= 2 and set(np.unique(d.labels)) == set(range(k))  # every class present
    assert d.images.std() > 20 and len({im.tobytes() for im in d.images[:50]}) > 40  # varied, not blank
    assert d.description


def test_font_glyphs_split_holds_out_whole_fonts_and_names_the_fix_without_fonts(tmp_path):
    from orchestrator.demo.zoo_domains import load_font_glyphs, split_domain

    d = load_font_glyphs(per_font=2, seed=3)
    assert d.classes[0] == "A" and len(d.classes) == 26
    tr, te = split_domain(d)
    assert len(tr) + len(te) == len(d.labels) and not set(d.groups[tr]) & set(d.groups[te])
    assert np.bincount(d.labels[te]).min() > 0  # held-out fonts cover every letter
    assert np.array_equal(d.images, load_font_glyphs(per_font=2, seed=3).images)  # seeded jitter
    with pytest.raises(DataError, match="fonts-dejavu"):
        load_font_glyphs(font_dirs=(str(tmp_path),))


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    """A tiny zoo for target mnist (so its mnist source is left out) built twice on one cache."""
    from orchestrator.demo.zoo_build import build_demo_zoo

    cache = Cache(tmp_path_factory.mktemp("zoo"))
    kw = dict(epochs=1, limit=200, domains=TINY_DOMAINS)
    first = build_demo_zoo(cache, "mnist", **kw)
    counts = dict(cache.counters())
    second = build_demo_zoo(cache, "mnist", **kw)
    return first, second, counts, dict(cache.counters())


def test_second_build_is_a_cache_hit_and_the_target_domain_is_left_out(tiny_zoo):
    first, second, after_first, after_second = tiny_zoo
    assert after_first == {"cache_misses_zoo_source": 2}
    assert after_second == {"cache_misses_zoo_source": 2, "cache_hits_zoo_source": 2}  # nothing retrained
    assert first == second
    trained = [s for s in first.sources if s.id.startswith("checkpoint/")]
    assert [s.trained_on for s in trained] == ["lfw_faces", "sklearn_digits"]  # no mnist source for mnist
    assert {s.trained_on for s in first.sources} - {"lfw_faces", "sklearn_digits"} <= {"imagenet-1k"}


def test_built_source_meta_and_outputs(tiny_zoo):
    from orchestrator.demo.zoo_build import source_meta
    from orchestrator.demo.zoo_domains import load_domain
    from orchestrator.zoo.signals import load_source, source_outputs

    src = ZooConfig.model_validate(tiny_zoo[0].model_dump()).get("sklearn_digits_resnet10t")
    meta = source_meta(src)
    assert meta["domain"] == "sklearn_digits" and meta["train_size"] <= 200 and meta["build_seconds"] > 0
    assert 0.0 <= meta["heldout_top1"] <= 1.0 and meta["classes"] == [str(k) for k in range(10)]
    model = load_source(src)
    assert model.classes == meta["classes"] and model.head is not None
    images = load_domain("lfw_faces").images[:37]  # a target domain other than the source's
    feats, logits = source_outputs(model, images, batch_size=16)
    assert feats.shape == (37, 128) and logits.shape == (37, 10)
    assert feats.dtype == logits.dtype == np.float32 and np.isfinite(feats).all() and np.isfinite(logits).all()


def test_imagenet_source_keeps_its_1000_class_head():
    from orchestrator.zoo.signals import load_source, source_outputs

    model = load_source(SourceConfig(**LITE0, model_kwargs={"input_size": 32}))
    rgb = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    feats, logits = source_outputs(model, rgb)
    assert feats.shape == (3, 1280) and logits.shape == (3, 1000) and len(model.classes) == 1000


def test_source_outputs_refuses_a_model_without_head():
    from orchestrator.models.teachers import load_teacher
    from orchestrator.zoo.signals import source_outputs

    with pytest.raises(ValueError, match="no classifier head"):
        source_outputs(load_teacher("timm/resnet10t", TINY_RESNET), np.zeros((2, 28, 28), np.uint8))


def test_font_digits_task_is_an_image_folder_with_unseen_test_fonts(tmp_path):
    from orchestrator.config import DatasetConfig
    from orchestrator.data import load_task_data
    from orchestrator.demo.tasks import build_font_digits

    root = tmp_path / "font_digits"
    info = build_font_digits(root, per_font=1)
    fonts = info["fonts"]
    assert info["train"] + info["test"] == 10 * fonts and 0 < info["test"] < info["train"]
    assert info["test"] % 10 == 0  # whole fonts: every digit of a held-out font is in test
    data = load_task_data(DatasetConfig(format="image_folder", root=str(root), channels=1))
    assert data.classes == [str(d) for d in range(10)] and data.train.images.shape[1:] == (28, 28, 1)
    assert len(data.train) == info["train"] and np.bincount(data.test.labels).tolist() == [info["test"] // 10] * 10
    assert DatasetConfig(format="image_folder", root=str(root)).augment_policy().hflip is False
    stamp = (root / "task.json").stat().st_mtime_ns
    assert build_font_digits(root, per_font=1) == info and (root / "task.json").stat().st_mtime_ns == stamp
    assert build_font_digits(root, per_font=2)["train"] > info["train"]  # another build replaces it whole
    assert not list(tmp_path.glob(".font_digits.tmp-*"))
