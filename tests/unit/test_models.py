import numpy as np
import pytest
import torch

from orchestrator.models import Preprocess, create_student, load_teacher, save_model_checkpoint
from orchestrator.models.teachers import ModelLoadError
from tests.conftest import TINY_RESNET

TINY_CLIP = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
                 text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1))


def test_preprocess_gray_to_rgb_resize_normalise():
    pre = Preprocess(3, (32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    imgs = np.full((2, 28, 28, 1), 255, np.uint8)
    x = pre(imgs)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, 2.0), atol=1e-4)  # (1 - 0.5) / 0.25
    gray = Preprocess(1, (28, 28), (0.0,), (1.0,))(np.zeros((1, 40, 40, 3), np.uint8))
    assert gray.shape == (1, 1, 28, 28)


def test_timm_teacher_carries_preprocess_and_weights_file_roundtrip(tmp_path):
    t = load_teacher("timm/resnet18", TINY_RESNET)
    assert t.preprocess.size == (224, 224) and t.preprocess.channels == 3 and t.feature_dim == 64
    w = tmp_path / "r18.pth"
    torch.save(t.backbone.state_dict(), w)
    t2 = load_teacher(f"timm/resnet18:{w}", TINY_RESNET)
    x = torch.randn(2, 3, 32, 32)
    t.eval(), t2.eval()
    assert torch.allclose(t.features(x), t2.features(x), atol=1e-6)


def test_open_clip_teacher_random_and_weights_file(tmp_path):
    t = load_teacher("open_clip/ViT-B-32:none", TINY_CLIP).eval()
    assert t.preprocess.size == (32, 32) and t.preprocess.mean[0] == pytest.approx(0.48145466)
    x = t.preprocess(np.random.default_rng(0).integers(0, 255, (2, 28, 28, 1), dtype=np.uint8))
    f = t.features(x)
    assert f.shape == (2, 32)
    import open_clip

    full = open_clip.create_model("ViT-B-32", pretrained=None, **TINY_CLIP)
    w = tmp_path / "clip.pt"
    torch.save(full.state_dict(), w)
    t2 = load_teacher(f"open_clip/ViT-B-32:{w}", TINY_CLIP).eval()
    assert torch.allclose(t2.features(x), full.encode_image(x), atol=1e-5)


@pytest.mark.parametrize("mid", ["timm/resnet18", "open_clip/ViT-B-32:none"])
def test_checkpoint_roundtrip_through_same_code(tmp_path, mid):
    kw = TINY_RESNET if mid.startswith("timm") else TINY_CLIP
    t = load_teacher(mid, kw).eval()
    t.head = torch.nn.Linear(t.feature_dim, 10)
    t.preprocess = Preprocess(3, (32, 32), (0.3, 0.3, 0.3), (0.3, 0.3, 0.3))
    p = save_model_checkpoint(t, tmp_path / "t.pt", [str(i) for i in range(10)])
    t2 = load_teacher(f"checkpoint/{p}")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(t(x), t2(x), atol=1e-5)
    assert t2.preprocess == t.preprocess and t2.classes[3] == "3"
    assert not list(tmp_path.glob("*.tmp*"))  # atomic write leaves no temp file


def test_bad_model_ids_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="timm has no model 'resnet_nope'"):
        load_teacher("timm/resnet_nope")
    with pytest.raises(ModelLoadError, match="open_clip has no model"):
        load_teacher("open_clip/NoSuchViT:none")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_teacher(f"checkpoint/{tmp_path}/missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="unreadable"):
        load_teacher(f"checkpoint/{tmp_path}/junk.pt")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_teacher(f"timm/resnet18:{tmp_path}/none.pth")
    with pytest.raises(ModelLoadError, match="students are timm models"):
        create_student("open_clip/ViT-B-32:none", 10, Preprocess(1, (28, 28), (0.5,), (0.5,)))


def test_student_native_resolution():
    s = create_student("timm/resnet10t", 10, Preprocess(1, (28, 28), (0.5,), (0.5,)), TINY_RESNET)
    assert s(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
