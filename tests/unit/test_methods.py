"""Methods as plug-ins: the registry, `method` as a sweep dimension, and a sweep trial of a teacher-free method
run for real (no Ray needed: the supervised and ImageNet-init methods train in the trial's process)."""
import pytest

from orchestrator.config import ConfigError, load_config, resolve_config
from orchestrator.registry import UnknownNameError
from tests.conftest import TASK


def test_every_paper_1_method_is_registered_with_its_source():
    from orchestrator.methods import METHODS

    paper1 = ["pretrained_init", "ssl_pretrain", "supervised", "task_agnostic", "task_oriented"]
    paper2 = ["distill_nearest", "distill_weighted", "fixmatch", "random_source", "uniform_weights"]  # test_paper2
    assert METHODS.names() == sorted(paper1 + paper2)
    for name in METHODS.names():
        m = METHODS.get(name)
        assert m.summary and m.role.startswith("student") and m.source
    assert METHODS.get("task_oriented").uses_teacher and not METHODS.get("supervised").uses_teacher


def test_an_unknown_method_fails_in_preflight_naming_the_choices():
    from orchestrator.methods.preflight import preflight

    with pytest.raises(UnknownNameError, match="unknown method 'distill_everything'; valid choices: distill_nearest"):
        preflight(resolve_config({"name": "t", "method": "distill_everything"}))


def _space(**space):
    return {"name": "m", "search": {"num_trials": 2, "max_concurrent_trials": 1, "seed": 0},
            "validation_per_class": 5, "fixed": {"baseline.epochs": 2, "pretrained_init.finetune.epochs": 1},
            "space": space}


def test_method_is_a_sweep_choice_with_conditional_dimensions():
    from orchestrator.sweeps.space import base_tree, check_values, load_space

    sp = load_space(_space(method={"choice": ["supervised", "task_oriented"]},
                           **{"distill.temperature": {"uniform": [1.0, 4.0], "when": {"method": "task_oriented"}},
                              "baseline.lr": {"loguniform": [1e-3, 1e-2], "when": {"method": "supervised"}}}))
    base = base_tree(load_config(TASK, smoke=True).model_dump(mode="json"), sp)
    check_values(sp, base, "(test)")
    assert sp.active("distill.temperature", {"method": "task_oriented"})
    assert not sp.active("distill.temperature", {"method": "supervised"})
    bad = load_space(_space(method={"choice": ["supervised", "nope"]}))
    with pytest.raises((ConfigError, UnknownNameError), match="nope"):
        check_values(bad, base, "(test)")


def test_a_teacher_free_sweep_prepares_no_teacher_and_its_trial_trains_the_method(tmp_path):
    from orchestrator.sweeps.driver import prepare, sweep_methods
    from orchestrator.sweeps.space import base_tree, load_space
    from orchestrator.sweeps.trial import run_trial
    from orchestrator.tracking import NullTracker

    sp = load_space(_space(method={"choice": ["supervised", "pretrained_init"]}))
    tree = {**load_config(TASK, [f"storage={tmp_path}"], smoke=True).model_dump(mode="json"),
            "storage": str(tmp_path)}
    base = base_tree(tree, sp)
    assert sweep_methods(sp, base) == ["supervised", "pretrained_init"]
    sctx = prepare("m", sp, base, NullTracker(), tmp_path)
    assert sctx.teacher_id is None and sctx.adapted is None and sctx.transfer_sets == {}
    reports = []
    final = run_trial(sctx, "t0", {"method": "supervised"}, reports.append)
    assert reports == [final] and final["kt_tags"]["method"] == "supervised"
    assert 0.0 <= final["val_top1"] <= 1.0 and final["teacher_forward_passes"] == 0 and final["images_seen"] > 0
    assert (tmp_path / "trials" / "t0" / "student.pt").is_file()


def test_compare_leaves_out_the_zoo_methods_unless_the_task_has_a_zoo():
    from orchestrator.commands.compare import default_methods

    plain = default_methods(load_config(TASK, smoke=True))
    assert plain[:3] == ["task_oriented", "task_agnostic", "ssl_pretrain"] and "fixmatch" in plain
    assert not {"distill_weighted", "distill_nearest", "random_source", "uniform_weights"} & set(plain)
    with_zoo = default_methods(load_config(TASK, ["sources.demo=true"], smoke=True))
    assert {"distill_weighted", "distill_nearest", "random_source", "uniform_weights"} <= set(with_zoo)
