"""From a finished `kt run` to a served student, through the CLI: kt export, kt register (Model Registry version
with lineage tags), kt predict (run dir and models:/ URI), and `mlflow models serve`, run as `kt register`
printed it without the virtualenv on PATH, answering a REST request on real Fashion-MNIST images with the same
classes. The server is stopped through its own process group."""
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import free_port, run_kt

pytestmark = pytest.mark.e2e


def _serve(printed: str, log_file: Path) -> tuple[subprocess.Popen, str]:
    """The `mlflow models serve` line `kt register` printed, run as printed by a shell whose PATH does not hold
    the virtualenv (not activated), on a free port, in a new session (its own process group); waits for /ping."""
    port = free_port()
    line = printed.split("serve it:", 1)[1].strip()
    assert line.endswith(" -p 5001"), line
    bare = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MLFLOW_TRACKING_URI")}
    bare["PATH"] = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                                   if d and not Path(d, "mlflow").exists() and not Path(d, "uvicorn").exists())
    assert subprocess.run(["bash", "-c", "command -v uvicorn mlflow"], env=bare).returncode != 0  # not on PATH
    log = open(log_file, "w")
    proc = subprocess.Popen(["bash", "-c", line[:-len("5001")] + str(port)], env=bare, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited {proc.returncode}: {log_file.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(1)
    _stop(proc)
    raise AssertionError(f"mlflow models serve did not answer /ping in 180 s: {log_file.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server's own process group (its id is the server's pid: start_new_session), nothing else."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_run_student_exported_registered_predicted_and_served(smoke_run, tmp_path, fmnist):
    import mlflow
    from PIL import Image

    from orchestrator.models.export import load_student

    storage, r = smoke_run  # the session's `kt run --smoke` (tests/e2e/conftest.py): its first run directory
    assert r.returncode == 0, r.stderr[-4000:]
    run_dir = sorted((storage / "runs").glob("fashion_mnist_smoke-*"))[0]
    res = json.loads((run_dir / "result.json").read_text())
    uri = res["tracking_uri"]
    assert {"student.pt", "student.onnx"} <= {p.name for p in (run_dir / "student").iterdir()}
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("fashion_mnist_smoke")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the runs table, not the GenAI view
    arts = {a.path for a in client.list_artifacts(res["run_id"], "student")}
    assert {"student/student.pt", "student/student.onnx"} <= arts
    assert res["student"]["model_uri"].startswith("models:/")  # the run's own MLflow model

    out = tmp_path / "exported.onnx"
    r = run_kt("export", str(run_dir), "--format", "onnx", "--out", str(out))
    assert r.returncode == 0 and out.is_file(), r.stderr[-3000:]

    r = run_kt("register", str(run_dir), "--name", "fmnist-smoke-student")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "as models:/fmnist-smoke-student/1" in r.stdout and "mlflow models serve -m models:/" in r.stdout
    [serve_line] = [line for line in r.stdout.splitlines() if "serve it:" in line]
    tags = client.get_model_version("fmnist-smoke-student", "1").tags
    for key in ("kt.teacher", "kt.adapted_teacher.key", "kt.transfer_set.key", "kt.teacher_outputs.key"):
        assert tags[key], key
    assert tags["kt.method"] == "task_oriented" and tags["kt.transfer_set.source"] == "target_unlabeled"
    assert tags["kt.teacher"] == "pypi/efficientnet_lite0" and tags["kt.student"] == "timm/resnet10t"
    assert float(tags["kt.test_top1"]) == res["metrics"]["student_top1"]
    assert float(tags["kt.student_flops"]) > 0 and tags["kt.run_id"] == res["run_id"]

    images = fmnist.test.images[:24]  # real test images as PNG files, plus one that is not an image
    folder = tmp_path / "images"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im[..., 0]).save(folder / f"{i:02d}.png")
    (folder / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    student = load_student(run_dir / "student" / "student.pt")
    expected = [student.classes[k] for k in student.logits(images).argmax(1)]  # as the pipeline evaluates
    for model in (str(run_dir), "models:/fmnist-smoke-student/1"):
        csv = tmp_path / f"pred{len(model)}.csv"
        r = run_kt("predict", model, str(folder), "--out", str(csv), "--tracking-uri", uri)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "skipped" in r.stderr and "zz_corrupt.png" in r.stderr and "24 images classified" in r.stdout
        assert [line.split(",")[1] for line in csv.read_text().splitlines()[1:]] == expected

    proc, url = _serve(serve_line, tmp_path / "serve.log")
    try:
        body = json.dumps({"inputs": images.tolist()}).encode()
        req = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            probs = np.asarray(json.loads(resp.read())["predictions"], np.float32)  # (24, 10)
    finally:
        _stop(proc)
    assert probs.shape == (24, 10) and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert [student.classes[k] for k in probs.argmax(1)] == expected
