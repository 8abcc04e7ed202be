"""A sweep whose dimension is the teacher (issue 27): one trial distils from EfficientNet-Lite0, the other from
its ensemble with a second teacher; the prepare step adapts every teacher (and the ensemble) once, labels the
transfer set once per teacher, and each trial reads the outputs of its own teacher."""
import pytest

import orchestrator
from tests.conftest import TASK

pytestmark = pytest.mark.ray

TINY = {"id": "timm/resnet10t", "model_kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8}}
SECOND = [{"id": "timm/resnet10t", "model_kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8, "input_size": 32}}]
SPACE = {"name": "teachers", "search": {"num_trials": 2, "max_concurrent_trials": 1, "seed": 0},
         "resources": {"cpus_per_worker": 0.9, "trial_driver_cpus": 0.1, "max_failures": 0},
         "validation_per_class": 5,
         "fixed": {"distill.epochs": 1, "distill.batch_size": 64, "finetune.epochs": 1,
                   "transfer_set.max_images": 200, "student": TINY},
         "space": {"teacher.ensemble": {"choice": {"single": [], "pair": SECOND}}}}


def test_the_teacher_is_a_sweep_dimension(local_ray, tmp_path):
    result = orchestrator.sweep(SPACE, TASK, [f"storage={tmp_path}"], smoke=True, name="teachers")
    rows = {r["params"]["teacher.ensemble"]: r for r in result.rows}
    assert set(rows) == {"single", "pair"}
    assert all(r["status"] == "completed" and r["teacher_forward_passes"] == 0 for r in rows.values())
    keys = {k: r["tags"]["adapted_teacher.key"] for k, r in rows.items()}
    assert keys["single"] != keys["pair"]  # each trial distilled from its own teacher's outputs
    assert rows["single"]["tags"]["teacher_outputs.key"] != rows["pair"]["tags"]["teacher_outputs.key"]
    adapted = {d.name for d in (tmp_path / "cache" / "adapted_teacher").iterdir() if not d.name.startswith(".")}
    assert len(adapted) == 3 and set(keys.values()) <= adapted  # Lite0, the second teacher, their ensemble
