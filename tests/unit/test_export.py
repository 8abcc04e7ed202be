"""Deployable students on real Fashion-MNIST images: the kt-student/1 bundle, ONNX verified against PyTorch, the
MLflow pyfunc model and its registry version, `kt predict` / `kt export` / `kt register` and their bad inputs."""
import functools
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.config import TrainConfig
from orchestrator.models.export import (DeployError, OnnxParityError, export_onnx, load_student, pyfunc_parts,
                                        save_student, verify_onnx)
from orchestrator.models.onnx_student import InputShapeError, OnnxStudent
from orchestrator.models.students import create_student, student_preprocess
from orchestrator.stages.loop import predict as torch_predict
from orchestrator.stages.loop import train_supervised
from tests.conftest import TINY_RESNET

LINEAGE = {"teacher": "pypi/efficientnet_lite0", "adapted_teacher.key": "a" * 16,
           "transfer_set.source": "target_unlabeled", "transfer_set.key": "t" * 16, "teacher_outputs.key": "o" * 16,
           "method": "task_oriented", "task": "fmnist_test", "val_top1": 0.5, "test_top1": 0.55, "student_flops": 1.17e6}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a small shared CPU, OpenMP threads spinning against another process's load make
    these tiny models ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(fmnist):
    """A tiny resnet10t trained 3 epochs on 300 real labeled images, with its preprocessing."""
    pre = student_preprocess("timm/resnet10t", TINY_RESNET, fmnist)
    torch.manual_seed(0)
    model = create_student("timm/resnet10t", 10, pre, TINY_RESNET)
    train_supervised(model, pre, fmnist.train.subset(np.arange(300)), TrainConfig(epochs=3, batch_size=64))
    return model.eval(), pre


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fmnist, trained):
    """A run directory as `kt run` leaves it: config.yaml, student/student.pt and a verified student.onnx."""
    d = tmp_path_factory.mktemp("runs") / "fmnist_test-20260101-000000"
    (d / "student").mkdir(parents=True)
    (d / "config.yaml").write_text("name: fmnist_test\n")
    save_student(d / "student" / "student.pt", *trained, model_id="timm/resnet10t", model_kwargs=TINY_RESNET,
                 classes=fmnist.classes, examples=fmnist.test.images[:64], lineage=LINEAGE)
    export_onnx(load_student(d / "student" / "student.pt"), d / "student" / "student.onnx", fmnist.test.images)
    return d


def reference_top1(trained, images):
    model, pre = trained
    return torch_predict(model, pre, images).argmax(1)  # what stages/evaluate.py scores


def test_bundle_round_trip(run_dir, fmnist, trained):
    s = load_student(run_dir / "student" / "student.pt")
    assert s.model_id == "timm/resnet10t" and s.model_kwargs == TINY_RESNET and s.classes == fmnist.classes
    assert s.preprocess == trained[1] and s.image_shape == (28, 28, 1) and s.lineage == LINEAGE
    assert s.examples.shape == (64, 28, 28, 1) and s.examples.dtype == np.uint8
    ref = torch_predict(*trained, fmnist.test.images)  # (300, 10) float32
    assert np.array_equal(s.logits(fmnist.test.images), ref)  # bit-identical to the pipeline's evaluation
    assert not [p for p in (run_dir / "student").iterdir() if p.name.startswith(".")]  # atomic: no temp files
    (run_dir / "other.pt").write_bytes(b"not a bundle")
    with pytest.raises(DeployError, match="unreadable"):
        load_student(run_dir / "other.pt")
    torch.save({"format": "kt-model/1"}, run_dir / "other.pt")
    with pytest.raises(DeployError, match="not a kt-student/1 student bundle"):
        load_student(run_dir / "other.pt")


def test_onnx_matches_pytorch_on_real_test_images(run_dir, fmnist, trained):
    onnx = OnnxStudent(run_dir / "student" / "student.onnx")
    assert onnx.image_shape == (28, 28, 1) and onnx.classes == fmnist.classes
    assert onnx.meta["kt.format"] == "kt-student-onnx/1" and json.loads(onnx.meta["kt.lineage"]) == LINEAGE
    ref = torch_predict(*trained, fmnist.test.images)
    got = onnx.logits(fmnist.test.images, batch_size=97)  # dynamic batch: 97, 97, 97, 9
    assert np.abs(got - ref).max() <= 1e-4 and np.array_equal(got.argmax(1), ref.argmax(1))
    one = onnx.predict_proba(fmnist.test.images[:1, ..., 0])  # (1, H, W): C = 1 implied
    assert one.shape == (1, 10) and abs(one.sum() - 1) < 1e-5


