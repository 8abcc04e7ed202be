"""The stage graph: keys derive from declared inputs, upstream keys included."""
import pytest

from orchestrator.config import PipelineConfig, resolve_config
from orchestrator.graph import STAGES, run_stage, stage_key
from orchestrator.run_context import Ctx


def topo() -> list[str]:
    done: list[str] = []

    def visit(n):
        if n not in done:
            for u in STAGES[n].upstream:
                visit(u)
            done.append(n)

    for n in STAGES:
        visit(n)
    return done


def all_keys(cfg: PipelineConfig) -> dict[str, str]:
    """Every stage's key under ``cfg``, with fixed content hashes (data and transfer images unchanged)."""
    keys: dict[str, str] = {}
    for n in topo():
        keys[n] = stage_key(n, cfg, keys, {"images": "same"} if n in ("data", "transfer_set") else None)
    return keys


def downstream(names: set[str]) -> set[str]:
    out = set(names)
    changed = True
    while changed:
        changed = False
        for n, s in STAGES.items():
            if n not in out and out & set(s.upstream):
                out.add(n)
                changed = True
    return out


def cfg(**overrides) -> PipelineConfig:
    return resolve_config({"name": "t"}, [f"{k}={v}" for k, v in overrides.items()])


def test_identical_configs_share_every_key():
    assert all_keys(cfg()) == all_keys(cfg())


@pytest.mark.parametrize("override, roots", [
    ({"teacher.id": "pypi/efficientnet_lite2"}, {"teacher"}),
    ({"teacher.adapt": "finetune"}, {"adapted_teacher"}),
    ({"teacher.probe_lr": 0.05}, {"adapted_teacher"}),
    ({"distill.temperature": 2.0}, {"distill", "feature_distill"}),
    ({"finetune.lr": 0.01}, {"finetune"}),
    ({"ssl.finetune.epochs": 3}, {"ssl_finetune"}),
    ({"task_agnostic.loss": "infonce"}, {"feature_distill"}),
])
def test_a_change_moves_exactly_the_stages_downstream_of_it(override, roots):
    base, changed = all_keys(cfg()), all_keys(cfg(**override))
    moved = {n for n in base if base[n] != changed[n]}
    assert moved == downstream(roots), (override, sorted(moved))


def test_the_seed_reaches_the_adapted_teacher_and_every_student_stage_but_not_the_inputs():
    base, changed = all_keys(cfg()), all_keys(cfg(seed=1))
    moved = {n for n in base if base[n] != changed[n]}
    assert {"adapted_teacher", "teacher_outputs", "distill", "finetune", "baseline", "ssl_pretrain"} <= moved
    assert not moved & {"data", "teacher", "transfer_set", "frozen_teacher", "teacher_features"}
    # kt compare pins the adaptation's seed: the student's seed then leaves the teacher and its outputs alone
    pinned = all_keys(cfg(seed=1, **{"teacher.seed": 0}))
    assert pinned["adapted_teacher"] == all_keys(cfg(**{"teacher.seed": 0}))["adapted_teacher"]
    assert pinned["distill"] != all_keys(cfg(**{"teacher.seed": 0}))["distill"]


def test_online_distillation_depends_on_the_adapted_teacher():
    """The stale result of issue 11: with online teacher outputs, two adaptations gave one student."""
    lp = all_keys(cfg(**{"distill.teacher_outputs": "online", "teacher.adapt": "linear_probe"}))
    ft = all_keys(cfg(**{"distill.teacher_outputs": "online", "teacher.adapt": "finetune"}))
    assert lp["distill"] != ft["distill"] and lp["transfer_set"] == ft["transfer_set"]


def test_inference_settings_do_not_change_the_adapted_teacher():
    base, changed = all_keys(cfg()), all_keys(cfg(**{"teacher.inference_batch_size": 64,
                                                      "teacher.inference_actors": 1}))
    assert base == changed


def test_a_stage_whose_upstream_has_not_run_is_an_error():
    with pytest.raises(KeyError, match="needs the key of adapted_teacher"):
        stage_key("teacher_outputs", cfg(), {"transfer_set": "x" * 16})


class _Tracker:
    def __init__(self):
        self.logged = []

    def metrics(self, m, step=None):
        self.logged.append(m)


def test_run_stage_caches_writes_atomically_and_records(tmp_path):
    from orchestrator.cache import Cache

    c = cfg()
    ctx = Ctx(c, Cache(tmp_path), _Tracker(), tmp_path, "cpu", nested_stages=False,
              keys={"teacher": "t" * 16, "data": "d" * 16})
    calls = []

    def body(tmp, compute):
        calls.append(tmp)
        (tmp / "teacher.pt").write_bytes(b"x")
        compute.images = 7
        return {"note": 1}

    first = run_stage(ctx, "adapted_teacher", body, after=lambda r: {"top1": 0.5})
    again = run_stage(ctx, "adapted_teacher", body)
    assert len(calls) == 1 and not first.hit and again.hit and first.key == again.key == ctx.keys["adapted_teacher"]
    assert (first.entry / "teacher.pt").read_bytes() == b"x" and again.compute.images == 7
    assert ctx.stages["adapted_teacher"]["cache_hit"] == 1.0 and ctx.metrics["adapted_teacher.images"] == 7

    def failing(tmp, compute):
        (tmp / "part").write_text("half")
        raise RuntimeError("killed")

    ctx.keys["data"] = "e" * 16
    with pytest.raises(RuntimeError):
        run_stage(ctx, "adapted_teacher", failing)
    assert ctx.cache.lookup("adapted_teacher", ctx.keys["adapted_teacher"]) is None
