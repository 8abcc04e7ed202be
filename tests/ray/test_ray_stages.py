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


def reports_recorder(path):
    """A Ray Train callback (run in the controller) that appends rank 0's metrics of every report to ``path``,
    one JSON line each: what TuneReportCallback forwards to a sweep trial. Made here so it pickles by value."""
    from ray.train import UserCallback

    class Record(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            import json

            with open(path, "a") as f:
                f.write(json.dumps(metrics[0]) + "\n")
    return Record()


class _Runs:
    """ChildRuns' interface over a list: what the ledger logs, as (step, sorted metric names)."""

    def __init__(self):
        self.logged: list[tuple[int, tuple[str, ...]]] = []

    def find(self, key):
        return None

    def create(self, key, name, params, tags):
        return "run"

    def log(self, run_id, metrics, step, tags=None, params=None):
        self.logged.append((step, tuple(sorted(k for k in metrics if k not in ("epoch_seconds", "device_seconds"))),
                            dict(params or {})))


def ledger_history(reports):
    from types import SimpleNamespace

    from orchestrator.ray_adapters.tune import TrialLedger

    ledger = TrialLedger("sqlite:///unused.db", "0", "parent", "/tmp", "s", row=dict, total=1)
    ledger._client = runs = _Runs()
    trial = SimpleNamespace(trial_id="t1", config={})
    for r in reports:
        ledger.on_trial_result(0, [], trial, r)
    return runs.logged


def test_resumed_in_process_trial_reports_to_the_ledger_as_a_worker_group_does(local_ray, fmnist,
                                                                               tiny_teacher_ckpt, tmp_path):
    """The same distillation, failed after its first epoch and resumed, once on a 2-worker group (Ray Train's
    restart, reports forwarded by a controller callback as TuneReportCallback does) and once in a trial's own
    process (the trial restarted, reports to its callable): the trial ledger logs the same MLflow history, steps
    1-4 with the same metrics, and the run param says where each ran."""
    import functools
    import json

    from orchestrator.ray_adapters.train import distill_ray
    from tests.unit.test_in_process_training import Interrupted, raise_once_after

    write_distill_dir(tmp_path / "data", fmnist, tiny_teacher_ckpt)
    np.savez(tmp_path / "data" / "val.npz", images=fmnist.train.images[700:730], labels=fmnist.train.labels[700:730])
    cfg = DistillConfig(epochs=4, batch_size=64, lr=3e-3, ce_weight=0.5).model_dump()
    args = (tmp_path / "data", "timm/resnet10t", TINY_RESNET, 10, PRE.to_dict(), cfg, 0, tmp_path / "train")
    recorded = tmp_path / "reports.jsonl"
    _, group = distill_ray(*args, "group", 2, False, epoch_hooks=[die_once_after(0, tmp_path / "died")],
                           callbacks=[reports_recorder(str(recorded))], extra_metrics={"kt_execution": "worker_group"})
    by_group = [json.loads(line) for line in recorded.read_text().splitlines()]

    by_process: list[dict] = []
    hook = functools.partial(raise_once_after, 0, tmp_path / "failed")
    with pytest.raises(Interrupted):
        distill_ray(*args, "process", 1, False, epoch_hooks=[hook], report=by_process.append,
                    extra_metrics={"kt_execution": "in_process"})
    _, process = distill_ray(*args, "process", 1, False, epoch_hooks=[hook], report=by_process.append,
                             extra_metrics={"kt_execution": "in_process"})
    assert (group["execution"], process["execution"]) == ("worker_group", "in_process")
    assert group["starts"] == process["starts"] == [0, 1]
    a, b = ledger_history(by_group), ledger_history(by_process)
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == [1, 2, 3, 4]
    assert [m for _, m, _ in a] == [m for _, m, _ in b] and "val_top1" in a[0][1]
    assert a[0][2] == {"distill.execution_used": "worker_group"} and b[0][2] == {"distill.execution_used": "in_process"}
    assert all(not p for _, _, p in a[1:] + b[1:])  # the param once per trial
