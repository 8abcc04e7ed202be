"""`kt sweep` / `kt report` end to end: SIGKILL the driver after its first finished trial, then `--resume`:
every trial ends exactly once (ASHA on), with exactly one MLflow child run each."""
import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import yaml

from tests.conftest import ROOT, TASK, run_kt

pytestmark = pytest.mark.e2e

SPACE = {"name": "resume", "search": {"num_trials": 3, "max_concurrent_trials": 2, "seed": 1,
                                      "early_stopping": {"enabled": True, "grace_period": 1}},
         "resources": {"cpus_per_worker": 0.9, "trial_driver_cpus": 0.1},
         "validation_per_class": 5,
         "fixed": {"distill.epochs": 3, "distill.batch_size": 64, "finetune.epochs": 1, "transfer_set.max_images": 300},
         "space": {"distill.temperature": {"loguniform": [1.0, 8.0]},
                   "student": {"choice": {"r10t_w8": {"id": "timm/resnet10t", "model_kwargs": {
                       "channels": [8, 16, 32, 64], "stem_width": 8}}, "mnv3": {"id": "timm/mobilenetv3_small_050"}}}}}


def test_killed_sweep_resumes_every_trial_exactly_once(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    args = ["sweep", str(space), "--task", str(TASK), "--smoke", "--storage", str(tmp_path / "store")]
    p = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    trials = tmp_path / "store" / "sweeps" / "resume-fashion_mnist_smoke" / "trials"
    try:
        deadline = time.time() + 400
        while time.time() < deadline and not list(trials.glob("*/row.json")):
            assert p.poll() is None, "kt sweep ended before its first trial finished"
            time.sleep(0.5)
        assert list(trials.glob("*/row.json")), "no trial finished in time"
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the driver and the local Ray it started, nothing else
        p.wait()
    first = {d.name for d in trials.iterdir() if (d / "row.json").exists()}
    assert run_kt(*args, timeout=120).returncode == 2  # the name is taken: --resume or --name, never silently
    r = run_kt(*args, "--resume", timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [json.loads(f.read_text()) for f in trials.glob("*/row.json")]
    assert len(rows) == 3 and {x["status"] for x in rows} <= {"completed", "stopped"}
    assert first <= {x["trial_id"] for x in rows}
    for d in trials.iterdir():  # finished trials were not trained again; each trial trained to its end once
        log = (d / "attempts.log").read_text()
        assert log.count("finished") <= 1, log
        if d.name in first:
            assert log.count("start") == 1, log
    ended = [(d / "attempts.log").read_text() for d in trials.iterdir()]
    assert sum("finished" in t or "reused" in t for t in ended) == sum(x["status"] == "completed" for x in rows) >= 1
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fashion_mnist_smoke")
    runs = client.search_runs([exp.experiment_id])
    [parent] = [x for x in runs if x.data.tags.get("kt.kind") == "sweep"]  # the resumed run is the same parent
    kids = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(k.data.tags["kt.trial_id"] for k in kids) == sorted(x["trial_id"] for x in rows)
    assert {k.info.status for k in kids} == {"FINISHED"} and parent.info.status == "FINISHED"
    assert "Pareto front" in r.stdout and "mlflow ui --backend-store-uri" in r.stdout
    rep = run_kt("report", "resume-fashion_mnist_smoke", "--storage", str(tmp_path / "store"), timeout=120)
    assert rep.returncode == 0 and "best configuration per compute budget" in rep.stdout, rep.stderr[-2000:]


def test_sweep_bad_space_fails_fast(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({**SPACE, "space": {"distill.temprature": {"uniform": [1, 2]}}}))
    r = run_kt("sweep", str(space), "--task", str(TASK), "--smoke", "--storage", str(tmp_path), timeout=120)
    assert r.returncode == 2 and "space.distill.temprature: not a config key" in r.stderr.replace("\n", " ")
    assert not (tmp_path / "sweeps").exists()
