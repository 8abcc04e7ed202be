"""Search spaces: validation errors name the bad key, conditional dimensions, transfer-set variants, Optuna
define-by-run sampling, and the overrides a trial gets."""
import optuna
import pytest

from orchestrator.config import ConfigError
from orchestrator.sweeps.driver import _task_tree
from orchestrator.sweeps.space import base_tree, check_values, load_space
from tests.conftest import ROOT, TASK

STUDENTS = {"small": {"id": "timm/resnet10t", "model_kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8}},
            "mnv3": {"id": "timm/mobilenetv3_small_050"}}


def space(**over):
    s = {"name": "t", "space": {
        "transfer_set.source": {"choice": ["target_unlabeled", "retrieval"]},
        "transfer_set.max_images": {"choice": [100, 200], "when": {"transfer_set.source": "target_unlabeled"}},
        "transfer_set.retrieval.budget": {"choice": [300], "when": {"transfer_set.source": ["retrieval"]}},
        "distill.temperature": {"loguniform": [1.0, 8.0]},
        "distill.epochs": {"int": [1, 3]},
        "student": {"choice": STUDENTS}}}
    s.update(over)
    return s


def errors(s, overrides=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_space(s, overrides)
    return str(e.value)


def test_shipped_spaces_validate_against_the_demo_task():
    base = _task_tree(TASK, None, False)
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        sp = load_space(path)
        check_values(sp, base_tree(base, sp), str(path))
        assert {"transfer_set.source", "student"} <= set(sp.space), path  # source and architecture axes
        assert any(k.startswith("distill.") and "weight" in k for k in sp.space), path  # a loss-weight axis


@pytest.mark.parametrize("bad, needle", [
    ({"space": {"distill.tempreature": {"uniform": [1, 2]}}}, "space.distill.tempreature: not a config key"),
    ({"fixed": {"distil.epochs": 3}, "space": {"distill.lr": {"uniform": [0.1, 0.2]}}}, "fixed.distil.epochs"),
    ({"space": {"distill.lr": {"uniform": [0.2, 0.1]}}}, "low < high"),
    ({"space": {"distill.lr": {"loguniform": [0, 0.1]}}}, "loguniform needs low > 0"),
    ({"space": {"distill.lr": {"uniform": [0.1, 0.2], "choice": [1]}}}, "exactly one of"),
    ({"space": {"student": {"choice": [{"id": "timm/resnet10t"}]}}}, "name them"),
    ({"space": {"distill.lr": {"choice": []}}}, "choice is empty"),
    ({"space": {"transfer_set.max_images": {"int": [10, 20]}}}, "transfer-set, teacher and view dimensions must be `choice`"),
    ({"space": {"teacher.adapt": {"choice": ["linear_probe", "finetune"]}}}, "shares the data, labels and teacher"),
    ({"space": {"distill.lr": {"uniform": [0.1, 0.2], "when": {"distill.epochs": 3}}}}, "not an earlier dimension"),
    ({"space": {"distill.epochs": {"int": [1, 3]},
                "distill.lr": {"uniform": [0.1, 0.2], "when": {"distill.epochs": 2}}}},
     "not a `choice` dimension"),
    ({"space": {"transfer_set.source": {"choice": ["generic"]},
                "distill.lr": {"uniform": [0.1, 0.2], "when": {"transfer_set.source": "retrieval"}}}},
     "not among transfer_set.source's choices"),
    ({"objective": {"compute": "student_flops"}, "search": {"early_stopping": {"enabled": True}}}, "early stopping"),
    ({"serach": {}}, "unknown config key 'serach'"),
    ({"objective": {"metric": "loss"}}, "objective.metric"),
])
def test_validation_errors_name_the_problem(bad, needle):
    assert needle in errors(space(**bad))


def test_bad_values_are_caught_before_any_trial_runs():
    base = _task_tree(TASK, None, False)
    sp = load_space(space(space={"student": {"choice": {"x": {"id": "timm/not_a_model"}}},
                                 "distill.temperature": {"uniform": [-1.0, 2.0]}}))
    with pytest.raises(ConfigError) as e:
        check_values(sp, base_tree(base, sp), "s.yaml")
    msg = str(e.value)
    assert "space.student='x'" in msg and "timm/not_a_model" in msg
    assert "space.distill.temperature=-1.0" in msg and "greater than 0" in msg


def test_malformed_yaml_and_missing_file(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: x\nspace: {a: [1,\n")
    assert "malformed YAML" in errors(p)
    assert "does not exist" in errors(tmp_path / "nope.yaml")


def test_space_overrides_apply_to_the_file():
    sp = load_space(space(), ["search.num_trials=3", "search.max_concurrent_trials=2"])
    assert (sp.search.num_trials, sp.search.max_concurrent_trials) == (3, 2)
    assert "search.num_trials" in errors(space(), ["search.num_trials=0"])


def test_transfer_set_variants_follow_conditions():
    v = load_space(space()).transfer_set_variants()
    assert v == [{"transfer_set.source": "target_unlabeled", "transfer_set.max_images": 100},
                 {"transfer_set.source": "target_unlabeled", "transfer_set.max_images": 200},
                 {"transfer_set.source": "retrieval", "transfer_set.retrieval.budget": 300}]


def test_teacher_and_view_dimensions_are_prepared_once_per_value():
    sp = load_space({"name": "t", "space": {
        "teacher.ensemble": {"choice": {"one": [], "two": [{"id": "pypi/efficientnet_lite1"}]}},
        "distill.views": {"choice": [0, 4]}, "distill.temperature": {"uniform": [1, 4]}}})
    assert sp.transfer_set_keys() == ["teacher.ensemble", "distill.views"]
    assert len(sp.transfer_set_variants()) == 4
    assert "distill.views: transfer-set, teacher and view dimensions must be `choice`" in errors(
        {"name": "t", "space": {"distill.views": {"int": [0, 8]}}}).replace("space.", "")


def test_define_by_run_draws_only_active_dimensions_and_expands_sections():
    sp = load_space(space())
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        labels = sp.suggest(trial)
        study.tell(trial, 0.0)
        src = labels["transfer_set.source"]
        seen.add(src)
        assert ("transfer_set.max_images" in labels) == (src == "target_unlabeled")
        assert ("transfer_set.retrieval.budget" in labels) == (src == "retrieval")
        assert 1.0 <= labels["distill.temperature"] <= 8.0 and labels["distill.epochs"] in (1, 2, 3)
        over = sp.overrides(labels)
        assert over["student"] == STUDENTS[labels["student"]]  # a named choice becomes its whole section
    assert seen == {"target_unlabeled", "retrieval"}


def test_base_tree_holds_out_validation_and_sets_resources():
    base = _task_tree(TASK, None, False)
    sp = load_space(space(validation_per_class=7, resources={"workers_per_trial": 3},
                          fixed={"distill.epochs": 2}))
    tree = base_tree(base, sp)
    assert tree["labels"]["val_per_class"] == 7 and tree["baseline"]["enabled"] is False
    assert tree["distill"]["num_workers"] == 3 and tree["distill"]["epochs"] == 2


def test_trials_get_an_absolute_storage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative storage must not follow each Tune trial into its own directory
    tree = _task_tree(TASK, ["storage=rel_runs"], False)
    assert tree["storage"] == str(tmp_path / "rel_runs")
    assert _task_tree(TASK, ["storage=s3://bucket/kt"], False)["storage"] == "s3://bucket/kt"


def test_every_shipped_spaces_search_algorithm_pickles_and_still_suggests():
    """Tune pickles the search algorithm into its experiment state (start, checkpoints, resume); optuna 5.1's
    NSGA-II sampler holds a lock that made the multi-objective demo sweep fail in ``tune.Tuner``."""
    from ray import cloudpickle

    from orchestrator.ray_adapters.samplers import DistinctConfigs
    from orchestrator.ray_adapters.tune import _searcher

    kinds = set()
    for path in [*sorted((ROOT / "search_spaces").glob("*.yaml")), None]:
        sp = load_space(path or space())  # None: this file's single-objective space
        kinds.add(sp.multi_objective)
        alg = cloudpickle.loads(cloudpickle.dumps(_searcher(sp)))
        for i in range(3):  # one at a time: the concurrency limit may be 1
            drawn = alg.suggest(f"t{i}")
            assert drawn and "transfer_set.source" in drawn, path
            result = {sp.objective.metric: 0.5 + i / 10}
            if sp.multi_objective:
                result[sp.objective.compute] = 1e6
            alg.on_trial_complete(f"t{i}", result)
            alg = cloudpickle.loads(cloudpickle.dumps(alg))  # mid-sweep too (Tune's experiment state)
        guard = alg.searcher  # ConcurrencyLimiter -> DistinctConfigs (no repeated configuration) -> OptunaSearch
        assert isinstance(guard, DistinctConfigs) and sorted(guard.seen.values()) == ["t0", "t1", "t2"], path
    assert kinds == {True, False}  # both samplers (TPE, NSGA-II) were exercised
