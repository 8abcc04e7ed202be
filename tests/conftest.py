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
# ImageFolder tasks loaded without a storage cache their image shards here (not in ~/.cache/kt)
os.environ.setdefault("KT_IMAGE_STORE", __import__("tempfile").mkdtemp(prefix="kt-image-store-"))


@pytest.fixture(scope="session")
def fmnist():
    """Real Fashion-MNIST: 1,000 train / 300 test images, stratified (TaskData)."""
    from orchestrator.config import DatasetConfig
    from orchestrator.data import load_task_data

    return load_task_data(DatasetConfig(limit_train=1000, limit_test=300))


@pytest.fixture(scope="session")
def tiny_teacher_ckpt(tmp_path_factory, fmnist):
    """A tiny timm teacher adapted by linear probe on 100 real labeled images, saved as kt-model/1."""
    import torch

    from orchestrator.config import TeacherConfig
    from orchestrator.models import Preprocess, load_teacher, save_model_checkpoint
    from orchestrator.stages.adapt_teacher import adapt_teacher

    torch.manual_seed(0)  # a random-init network: unseeded, some images get all-zero (post-ReLU) features
    t = load_teacher("timm/resnet18", TINY_RESNET)
    t.preprocess = Preprocess(3, (16, 16), (0.3, 0.3, 0.3), (0.35, 0.35, 0.35))
    labeled = fmnist.train.subset(np.arange(100))
    adapt_teacher(t, labeled, 10, TeacherConfig(probe_epochs=30))
    return save_model_checkpoint(t, tmp_path_factory.mktemp("teacher") / "teacher.pt", fmnist.classes)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster for the test session (RAY_NOTES: start Ray once per session): `ray start --head
    --block` on 127.0.0.1 with 2 CPUs, 2 GiB of object store and the Jobs API on a free port. While it runs,
    ``$RAY_ADDRESS`` points at it, so `kt` subprocesses (:func:`run_kt`) and in-process stages join it instead
    of starting a Ray of their own. Yields the Jobs API address (http://127.0.0.1:PORT). Stops exactly this
    cluster: SIGTERM to `ray start --block` (which then stops what it started), then SIGKILL to what is left
    of its own process group."""
    import signal
    import subprocess
    import time

    from orchestrator.ray_adapters.jobs import client

    gcs, dash = free_port(), free_port()
    from orchestrator.ray_adapters.session import HEALTH_CHECK_INTERVAL_S

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": HEALTH_CHECK_INTERVAL_S}  # as a Ray started by `kt` has it
    env.pop("RAY_ADDRESS", None)
    ray_cli = str(Path(sys.executable).parent / "ray")
    # token auth (RAY_NOTES 3): `ray start` does not create a missing ~/.ray/auth_token, ray.init() does
    subprocess.run([ray_cli, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    log = open(tmp_path_factory.mktemp("ray") / "ray_start.log", "w")
    p = subprocess.Popen([ray_cli, "start", "--head", "--block", "--num-cpus", "2",
                          "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
                          "--dashboard-port", str(dash), "--object-store-memory", str(2 * 1024**3),
                          "--disable-usage-stats"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            assert p.poll() is None, open(log.name).read()[-3000:]
            try:
                client(address).list_jobs()
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
        yield address
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)  # `ray start` drains the node and stops its processes (~2 s when idle;
            try:  # a drain waits for what still runs, up to 30 s)...
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
        try:  # ...then whatever of its own process group is still there (a SIGTERM to the whole group at once
            os.killpg(p.pid, signal.SIGKILL)  # stops the GCS first, and the drain then waits 30 s for it)
        except ProcessLookupError:
            pass
        p.wait()


def run_kt(*args: str, env: dict | None = None, timeout: int = 600, own_ray: bool = False):
    """Run the `kt` CLI in a subprocess; returns CompletedProcess (text). It joins the session's
    :func:`ray_cluster` when one is up, unless ``own_ray`` (then it starts a local Ray of its own, as a user's
    `kt run` does)."""
    import subprocess

    e = {**os.environ, **(env or {})}
    if own_ray:
        e.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)
