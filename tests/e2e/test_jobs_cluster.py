"""`kt submit` / `orchestrator.submit` against a real local Ray cluster (`ray start --head --block` on
127.0.0.1 with the Jobs API, token auth on): a smoke sweep (CLI) and a smoke run (Python API) submitted to it
run to SUCCEEDED and leave their MLflow runs; a failing job shows its log tail and exits non-zero; an
unreachable cluster is a clear error.
The cluster is the session's (tests.conftest.ray_cluster), which stops exactly the cluster it started."""
from pathlib import Path

import mlflow
import pytest
import yaml

import orchestrator
from tests.conftest import ROOT, TASK, free_port, run_kt

pytestmark = pytest.mark.e2e

# the job's sweep is what the Jobs API carries (a Tune driver inside a Ray Job), kept cheap: supervised-only
# trials (no teacher, no Ray Train); distillation trials are covered by tests/ray/test_sweep_ray.py and
# tests/e2e/test_sweep_cli.py
SPACE = {"name": "jobs", "search": {"num_trials": 2, "max_concurrent_trials": 2, "seed": 0},
         "resources": {"cpus_per_worker": 0.9, "trial_driver_cpus": 0.1},
         "validation_per_class": 5,
         "fixed": {"method": "supervised", "baseline.epochs": 2,
                   "student": {"id": "timm/resnet10t", "model_kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8}}},
         "space": {"baseline.lr": {"loguniform": [1e-3, 1e-2]}}}


@pytest.fixture
def cluster(ray_cluster):
    """The session's real single-node cluster (tests.conftest.ray_cluster): head on 127.0.0.1, the Jobs API on
    a free port, 2 CPUs, token auth on."""
    return ray_cluster


def mlflow_sweep_runs(storage: Path, name: str):
    client = mlflow.MlflowClient(f"sqlite:///{storage}/mlflow.db")
    exp = client.get_experiment_by_name("fashion_mnist_smoke")
    runs = client.search_runs([exp.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("kt.sweep") == name and r.data.tags.get("kt.kind") == "sweep"]
    return parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def test_sweep_submitted_with_cli_and_python_api_succeeds(cluster, tmp_path):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    storage = tmp_path / "store"
    r = run_kt("submit", "--address", cluster, "--working-dir", str(ROOT), "--follow", "sweep",
               str(tmp_path / "space.yaml"), "--task", str(TASK), "--smoke", "--storage", str(storage),
               "--name", "via-cli", timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "submitted job" in r.stdout and "SUCCEEDED" in r.stdout and "Pareto front" in r.stdout
    parent, kids = mlflow_sweep_runs(storage, "via-cli")
    assert parent.info.status == "FINISHED" and len(kids) == 2
    assert {k.data.tags["kt.method"] for k in kids} == {"supervised"} and all(0 < k.data.metrics["val_top1"] <= 1
                                                                                for k in kids)

    # the Python API: a cheaper job (the supervised-only method: no teacher, no Ray Train), same storage
    job = orchestrator.submit(["run", str(TASK), "--smoke", "--set", "method=supervised", "--storage", str(storage)],
                              address=cluster, working_dir=ROOT)
    assert job.wait(timeout=600) == "SUCCEEDED", job.logs(tail=40)
    assert "student (supervised-only)" in job.logs()
    client = mlflow.MlflowClient(f"sqlite:///{storage}/mlflow.db")
    exp = client.get_experiment_by_name("fashion_mnist_smoke")
    [api_run] = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("method") == "supervised"
                 and "mlflow.parentRunId" not in r.data.tags]
    assert api_run.info.status == "FINISHED" and 0 < api_run.data.metrics["student_top1"] <= 1
    listed = run_kt("jobs", "--address", cluster, timeout=120)
    assert listed.returncode == 0 and job.job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    st = run_kt("status", job.job_id, "--address", cluster, timeout=120)
    assert st.returncode == 0 and st.stdout.strip() == "SUCCEEDED"


def test_failing_job_shows_its_log_tail_and_exits_nonzero(cluster, tmp_path):
    r = run_kt("submit", "--address", cluster, "--working-dir", str(ROOT), "--follow", "run", str(TASK), "--smoke",
               "--storage", str(tmp_path), "--set", "distill.temprature=2", timeout=600)
    assert r.returncode == 1, r.stdout[-2000:]
    assert "FAILED" in r.stdout and "last lines of its log" in r.stderr
    assert "unknown config key 'distill.temprature'" in r.stderr.replace("\n", " ")
    job_id = r.stdout.split("submitted job ", 1)[1].split()[0]
    assert run_kt("status", job_id, "--address", cluster, timeout=120).returncode == 1
    lg = run_kt("logs", job_id, "--address", cluster, timeout=120)
    assert lg.returncode == 0 and "distill.temprature" in lg.stdout


def test_unreachable_cluster_is_a_clear_error():
    r = run_kt("jobs", "--address", f"http://127.0.0.1:{free_port()}", timeout=120)
    assert r.returncode == 2 and "cannot reach the Ray Jobs API" in r.stderr.replace("\n", " ")


def test_oversized_working_dir_is_refused(tmp_path, monkeypatch):
    from orchestrator.ray_adapters import jobs

    (tmp_path / "blob.bin").write_bytes(b"\0" * 2048)
    monkeypatch.setattr(jobs, "MAX_WORKING_DIR_BYTES", 1024)
    with pytest.raises(jobs.JobsError, match="over Ray's .* upload limit"):
        jobs.runtime_env(tmp_path, {})
    assert jobs.working_dir_size(tmp_path, ["*.bin"]) == 0  # excluded files are not counted
