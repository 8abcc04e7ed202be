import pytest

from orchestrator.ids import ModelId, ModelIdError, parse_model_id
from orchestrator.registry import Registry, UnknownNameError


@pytest.mark.parametrize("text,expected", [
    ("open_clip/ViT-B-32:laion2b_s34b_b79k", ModelId("open_clip", "ViT-B-32", "laion2b_s34b_b79k")),
    ("timm/resnet18", ModelId("timm", "resnet18", None)),
    ("timm/vit_small_patch14_dinov2:lvd142m", ModelId("timm", "vit_small_patch14_dinov2", "lvd142m")),
    ("timm/resnet18:/w/r18.pth", ModelId("timm", "resnet18", "/w/r18.pth")),
    ("checkpoint//abs/path/t.pt", ModelId("checkpoint", "/abs/path/t.pt", None)),
    ("standin/simclr", ModelId("standin", "simclr", None)),
])
def test_parse(text, expected):
    assert parse_model_id(text) == expected
    assert str(parse_model_id(text)) == text


@pytest.mark.parametrize("text", ["resnet18", "hf/bert", "timm/", "open_clip/ViT-B-32", "timm/:tag"])
def test_parse_errors_show_forms(text):
    with pytest.raises(ModelIdError, match="open_clip/<arch>"):
        parse_model_id(text)


def test_registry_lists_valid_names_on_miss():
    r: Registry[int] = Registry("widget")
    r.register("a")(1)
    r.register("b")(2)
    assert r.get("b") == 2 and r.names() == ["a", "b"] and "a" in r
    with pytest.raises(UnknownNameError, match="unknown widget 'c'; valid choices: a, b"):
        r.get("c")
    with pytest.raises(ValueError, match="already registered"):
        r.register("a")(3)
