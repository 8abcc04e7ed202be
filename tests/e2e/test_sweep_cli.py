"""`kt sweep` through the CLI: a bad search space fails before anything runs. (A sweep killed and resumed, end
to end: tests/ray/test_sweep_ray.py; one submitted as a Ray Job: tests/e2e/test_jobs_cluster.py.)"""
import pytest
import yaml

from tests.conftest import TASK, run_kt

pytestmark = pytest.mark.e2e

SPACE = {"name": "bad", "search": {"num_trials": 2},
         "space": {"distill.temprature": {"uniform": [1, 2]}}}


def test_sweep_bad_space_fails_fast(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    r = run_kt("sweep", str(space), "--task", str(TASK), "--smoke", "--storage", str(tmp_path), timeout=120)
    assert r.returncode == 2 and "space.distill.temprature: not a config key" in r.stderr.replace("\n", " ")
    assert not (tmp_path / "sweeps").exists()



def test_sweep_of_more_trials_than_the_space_holds_fails_fast(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"name": "small", "search": {"num_trials": 5},
                                     "space": {"distill.feature_weight": {"choice": [0.0, 0.5]},
                                               "distill.epochs": {"int": [1, 2]}}}))
    r = run_kt("sweep", str(space), "--task", str(TASK), "--smoke", "--storage", str(tmp_path), timeout=120)
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "search.num_trials=5, but the space holds only 4 distinct configurations" in err
    assert "--space-set search.num_trials=4" in err and not (tmp_path / "sweeps").exists()
