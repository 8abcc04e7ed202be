import pytest

from orchestrator.config import ConfigError, load_config, parse_overrides, resolve_config
from tests.conftest import TASK


def test_task_yaml_loads_and_overrides_apply():
    cfg = load_config(TASK, ["distill.epochs=3", "student.id=timm/mobilenetv3_small_100", "distill.lr=0.01"])
    assert cfg.distill.epochs == 3 and cfg.student.id == "timm/mobilenetv3_small_100"
    assert cfg.distill.lr == pytest.approx(0.01)
    assert cfg.labels.label_fraction == pytest.approx(0.01)


def test_smoke_profile_applies_dotted_values():
    full, smoke = load_config(TASK), load_config(TASK, smoke=True)
    assert full.data.limit_train is None and smoke.data.limit_train == 2000
    from orchestrator.stages.schedule import distill_plan  # smoke: 2 epochs; full: the default 2,000 steps

    assert distill_plan(1900, smoke.distill, 2).total_steps < distill_plan(1900, full.distill, 2).total_steps


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'distill.temprature'"):
        load_config(TASK, ["distill.temprature=2"])
    with pytest.raises(ConfigError, match=r"unknown config key 'bogus'"):
        resolve_config({"bogus": 1})


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1"])
def test_label_fraction_out_of_range(value):
    with pytest.raises(ConfigError, match=r"label_fraction=.* is out of range; use a value in \(0, 1\]"):
        load_config(TASK, [f"labels.label_fraction={value}"])


def test_per_class_replaces_fraction():
    cfg = load_config(TASK, ["labels.per_class=5"])
    assert cfg.labels.per_class == 5 and cfg.labels.label_fraction is None


def test_malformed_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ndistill:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError, match=r"malformed YAML in .*bad.yaml at line \d+"):
        load_config(p)


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="is not key=value"):
        parse_overrides(["distill.epochs"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(TASK, ["seed.x=1"])


def test_wrong_type_is_explained():
    with pytest.raises(ConfigError, match=r"distill.epochs: .*got 'many'"):
        load_config(TASK, ["distill.epochs=many"])


def test_python_api_uses_the_same_funnel():
    import orchestrator

    with pytest.raises(ConfigError, match="unknown config key 'distill.temprature'"):
        orchestrator.run({"distill": {"temprature": 2}})
    with pytest.raises(ConfigError, match="out of range"):
        orchestrator.run(str(TASK), overrides=["labels.label_fraction=2"])
    assert orchestrator.load_config(TASK, smoke=True).name == "fashion_mnist_smoke"


def test_python_api_functions_stay_functions_after_their_modules_load():
    """A package function named like a submodule is replaced by the module when that submodule is imported
    (``orchestrator.predict`` used to be): every API entry point stays callable after every module loads."""
    import importlib
    import pkgutil

    import orchestrator

    for m in pkgutil.iter_modules(orchestrator.__path__):
        if not m.ispkg and m.name not in ("cli", "cli_jobs", "cli_common"):
            importlib.import_module(f"orchestrator.{m.name}")
    for name in orchestrator.__all__:
        if name != "PipelineConfig":
            assert callable(getattr(orchestrator, name)) and not isinstance(getattr(orchestrator, name), type(orchestrator)), name
