"""Distillation in process (Ray Train's local mode in `kt run`; called directly, reporting to the trial, inside a
Tune trial): where it runs is chosen from the config, and a run killed mid-way resumes from its own checkpoint
(``<storage>/<run>/kt_state.pt``) and ends with exactly the steps of an uninterrupted run."""
import functools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from orchestrator.config import DistillConfig
from orchestrator.models import Preprocess
from tests.conftest import ROOT, TINY_RESNET

PRE = Preprocess(1, (28, 28), (0.286,), (0.353,))
RECIPE = dict(steps=12, epoch_steps=3, batch_size=32, lr=3e-3, ce_weight=0.5, augment=False, num_workers=0)


def write_data(d, fmnist):
    """A transfer set of 256 real images with seeded random teacher logits, 50 labeled and 30 validation."""
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "images.npy", fmnist.train.images[:256])
    np.save(d / "logits.npy", np.random.default_rng(0).normal(size=(256, 10)).astype(np.float32))
    np.savez(d / "labeled.npz", images=fmnist.train.images[300:350], labels=fmnist.train.labels[300:350])
    np.savez(d / "val.npz", images=fmnist.train.images[400:430], labels=fmnist.train.labels[400:430])
    return d


def distill(data, storage, name, hooks=None, report=None):
    from orchestrator.ray_adapters.train import distill_ray

    return distill_ray(data, "timm/resnet10t", TINY_RESNET, 10, PRE.to_dict(), DistillConfig(**RECIPE).model_dump(),
                       0, storage, name, 0, False, epoch_hooks=hooks, report=report)


def exit_after(epoch_to_die: int, epoch: int, rank: int) -> None:
    """An epoch hook: the process dies (no clean-up, as under SIGKILL) after epoch ``epoch_to_die``'s checkpoint."""
    if epoch == epoch_to_die:
        os._exit(9)


class Interrupted(Exception):
    pass


def raise_once_after(epoch_to_die: int, marker, epoch: int, rank: int) -> None:
    if epoch == epoch_to_die and not marker.exists():
        marker.touch()
        raise Interrupted(f"after epoch {epoch}")


def test_where_the_loop_runs_follows_the_config():
    from orchestrator.ray_adapters.loop_session import resolve_execution

    assert resolve_execution("auto", 0, False) == "in_process"
    assert resolve_execution("auto", 1, False) == "in_process"  # one CPU worker: no worker group's start-up
    assert resolve_execution("auto", 1, True) == "worker_group"  # a GPU worker keeps its worker group
    assert resolve_execution("auto", 2, False) == "worker_group"
    assert resolve_execution("worker_group", 1, False) == "worker_group"  # forced either way
    assert resolve_execution("in_process", 4, True) == "in_process"
    with pytest.raises(ValueError, match="num_workers >= 1"):
        resolve_execution("worker_group", 0, False)
    with pytest.raises(Exception, match="num_workers: 0 means in this process"):
        DistillConfig(num_workers=0, execution="worker_group")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, fmnist):
    d = write_data(tmp_path_factory.mktemp("data"), fmnist)
    return d, distill(d, tmp_path_factory.mktemp("runs"), "straight")


def test_in_process_distillation_killed_mid_run_resumes_with_exactly_the_steps_of_an_uninterrupted_run(
        uninterrupted, tmp_path):
    data, (want_state, want) = uninterrupted
    assert want["execution"] == "in_process" and want["starts"] == [0] and want["steps"] == [3, 3, 3, 3]
    storage = tmp_path / "runs"
    code = ("import functools, numpy as np; from tests.unit import test_in_process_training as t; "
            f"t.distill({str(data)!r}, {str(storage)!r}, 'killed', [functools.partial(t.exit_after, 1)])")
    killed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr[-2000:]  # died after epoch 2 of 4 (0-based 1)
    state_file = storage / "killed" / "kt_state.pt"
    assert torch.load(state_file, weights_only=False)["epoch"] == 1, "the last finished epoch was persisted"
    assert not list(state_file.parent.glob("*.tmp")), "nothing half-written"

    state, got = distill(data, storage, "killed")
    assert got["starts"] == [0, 2], "resumed at epoch 3 from its own checkpoint"
    assert got["steps"] == want["steps"] and sum(got["steps"]) == 12, "no step repeated, none lost"
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-4)  # the same batches in the same order
    np.testing.assert_allclose(got["val_top1"], want["val_top1"])
    for k in want_state:
        torch.testing.assert_close(state[k], want_state[k], rtol=1e-4, atol=1e-5)


def test_in_process_loop_in_a_trial_reports_to_the_trial_and_resumes_after_a_failure(uninterrupted, tmp_path):
    """Inside a Tune trial Ray Train's API refuses to run: the loop reports to the trial's ``report`` callable. A
    failure after epoch 2 and the trial's restart give reports of epochs 1-2, then 3-4, the first of them
    carrying the epochs before it (``kt_earlier``) for a driver that missed them."""
    data, (_, want) = uninterrupted
    reports: list[dict] = []
    hook = functools.partial(raise_once_after, 1, tmp_path / "failed-once")
    with pytest.raises(Interrupted):
        distill(data, tmp_path / "train", "trial_1", [hook], reports.append)
    assert [r["epoch"] for r in reports] == [1, 2]
    _, got = distill(data, tmp_path / "train", "trial_1", [hook], reports.append)
    assert [r["epoch"] for r in reports] == [1, 2, 3, 4] and got["starts"] == [0, 2]
    assert reports[2]["kt_earlier"]["loss"] == got["loss"][:2] and "kt_earlier" not in reports[3]
    assert [r["steps"] for r in reports] == [3, 6, 9, 12]
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-4)
