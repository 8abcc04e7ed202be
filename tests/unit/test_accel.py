"""The GPU path (orchestrator/stages/accel.py): what it chooses on CUDA, and that the CPU path is untouched
(bit-exact against a plain loop). A CUDA-only check runs where a GPU is visible (never in CI)."""
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from orchestrator.stages import accel
from orchestrator.stages.loop import model_input, predict


@pytest.fixture()
def tiny(fmnist):
    from orchestrator.models.students import create_student, student_preprocess

    pre = student_preprocess("timm/resnet10t", {"channels": [8, 16, 32, 64], "stem_width": 8}, fmnist)
    torch.manual_seed(0)
    model = create_student("timm/resnet10t", fmnist.num_classes, pre, {"channels": [8, 16, 32, 64],
                                                                      "stem_width": 8}).eval()
    return model, pre, fmnist.test.images[:96]  # (96, 28, 28, 1) uint8 real Fashion-MNIST


def test_cpu_helpers_are_the_identity():
    x = torch.randn(4, 3, 8, 8)
    assert accel.to_device(x, "cpu") is x and accel.to_device(x, None) is x
    assert accel.amp_dtype("cpu") is None and accel.amp_dtype(torch.device("cpu"), training=True) is None
    with accel.autocast("cpu"):
        assert torch.get_autocast_dtype("cpu") is not None  # the context ran
        assert not torch.is_autocast_enabled("cpu")
    m = torch.nn.Conv2d(3, 4, 3)
    assert accel.prepare_model(m, "cpu").weight.is_contiguous()  # not channels-last on the CPU


def test_cpu_predict_is_bit_exact_against_a_plain_forward(tiny):
    model, pre, images = tiny
    got = predict(model, pre, images, batch_size=32)  # (96, K) float32
    with torch.inference_mode():
        want = torch.cat([model(pre(images[s:s + 32])) for s in range(0, 96, 32)]).numpy()
    assert got.dtype == np.float32 and np.array_equal(got, want)
    x = model_input(images, np.arange(8), pre, None, "cpu")
    assert x.dtype == torch.float32 and x.is_contiguous()


@pytest.mark.parametrize("bf16, training, want", [(True, False, torch.bfloat16), (True, True, torch.bfloat16),
                                                  (False, False, torch.float16), (False, True, None)])
def test_cuda_precision_choice(monkeypatch, bf16, training, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert accel.amp_dtype("cuda", training) is want
    assert accel.amp_dtype("cuda:1", training) is want
    monkeypatch.setenv("KT_AMP", "0")
    assert accel.amp_dtype("cuda", training) is None


def test_cuda_autocast_context_carries_the_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else nullcontext():
        ctx = accel.autocast("cuda", training=True)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16 and ctx.device == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device tool's; never in CI)")
def test_gpu_path_matches_the_cpu_within_bf16_tolerance(tiny):
    model, pre, images = tiny
    cpu = predict(model, pre, images)
    gpu_model = accel.prepare_model(model, "cuda")
    conv = next(m for m in gpu_model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    gpu = predict(gpu_model, pre, images, device="cuda")
    assert gpu.dtype == np.float32
    assert (cpu.argmax(1) == gpu.argmax(1)).mean() > 0.95
    assert np.abs(cpu - gpu).max() < 0.1 * np.abs(cpu).max()
