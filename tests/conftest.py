"""Shared fixtures: real Fashion-MNIST images (small stratified subsets), tiny model settings."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "tasks" / "fashion_mnist.yaml"
TINY_RESNET = {"channels": [8, 16, 32, 64], "stem_width": 8}

os.environ.setdefault("RAY_AUTH_MODE", "token")


@pytest.fixture(scope="session")
def fmnist():
    """Real Fashion-MNIST: 1,000 train / 300 test images, stratified (TaskData)."""
    from orchestrator.config import DatasetConfig
    from orchestrator.data import load_task_data

    return load_task_data(DatasetConfig(limit_train=1000, limit_test=300))


@pytest.fixture(scope="session")
def tiny_teacher_ckpt(tmp_path_factory, fmnist):
    """A tiny timm teacher adapted by linear probe on 100 real labeled images, saved as kt-model/1."""
    from orchestrator.config import TeacherConfig
    from orchestrator.models import Preprocess, load_teacher, save_model_checkpoint
    from orchestrator.stages.adapt_teacher import adapt_teacher

    t = load_teacher("timm/resnet18", TINY_RESNET)
    t.preprocess = Preprocess(3, (16, 16), (0.3, 0.3, 0.3), (0.35, 0.35, 0.35))
    labeled = fmnist.train.subset(np.arange(100))
    adapt_teacher(t, labeled, 10, TeacherConfig(probe_epochs=30))
    return save_model_checkpoint(t, tmp_path_factory.mktemp("teacher") / "teacher.pt", fmnist.classes)


def run_kt(*args: str, env: dict | None = None, timeout: int = 600):
    """Run the `kt` CLI in a subprocess; returns CompletedProcess (text)."""
    import subprocess

    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)
