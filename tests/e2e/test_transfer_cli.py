"""Issue 27 through the CLI: a teacher list (two teachers averaged) with cached augmented views through `kt run`,
then `kt compare` holding one student (EfficientNet-Lite0) fixed for every method, on the same storage, so the
adapted teachers and their ensemble are read from the cache."""
import csv
import json

import pytest

from tests.conftest import TASK, run_kt

pytestmark = pytest.mark.e2e

# the smoke teacher (EfficientNet-Lite0 at 32 px) and a tiny random-init second teacher
ENSEMBLE = ("teacher.ensemble=[{id: timm/resnet10t, model_kwargs: {channels: [8, 16, 32, 64], stem_width: 8, "
            "input_size: 32}}]")
FAST = ["distill.epochs=1", "distill.batch_size=64", "transfer_set.max_images=300", "baseline.epochs=2",
        "finetune.epochs=1", "pretrained_init.finetune.epochs=1", ENSEMBLE]


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("kt_transfer")


@pytest.fixture(scope="module")
def views_run(storage):
    sets = [a for s in [*FAST, "distill.views=3", "distill.view_topk=4"] for a in ("--set", s)]
    return run_kt("run", str(TASK), "--smoke", "--storage", str(storage), *sets, timeout=900)


def test_a_teacher_list_with_cached_views_runs_through_kt_run(views_run, storage):
    r = views_run
    assert r.returncode == 0, r.stderr[-4000:]
    out = " ".join(r.stdout.split())
    assert "teacher 0 (finetune)" in out and "teacher 1 (finetune)" in out
    assert "teacher ensemble (mean of probabilities)" in out and "ensemble(pypi/efficientnet_lite0@32" in out
    assert "3 views per image" in r.stderr and "900 views" in r.stderr  # 300 transfer images x 3, labelled once
    m = json.loads(next((storage / "runs").glob("*/result.json")).read_text())["metrics"]
    assert m["teacher_inference.teacher_forward_passes"] == 900 and m["teacher_inference.views"] == 3
    assert m["teacher_inference.topk_top1_changed"] == 0 and 0 < m["teacher_inference.topk_kept_mass"] <= 1
    assert {"adapt_teacher_0.top1", "adapt_teacher_1.top1", "adapt_teacher.top1"} <= set(m)
    entries = [d for d in (storage / "cache" / "adapted_teacher").iterdir() if not d.name.startswith(".")]
    assert len(entries) == 3  # two members and their ensemble
    outputs = next(d for d in (storage / "cache" / "teacher_outputs").iterdir() if not d.name.startswith("."))
    assert {"views.npy", "soft_topk_classes.npy", "soft_topk_logprob.npy"} <= {p.name for p in outputs.iterdir()}


def test_kt_compare_holds_one_student_for_every_method(views_run, storage):
    sets = [a for s in FAST for a in ("--set", s)]
    r = run_kt("compare", str(TASK), "--smoke", "--storage", str(storage), "--seeds", "0", "--methods",
               "task_oriented,pretrained_init", "--student", "pypi/efficientnet_lite0", *sets, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    out = next((storage / "compare").iterdir())
    rows = {row["method"]: row for row in csv.DictReader(open(out / "compare.csv"))}
    assert set(rows) == {"task_oriented", "pretrained_init", "supervised"}
    # the same network: ImageNet-initialised for task_oriented and pretrained_init, from scratch for supervised
    assert rows["task_oriented"]["student"] == rows["pretrained_init"]["student"] == "pypi/efficientnet_lite0"
    assert rows["supervised"]["student"] == "timm/tf_efficientnet_lite0"
    assert len({float(row["student_flops"]) for row in rows.values()}) == 1
    # the ensemble teacher and its members came from the kt run's cache
    assert len([d for d in (storage / "cache" / "adapted_teacher").iterdir() if not d.name.startswith(".")]) == 3
