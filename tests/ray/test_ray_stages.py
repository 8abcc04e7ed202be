"""Ray adapters on a local 2-CPU Ray: actor-pool teacher inference and Ray Train distillation."""
import numpy as np
import pytest

from orchestrator.config import DistillConfig
from orchestrator.models import Preprocess
from orchestrator.stages.teacher_outputs import teacher_logits
from tests.conftest import TINY_RESNET

pytestmark = pytest.mark.ray
PRE = Preprocess(1, (28, 28), (0.286,), (0.353,))


def test_ray_data_inference_equals_in_process(local_ray, fmnist, tiny_teacher_ckpt, tmp_path):
    from orchestrator.ray_adapters.data import teacher_inference

    images = fmnist.train.images[:700]
    got = teacher_inference(str(tiny_teacher_ckpt), images, tmp_path / "shards", batch_size=64, actors=2)
    want = teacher_logits(str(tiny_teacher_ckpt), images)
    assert got.shape == (700, 10) and len(list((tmp_path / "shards").glob("*.parquet"))) >= 1
    np.testing.assert_allclose(got, want, atol=1e-4)


def write_distill_dir(d, fmnist, ckpt):
    d.mkdir(parents=True, exist_ok=True)
    images = fmnist.train.images[:600]
    np.save(d / "images.npy", images)
    np.save(d / "logits.npy", teacher_logits(str(ckpt), images))
    np.savez(d / "labeled.npz", images=fmnist.train.images[600:650], labels=fmnist.train.labels[600:650])


def run_distill(d, storage, name, epochs=3, hooks=None):
    from orchestrator.ray_adapters.train import distill_ray

    cfg = DistillConfig(epochs=epochs, batch_size=64, lr=3e-3, ce_weight=0.5).model_dump()
    return distill_ray(d, "timm/resnet10t", TINY_RESNET, 10, PRE.to_dict(), cfg, 0, storage, name, 2, False,
                       epoch_hooks=hooks)


def die_once_after(epoch_to_die: int, marker):
    """A worker epoch hook: after epoch ``epoch_to_die``'s checkpoint, every worker process exits, once."""
    def hook(epoch, rank):
        import os
        import time

        if epoch == epoch_to_die and not marker.exists():
            time.sleep(2)  # let the controller register the checkpoint just reported
            if rank == 0:
                marker.touch()
            os._exit(1)
    return hook


def test_ray_train_two_workers_killed_midway_resume_and_a_finished_run_restores(local_ray, fmnist,
                                                                                 tiny_teacher_ckpt, tmp_path):
    write_distill_dir(tmp_path / "data", fmnist, tiny_teacher_ckpt)
    hooks = [die_once_after(0, tmp_path / "fault-injected")]
    state, log = run_distill(tmp_path / "data", tmp_path / "ray_results", "killed", epochs=4, hooks=hooks)
    assert log["starts"] == [0, 1], "the worker group died after epoch 0 and resumed from its checkpoint"
    assert len(log["loss"]) == 4 and len(log["seconds"]) == 4 and log["loss"][-1] < log["loss"][0]
    assert any(k.startswith("conv1") for k in state)  # plain (unwrapped) student state dict
    # a re-run of a finished run restores its last checkpoint and trains nothing more
    state2, again = run_distill(tmp_path / "data", tmp_path / "ray_results", "killed", epochs=4, hooks=hooks)
    assert again == log and all((state2[k] == state[k]).all() for k in state)


def test_placement_group_left_by_a_dead_attempt_is_freed(local_ray):
    """The worker group's placement group recorded for a Ray Train run (as an attempt whose controller died with
    its node leaves it: rescheduled, holding CPUs) is removed when the run starts again or its trial fails; one
    that its attempt removed, or an unknown run, is left alone."""
    from ray.experimental.internal_kv import _internal_kv_put
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from orchestrator.ray_adapters.session import _PG_KEYS, free_left_placement_group, free_run_placement_groups

    pg = placement_group([{"CPU": 0.5}])
    assert pg.wait(30)
    _internal_kv_put(f"{_PG_KEYS}/tmp/storage/train/trial_a", pg.id.hex(), overwrite=True)
    assert free_run_placement_groups("trial_b") == 0 and placement_group_table(pg)["state"] == "CREATED"
    assert free_run_placement_groups("trial_a") == 1
    assert placement_group_table(pg)["state"] == "REMOVED"
    assert free_run_placement_groups("trial_a") == 0  # its record went with it
    done = placement_group([{"CPU": 0.5}])
    assert done.wait(30)
    remove_placement_group(done)  # an attempt that ended normally
    _internal_kv_put(f"{_PG_KEYS}/tmp/storage/train/trial_c", done.id.hex(), overwrite=True)
    assert not free_left_placement_group(f"{_PG_KEYS}/tmp/storage/train/trial_c")
