"""Sweeps on the session's local Ray (2 CPUs): a tiny sweep over the three axes, started with `kt sweep`,
SIGKILLed after its first finished trial and continued through the Python API (every trial ends exactly once,
with one MLflow child run each); the MLflow parent/child runs and their tags, shared teacher outputs, the trials'
students, and a failing trial that is retried and reported. (A trial that ASHA stopped before a kill is
re-reported, not retrained: tests/unit/test_trial_resume.py.)"""
import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import yaml

import orchestrator
from tests.conftest import ROOT, TASK, run_kt
from tests.pools import mixed_pool_images, write_webdataset

pytestmark = pytest.mark.ray

TINY = {"id": "timm/resnet10t", "model_kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8}}


def tiny_space(pool: str, **over) -> dict:
    pool_cfg = {"format": "webdataset", "root": pool, "target_domain_prefix": "fmnist"}
    s = {"name": "tiny",
         "search": {"num_trials": 3, "max_concurrent_trials": 2, "seed": 0},
         "resources": {"cpus_per_worker": 0.9, "trial_driver_cpus": 0.1, "max_failures": 0},
         "validation_per_class": 5,
         "fixed": {"distill.epochs": 2, "distill.batch_size": 64, "finetune.epochs": 1,
                   "transfer_set.max_images": 200, "transfer_set.pool": pool_cfg,
                   "transfer_set.retrieval": {"pool": pool_cfg, "budget": 150}},
         "space": {"transfer_set.source": {"choice": ["target_unlabeled", "generic", "retrieval"]},
                   "distill.ce_weight": {"uniform": [0.0, 1.0]},
                   "student": {"choice": {"r10t_w8": TINY, "mnv3": {"id": "timm/mobilenetv3_small_050"}}}}}
    s.update(over)
    return s


@pytest.fixture(scope="module")
def storage(tmp_path_factory, fmnist):
    return tmp_path_factory.mktemp("sweep")


@pytest.fixture(scope="module")
def pool(tmp_path_factory, fmnist):
    images, keys = mixed_pool_images(fmnist.test.images[:200], 200)  # task-domain images the split never uses
    return str(write_webdataset(tmp_path_factory.mktemp("pool"), images, keys, 100))


@pytest.fixture(scope="module")
def killed(storage, pool, ray_cluster):
    """`kt sweep` (joined to the session's Ray) SIGKILLed once its first trial has finished; returns the ids of
    the trials that had finished by then: committed (``final.json``), whether or not the driver had recorded the
    end in its ledger (``row.json``) before the kill."""
    space = storage / "space.yaml"
    space.write_text(yaml.safe_dump(tiny_space(pool)))
    args = ["sweep", str(space), "--task", str(TASK), "--smoke", "--storage", str(storage), "--name", "tiny3"]
    p = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    trials = storage / "sweeps" / "tiny3" / "trials"
    try:
        deadline = time.time() + 400
        while time.time() < deadline and not list(trials.glob("*/row.json")):
            assert p.poll() is None, "kt sweep ended before its first trial finished"
            time.sleep(0.5)
        assert list(trials.glob("*/row.json")), "no trial finished in time"
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the driver (its job's Ray workers go with it), nothing else
        p.wait()
    return {d.name for d in trials.iterdir() if (d / "final.json").exists()}


@pytest.fixture(scope="module")
def result(local_ray, storage, pool, killed):
    """The killed sweep, continued in this process (``resume=True``)."""
    return orchestrator.sweep(tiny_space(pool), TASK, [f"storage={storage}"], smoke=True, name="tiny3", resume=True)


def test_killed_sweep_resumed_ends_every_trial_exactly_once(result, killed, storage):
    rows = result.rows
    assert len(rows) == 3 and killed <= {r["trial_id"] for r in rows} and len(killed) < 3
    trials = result.sweep_dir / "trials"
    for d in trials.iterdir():  # finished trials were not trained again; each trial trained to its end once
        log = (d / "attempts.log").read_text()
        assert log.count("finished") == 1, log
        if d.name in killed:
            assert log.count("start") == 1, log
    client, runs = client_runs(result)
    [parent] = [r for r in runs if r.data.tags.get("kt.kind") == "sweep"]  # the resumed run is the same parent
    assert parent.info.run_id == result.parent_run_id
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(k.data.tags["kt.trial_id"] for k in kids) == sorted(r["trial_id"] for r in rows)
    timed = [r for r in rows if "time_trial_s" in r]  # trained by this driver (not re-reported from the killed one)
    assert len(timed) >= 3 - len(killed)
    for r in timed:  # each trial's parts (benchmarks/trial_overhead.py) add up within its wall time
        parts = [r[k] for k in ("time_actor_start_s", "time_data_s", "time_setup_s", "time_worker_group_s",
                                "time_distill_steps_s", "time_finetune_s", "time_evaluate_s", "time_save_s")]
        # (the distill set-up can be 0: a trial resumed after its last epoch counts the killed attempt's steps)
        assert min(parts) >= 0 and r["time_distill_steps_s"] > 0, r
        assert r["execution"] == "in_process", r  # one CPU worker: distillation in the trial's own process
        assert sum(parts) <= r["time_trial_s"] and r["time_tracking_s"] > 0, r
    rep = run_kt("report", "tiny3", "--storage", str(storage), timeout=120)
    assert rep.returncode == 0 and "best configuration per compute budget" in rep.stdout, rep.stderr[-2000:]


def client_runs(result):
    client = mlflow.MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name(result.experiment)
    return client, client.search_runs([exp.experiment_id])


def test_three_tiny_trials_over_three_axes(result):
    rows = result.rows
    assert [r["status"] for r in rows] == ["completed"] * 3
    for r in rows:
        assert 0.0 <= r["val_top1"] <= 1.0 and 0.0 <= r["test_top1"] <= 1.0
        assert r["student_flops"] > 0 and r["device_seconds"] > 0 and r["images_seen"] > 0
        assert set(r["params"]) == {"transfer_set.source", "distill.ce_weight", "student"}
    mnv3 = [r["student_flops"] for r in rows if r["params"]["student"] == "mnv3"]
    r10 = [r["student_flops"] for r in rows if r["params"]["student"] == "r10t_w8"]
    assert len(set(mnv3)) <= 1 and len(set(r10)) <= 1 and set(mnv3).isdisjoint(r10)  # FLOPs follow the arch
    assert result.metrics["trials_completed"] == 3 and result.metrics["trials_failed"] == 0
    csv = (result.sweep_dir / "trials.csv").read_text().splitlines()
    assert len(csv) == 4 and "param.student" in csv[0]
    assert (result.sweep_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_teacher_runs_once_per_transfer_set(result):
    sets = json.loads((result.sweep_dir / "transfer_sets.json").read_text())
    assert {s["source"] for s in sets.values()} == {"target_unlabeled", "generic", "retrieval"}
    assert sum(s["teacher_forward_passes"] for s in sets.values()) == sum(s["size"] for s in sets.values())
    client, runs = client_runs(result)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.metrics["prepare.teacher_forward_passes"] == sum(s["size"] for s in sets.values())
    by_source = {s["source"]: s for s in sets.values()}
    for r in result.rows:  # every trial read its transfer set's prepared outputs; no trial ran the teacher
        src = r["params"]["transfer_set.source"]
        assert r["tags"]["teacher_outputs.key"] == by_source[src]["dir"].rsplit("/", 1)[-1]
        assert r["teacher_forward_passes"] == 0


def test_mlflow_parent_and_nested_trial_runs_with_tags(result):
    client, runs = client_runs(result)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["kt.kind"] == "sweep"
    assert {"pareto.png", "trials.csv", "space.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(k.data.tags["kt.trial_id"] for k in kids) == sorted(r["trial_id"] for r in result.rows)
    for k in kids:
        tags = k.data.tags
        assert k.info.status == "FINISHED" and tags["kt.status"] == "completed"
        assert tags["kt.teacher"] == "pypi/efficientnet_lite0" and len(tags["kt.transfer_set.key"]) == 16
        assert len(tags["kt.teacher_outputs.key"]) == 16 and len(tags["kt.adapted_teacher.key"]) == 16
        assert {"transfer_set.source", "student", "distill.ce_weight"} <= set(k.data.params)
        val = client.get_metric_history(k.info.run_id, "val_top1")
        assert sorted(m.step for m in val) == [1, 2, 3]  # 2 distillation epochs, then after finetuning
        assert k.data.metrics["student_flops"] > 0 and k.data.metrics["device_seconds"] > 0


def test_every_trial_keeps_a_loadable_student(result, fmnist):
    from orchestrator.models.export import load_student

    client, runs = client_runs(result)
    kids = {r.data.tags["kt.trial_id"]: r for r in runs
            if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id}
    ids = {"r10t_w8": "timm/resnet10t", "mnv3": "timm/mobilenetv3_small_050"}
    for r in result.rows:
        tdir = result.sweep_dir / "trials" / r["trial_id"]
        s = load_student(tdir / "student.pt")  # written before final.json, the trial's commit
        assert (tdir / "student.pt").stat().st_mtime <= (tdir / "final.json").stat().st_mtime
        assert s.model_id == ids[r["params"]["student"]] and s.image_shape == (28, 28, 1)
        assert s.lineage["trial_id"] == r["trial_id"] and s.lineage["sweep"] == "tiny3"
        assert s.lineage["val_top1"] == r["val_top1"]
        assert s.lineage["teacher_outputs.key"] == r["tags"]["teacher_outputs.key"]
        assert s.logits(fmnist.test.images[:8]).shape == (8, 10)
        arts = {a.path for a in client.list_artifacts(kids[r["trial_id"]].info.run_id, "student")}
        assert "student/student.pt" in arts  # logged by the driver on the trial's child run


def test_register_best_trial_with_lineage_tags(result, storage):
    from orchestrator.sweeps.pareto import best_per_budget

    flops = max(r["student_flops"] for r in result.rows) / 1e6 + 0.001  # MFLOPs/img: every trial fits
    [(_, best)] = best_per_budget(result.rows, budgets=[flops * 1e6])  # what `kt report` calls the best
    v = orchestrator.register("tiny3", budget=flops, storage=storage)
    client, runs = client_runs(result)
    mv = client.get_model_version(v.name, v.version)
    tags = mv.tags
    assert v.name == "fashion_mnist_smoke-student" and tags["kt.sweep"] == "tiny3"
    assert tags["kt.trial_id"] == best["trial_id"] and float(tags["kt.val_top1"]) == best["val_top1"]
    assert float(tags["kt.budget_mflops"]) == flops and tags["kt.method"] == "task_oriented"
    for k in ("teacher", "adapted_teacher.key", "transfer_set.key", "transfer_set.source", "teacher_outputs.key"):
        assert tags[f"kt.{k}"] == best["tags"][k]
    child = [r for r in runs if r.data.tags.get("kt.trial_id") == best["trial_id"]][0]
    assert mv.run_id == child.info.run_id  # the MLflow model is logged into the trial's own child run


def test_resume_without_flag_and_changed_space_are_refused(result, storage, pool):
    from orchestrator.config import ConfigError

    with pytest.raises(ConfigError, match="already exists.*--resume"):
        orchestrator.sweep(tiny_space(pool), TASK, [f"storage={storage}"], smoke=True, name="tiny3")
    with pytest.raises(ConfigError, match="changed since sweep 'tiny3' started"):
        orchestrator.sweep(tiny_space(pool), TASK, [f"storage={storage}", "distill.lr=0.01"], smoke=True,
                           name="tiny3", resume=True)
    with pytest.raises(ConfigError, match="no sweep 'other' to resume"):
        orchestrator.sweep(tiny_space(pool), TASK, [f"storage={storage}"], smoke=True, name="other", resume=True)


def test_failing_trial_is_retried_then_reported(result, storage, pool):
    bad = {"id": "timm/resnet10t", "model_kwargs": {"channels": [8, 16]}}  # valid id, unbuildable network
    space = tiny_space(pool, search={"num_trials": 1, "max_concurrent_trials": 1},
                       resources={"cpus_per_worker": 0.9, "trial_driver_cpus": 0.1, "max_failures": 1},
                       space={"student": {"choice": {"broken": bad}}})
    res = orchestrator.sweep(space, TASK, [f"storage={storage}"], smoke=True, name="broken")
    [row] = res.rows
    assert row["status"] == "error" and row["error"]
    trial_dir = res.sweep_dir / "trials" / row["trial_id"]
    assert (trial_dir / "attempts.log").read_text().count("start") == 2  # the first try and one retry
    assert res.metrics["trials_failed"] == 1
    client, runs = client_runs(res)
    [kid] = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == res.parent_run_id]
    assert kid.info.status == "FAILED" and kid.data.tags["kt.status"] == "error" and kid.data.tags["kt.error"]
