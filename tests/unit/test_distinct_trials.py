"""A sweep of N trials runs N distinct configurations: the searcher draws again when the sampler repeats an
earlier trial's labels (TPE on categoricals, NSGA-II children equal to a parent), through pickling and Tune's
experiment checkpoint; a space with fewer than N distinct configurations is refused before the sweep starts."""
import random

import pytest

from orchestrator.config import ConfigError
from orchestrator.sweeps.space import check_trial_budget, load_space
from tests.conftest import ROOT

STUDENTS = {"choice": {"a": {"id": "timm/resnet10t"}, "b": {"id": "timm/mobilenetv3_small_050"},
                       "c": {"id": "timm/mobilenetv3_small_075"}}}


def tiny(num_trials: int, multi: bool = False, population: int = 2, **space) -> dict:
    return {"name": "tiny", "objective": {"compute": "student_flops" if multi else None},
            "search": {"num_trials": num_trials, "max_concurrent_trials": 2, "population_size": population,
                       "seed": 0}, "space": space or {"student": STUDENTS}}


def drive(alg, sp, restart=None) -> list[dict]:
    """Drive ``alg`` as Tune does: ask for a trial until the concurrency limit answers None, then end the oldest
    live trial with a result; ``restart(alg)`` (pickle, checkpoint) after every trial's start."""
    from orchestrator.ray_adapters.samplers import canonical

    rng, drawn, live, i = random.Random(0), [], [], 0
    while len(drawn) < sp.search.num_trials:
        config = alg.suggest(f"t{i}")
        if config is None:
            tid = live.pop(0)
            result = {"val_top1": rng.random(), "student_flops": rng.choice([1e6, 2e6])}
            alg.on_trial_result(tid, {**result, "training_iteration": 1})
            alg.on_trial_complete(tid, result)
            continue
        drawn.append(canonical(config))
        live.append(f"t{i}")
        i += 1
        alg = restart(alg) if restart else alg
    return drawn


def guard(alg):
    """The DistinctConfigs inside a search algorithm (Tune's SearchGenerator, ConcurrencyLimiter)."""
    from orchestrator.ray_adapters.samplers import DistinctConfigs

    while not isinstance(alg, DistinctConfigs):
        alg = alg.searcher
    return alg


@pytest.mark.parametrize("space, configs", [
    (tiny(3), 3),  # TPE's random start over 3 labels repeats one at the third trial
    (tiny(6, multi=True, **{"student": STUDENTS, "distill.feature_weight": {"choice": [0.0, 0.5]}}), 6),  # NSGA-II
    (tiny(8, multi=True, population=2, **{"student": STUDENTS, "distill.ce_weight": {"uniform": [0.0, 1.0]}}),
     None),
])
def test_every_trial_gets_a_configuration_no_earlier_trial_got(space, configs):
    from ray import cloudpickle
    from ray.tune.search import ConcurrencyLimiter

    from orchestrator.ray_adapters.tune import _searcher

    sp = load_space(space)
    if configs is not None:
        assert sp.distinct_configs() == configs  # the whole space: the last trials must find the last ones
    raw = drive(ConcurrencyLimiter(guard(_searcher(sp)).searcher, 2), sp)  # the bare sampler repeats itself
    assert len(set(raw)) < len(raw)
    alg = _searcher(sp)
    drawn = drive(alg, sp, restart=lambda a: cloudpickle.loads(cloudpickle.dumps(a)))
    assert len(set(drawn)) == len(drawn) == sp.search.num_trials


def test_the_shipped_demo_sweep_runs_8_distinct_configurations():
    """search_spaces/quick.yaml, seed 0: NSGA-II bred 2 children equal to a parent (trials df2b6a38, 16b60072 of
    the demo run reused a result); through the guard the 8 trials are 8 configurations."""
    from ray.tune.search import ConcurrencyLimiter

    from orchestrator.ray_adapters.tune import _searcher

    sp = load_space(ROOT / "search_spaces" / "quick.yaml")
    assert len(set(drive(ConcurrencyLimiter(guard(_searcher(sp)).searcher, 2), sp))) == 6
    alg = _searcher(sp)
    assert len(set(drive(alg, sp))) == 8 and guard(alg).redraws > 0


def test_tune_checkpoint_keeps_what_was_drawn(tmp_path):
    """Tune's experiment checkpoint (SearchGenerator.save_to_dir, as the controller writes it) restored into a
    fresh search algorithm (Tuner.restore): the trials after the resume avoid the ones before it."""
    from ray.tune.search import SearchGenerator

    from orchestrator.ray_adapters.tune import _searcher

    sp = load_space(tiny(6, multi=True, **{"student": STUDENTS, "distill.feature_weight": {"choice": [0.0, 0.5]}}))
    restarts = []

    def restart(gen):
        d = tmp_path / f"ckpt{len(restarts)}"
        d.mkdir()
        gen.save_to_dir(str(d), session_str="s")
        fresh = SearchGenerator(_searcher(sp))
        fresh.restore_from_dir(str(d))
        restarts.append(len(guard(fresh).seen))  # restored from the files
        return fresh

    drawn = drive(Suggester(SearchGenerator(_searcher(sp))), sp, restart=lambda a: Suggester(restart(a.gen)))
    assert len(set(drawn)) == len(drawn) == 6
    assert restarts == [1, 2, 3, 4, 5, 6]


class Suggester:
    """Tune's SearchGenerator with the Searcher's suggest/on_trial_* calls (it makes Trials, not configs)."""

    def __init__(self, gen):
        self.gen = gen

    def suggest(self, trial_id):
        return self.gen.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id, result):
        self.gen.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.gen.searcher.on_trial_complete(trial_id, result, error)


def test_a_space_too_small_for_the_trials_is_refused_before_the_sweep():
    sp = load_space(tiny(7, **{"student": STUDENTS, "distill.feature_weight": {"choice": [0.0, 0.5]}}))
    with pytest.raises(ConfigError) as e:
        check_trial_budget(sp, "s.yaml")
    msg = str(e.value)
    assert "search.num_trials=7" in msg and "only 6 distinct configurations" in msg
    assert "--space-set search.num_trials=6" in msg and "widen the space" in msg
    check_trial_budget(load_space(tiny(6, **{"student": STUDENTS, "distill.feature_weight": {"choice": [0.0, 0.5]}})),
                       "s.yaml")


@pytest.mark.parametrize("space, n", [
    ({"student": STUDENTS}, 3),
    ({"distill.epochs": {"int": [2, 8], "step": 2}, "distill.feature_weight": {"choice": [0.0, 0.5, 0.5]}}, 8),
    ({"transfer_set.source": {"choice": ["target_unlabeled", "generic", "retrieval"]},  # conditions: 2 + 1 + 3
      "transfer_set.max_images": {"choice": [100, 200], "when": {"transfer_set.source": "target_unlabeled"}},
      "transfer_set.retrieval.budget": {"choice": [1, 2, 3], "when": {"transfer_set.source": ["retrieval"]}},
      "student": STUDENTS}, 18),
    ({"student": STUDENTS, "distill.temperature": {"loguniform": [1.0, 8.0]}}, float("inf")),
    ({"student": STUDENTS, "distill.temperature": {"uniform": [1.0, 8.0], "when": {"student": "a"}}}, float("inf")),
])
def test_distinct_configurations_of_a_space(space, n):
    assert load_space(tiny(1, **space)).distinct_configs() == n