def test_onnx_that_differs_from_pytorch_is_a_clear_error(run_dir, fmnist):
    s = load_student(run_dir / "student" / "student.pt")
    with torch.no_grad():
        s.model.fc.bias += 0.01  # the PyTorch student no longer equals the exported graph
    with pytest.raises(OnnxParityError, match=r"max \|logit difference\| 1\.0\de-02 \(allowed 1e-04\)"):
        verify_onnx(run_dir / "student" / "student.onnx", s, fmnist.test.images[:50])


def test_onnx_wrong_input_shape_is_a_clear_error(run_dir, tmp_path, fmnist):
    onnx = OnnxStudent(run_dir / "student" / "student.onnx")
    with pytest.raises(InputShapeError, match=r"shape \(N, 28, 28, 1\); got uint8 \(2, 32, 32, 3\). Resize to 28x28"):
        onnx.logits(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(InputShapeError, match="float32"):
        onnx.logits(fmnist.test.images[:2].astype(np.float32))
    foreign = tmp_path / "foreign.onnx"  # a float NCHW graph, as most ONNX classifiers are
    torch.onnx.export(torch.nn.Conv2d(3, 4, 3), (torch.zeros(1, 3, 32, 32),), str(foreign), dynamo=False)
    with pytest.raises(InputShapeError, match=r"takes tensor\(float\) \(1, 3, 32, 32\) input, not the uint8"):
        OnnxStudent(foreign)
    r = CliRunner().invoke(app, ["predict", str(foreign), str(tmp_path), "--out", str(tmp_path / "p.csv")])
    assert r.exit_code == 2 and "not the uint8 (N, H, W, C) images of a kt student" in r.output


def test_pyfunc_model_predicts_like_evaluate_and_registers_with_lineage(run_dir, tmp_path, fmnist, trained):
    import mlflow

    from orchestrator.tracking import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Tracker, model_version_tags,
                                       register_model_version)

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "deploy-test", tmp_path / "mlartifacts")
    client = mlflow.MlflowClient(uri)
    assert client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    s = load_student(run_dir / "student" / "student.pt")
    with tracker.run("r") as run:
        model_uri = tracker.model(functools.partial(pyfunc_parts, s, run_dir / "student" / "student.onnx"))
    logged = client.get_logged_model(model_uri.split("/")[-1])
    assert logged.experiment_id == tracker.experiment_id and logged.source_run_id == run.info.run_id
    assert str(logged.status) == "READY" and logged.artifact_location.startswith((tmp_path / "mlartifacts").as_uri())
    model = mlflow.pyfunc.load_model(model_uri)
    sig = model.metadata.signature
    assert sig.inputs.inputs[0].type == np.dtype(np.uint8) and sig.inputs.inputs[0].shape == (-1, 28, 28, 1)
    assert sig.outputs.inputs[0].shape == (-1, 10) and model.metadata.metadata["kt"]["classes"] == fmnist.classes
    probs = model.predict(fmnist.test.images)
    assert probs.shape == (300, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.array_equal(probs.argmax(1), reference_top1(trained, fmnist.test.images))
    version = register_model_version(uri, model_uri, "fmnist-student", {"kt.teacher": "pypi/efficientnet_lite0"})
    assert version == "1" and model_version_tags(uri, "fmnist-student", "1")["kt.teacher"] == "pypi/efficientnet_lite0"
    assert client.get_model_version("fmnist-student", "1").run_id == run.info.run_id
    again = mlflow.pyfunc.load_model("models:/fmnist-student/1").predict(fmnist.test.images[:20])
    assert np.array_equal(again, probs[:20])


def test_kt_predict_folder_with_one_corrupt_image(run_dir, tmp_path, fmnist, trained):
    from PIL import Image

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(fmnist.test.images[i, ..., 0]).save(folder / ("sub" if i % 2 else ".") / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image, not a candidate")
    out = tmp_path / "pred.csv"
    r = CliRunner().invoke(app, ["predict", str(run_dir), str(folder), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "6 images classified" in r.output and "1 unreadable, skipped" in r.output
    assert "broken.png" in r.output and "corrupt or unreadable image" in r.output  # reported, with the reason
    lines = out.read_text().splitlines()
    assert lines[0] == "path,class,probability" and len(lines) == 7
    got = {row.split(",")[0].rsplit("/", 1)[-1]: row.split(",")[1] for row in lines[1:]}
    ref = reference_top1(trained, fmnist.test.images[:6])
    assert got == {f"img{i}.png": fmnist.classes[ref[i]] for i in range(6)}
    onnx_out = tmp_path / "onnx.csv"  # the ONNX file predicts the same classes
    r = CliRunner().invoke(app, ["predict", str(run_dir / "student" / "student.onnx"), str(folder), "--out",
                                 str(onnx_out)])
    assert r.exit_code == 0 and [x.split(",")[:2] for x in onnx_out.read_text().splitlines()] == \
        [x.split(",")[:2] for x in lines]


def test_kt_export_formats(run_dir, tmp_path, fmnist, trained):
    for fmt in ("onnx", "torchscript", "state_dict"):
        out = tmp_path / f"s.{fmt}"
        r = CliRunner().invoke(app, ["export", str(run_dir), "--format", fmt, "--out", str(out)])
        assert r.exit_code == 0 and out.is_file(), r.output
    ts = torch.jit.load(str(tmp_path / "s.torchscript"))(torch.from_numpy(fmnist.test.images[:8]))
    assert torch.equal(ts.argmax(1), torch.from_numpy(reference_top1(trained, fmnist.test.images[:8])))
    sd = torch.load(tmp_path / "s.state_dict", weights_only=True)
    assert sd["model_id"] == "timm/resnet10t" and "fc.weight" in sd["state_dict"]
    r = CliRunner().invoke(app, ["export", str(run_dir), "--format", "tflite"])
    assert r.exit_code == 2 and "unknown export format 'tflite'; use one of: onnx, torchscript, state_dict" in r.output


def _sweep(tmp_path, status: str, uri: str) -> tuple:
    sweep = tmp_path / "sweeps" / "s1"
    tdir = sweep / "trials" / "abc_00001"
    tdir.mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"name": "s1", "tracking_uri": uri, "experiment": "none",
                                                  "parent_run_id": "p"}))
    (tdir / "row.json").write_text(json.dumps({"trial_id": "abc_00001", "status": status, "error": "CUDA exploded",
                                               "val_top1": None, "params": {}}))
    return sweep, tdir


@pytest.mark.parametrize("case", ["run_without_student", "failed_trial", "stopped_trial", "unknown_trial",
                                  "unknown_model_uri", "empty_folder", "missing_input", "not_a_run"])
def test_bad_inputs_are_clear_errors(case, tmp_path, run_dir):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    empty = tmp_path / "empty"
    empty.mkdir()
    if case == "run_without_student":
        bare = tmp_path / "runs" / "failed-run"
        bare.mkdir(parents=True)
        (bare / "config.yaml").write_text("name: x\n")
        args, msg = ["export", str(bare)], "has no student (" + str(bare / "student" / "student.pt")
        msg2 = "it did not finish (no result.json): run it again"
    elif case in ("failed_trial", "stopped_trial"):
        sweep, tdir = _sweep(tmp_path, "error" if case == "failed_trial" else "stopped", uri)
        args = ["register", str(sweep), "--trial", "abc_00001", "--storage", str(tmp_path)]
        msg = "trial abc_00001 of sweep s1 has no student"
        msg2 = "it failed (CUDA exploded)" if case == "failed_trial" else "stopped early (ASHA)"
    elif case == "unknown_trial":
        sweep, _ = _sweep(tmp_path, "completed", uri)
        args = ["export", "s1", "--trial", "zzz", "--storage", str(tmp_path)]
        msg, msg2 = "has no trial 'zzz'", "abc_00001"
    elif case == "unknown_model_uri":
        args = ["predict", "models:/no-such-model/3", str(empty), "--tracking-uri", uri]
        msg, msg2 = "no MLflow model models:/no-such-model/3 in " + uri, "check the name and version"
    elif case == "empty_folder":
        args, msg, msg2 = ["predict", str(run_dir), str(empty)], f"folder {empty} holds no images", "pass image files"
    elif case == "missing_input":
        args, msg, msg2 = ["predict", str(run_dir), str(tmp_path / "nope.png")], "no such file or folder", "nope.png"
    else:
        args, msg, msg2 = ["export", str(empty)], "is not a run directory, a sweep trial directory", "kt run prints"
    r = CliRunner().invoke(app, args)
    out = " ".join(r.output.split())  # rich wraps long lines
    assert r.exit_code == 2, r.output
    assert msg in out and msg2 in out, out
