"""The stage graph: every stage declares what its output depends on, and its key is derived here, in one place.

A :class:`Stage` names the config paths it reads (``"teacher"``, ``"distill.temperature"``, ``"seed"``), the
upstream stages it consumes, and its cache kind. :func:`stage_key` hashes exactly those, with the keys of the
upstream stages (which already hash theirs), so changing the teacher, its adaptation or the seed changes the key
of every stage downstream of it and of none upstream; no call site lists fields by hand.

:func:`run_stage` is the one wrapper around a stage's body: cache lookup, atomic write, compute metering and
the MLflow record. ``kt run``, a sweep's prepare step, a sweep trial and ``kt compare`` all go through it, so
they run slices of the same graph and share every output whose inputs agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from orchestrator.config import PipelineConfig, config_hash
from orchestrator.progress import stage_progress
from orchestrator.stages.compute import Meter, StageCompute


@dataclass(frozen=True)
class Stage:
    """A node of the graph.

    Attributes:
        name: the stage's name (its key in :data:`STAGES` and in ``Ctx.keys``).
        config: dotted config paths the output depends on (a section, a field, or ``"seed"``).
        upstream: names of the stages whose outputs it consumes; their keys enter this key.
        kind: the cache kind its output is stored under, or None (not cached: Ray Train runs, in-process
            training and evaluation, which still get a key: the Ray Train run name, lineage).
        exclude: dotted paths under ``config`` that do not change the output (batch sizes of inference, actors).
        derive: extra inputs computed from the config (e.g. the adaptation's effective seed).
    """

    name: str
    config: tuple[str, ...] = ()
    upstream: tuple[str, ...] = ()
    kind: str | None = None
    exclude: tuple[str, ...] = ()
    derive: Callable[[PipelineConfig], dict] | None = None


def _teacher_seed(cfg: PipelineConfig) -> dict:
    # "augment": the LP-FT finetune augments with the task's policy (data.augment; before: shift only)
    return {"seed": cfg.seed if cfg.teacher.seed is None else cfg.teacher.seed, "augment": "task-policy"}


_INFERENCE = ("teacher.inference_batch_size", "teacher.inference_actors", "teacher.inference_gpus", "teacher.seed",
              "teacher.inference", "teacher.inference_in_process_max_tflops")  # how it runs, not what it computes
_READ = ("data.in_memory_max_mb", "data.ingest")  # how the images are read, not which
_VIEWS = ("distill.views", "distill.view_min_area", "distill.view_topk")  # what the cached soft labels are of
# Fields added after keys were published: at these values a field is left out of every key, so an entry cached
# before it existed keeps its key (tests/unit/test_key_stability.py); any other value enters the key.
ADDED_AT_DEFAULT: dict[str, Any] = {"teacher.ensemble": [], "distill.views": 0,
                                    "distill.view_min_area": None, "distill.view_topk": None}
STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("data", ("data", "labels"), (), None, _READ),
    Stage("teacher", ("teacher.id", "teacher.model_kwargs")),
    Stage("adapted_teacher", ("teacher",), ("teacher", "data"), "adapted_teacher", _INFERENCE, _teacher_seed),
    Stage("transfer_set", ("transfer_set",), ("data",), None, ("transfer_set.pool.in_memory_max_mb",
                                                                "transfer_set.pool.ingest")),  # content: the images (pool sources: their manifest)
    Stage("teacher_outputs", ("distill.teacher_outputs", *_VIEWS), ("adapted_teacher", "transfer_set"),
          "teacher_outputs"),
    Stage("distill", ("student", "distill", "seed"), ("data", "adapted_teacher", "teacher_outputs"), None,
          ("distill.execution",)),  # in process or on a worker group of one: the same steps
    Stage("finetune", ("finetune", "seed"), ("distill",)),
    Stage("baseline", ("student", "baseline", "seed"), ("data",)),
    # paper 1's baselines (Vemulapalli et al. 2024, Sec. 4)
    Stage("frozen_teacher", (), ("teacher", "data"), "frozen_teacher"),
    Stage("teacher_features", (), ("frozen_teacher", "transfer_set"), "teacher_outputs"),
    Stage("feature_distill", ("student", "distill", "task_agnostic", "seed"), ("data", "teacher_features"), None,
          ("task_agnostic.finetune",)),
    Stage("ssl_pretrain", ("student", "ssl", "seed"), ("data", "transfer_set"), "ssl_student", ("ssl.finetune",)),
    Stage("ta_finetune", ("task_agnostic.finetune", "seed"), ("feature_distill",)),
    Stage("ssl_finetune", ("ssl.finetune", "seed"), ("ssl_pretrain",)),
    Stage("pretrained_student", ("pretrained_init.id", "pretrained_init.model_kwargs", "seed"), ("data",)),
    Stage("pretrained_finetune", ("pretrained_init.finetune", "seed"), ("pretrained_student",)),
    # paper 2 (Borup et al., ICCV 2023): per-source stages get the source (id, kwargs, file) as content
    Stage("source_model", (), (), "source_model"),
    Stage("source_signals", ("sources.probe_c", "data"), ("data", "transfer_set"), "source_signals", _READ),  # + test
    Stage("source_score", (), (), "source_score"),  # content: the signals entry's key and the metric
    Stage("multi_distill", ("student", "sources.distill", "sources.kd_weight", "sources.feature_weight",
                            "sources.ce_weight", "sources.temperature", "seed"), ("data", "transfer_set"), None,
          ("sources.distill.execution",)),
    Stage("multi_finetune", ("sources.finetune", "seed"), ("multi_distill",)),
    Stage("fixmatch", ("student", "fixmatch", "seed"), ("data",)),
]}


def _get(tree: dict, path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _drop(tree: Any, path: str) -> None:
    parts = path.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(parts[-1], None)


def stage_inputs(stage: Stage | str, cfg: PipelineConfig, keys: dict[str, str],
                 content: dict | None = None) -> dict:
    """What ``stage``'s key hashes: its declared config values (minus ``exclude``), derived inputs, the keys
    of its upstream stages and ``content`` (hashes of data the config does not determine: the task images,
    a transfer set's images). Raises KeyError naming an upstream stage that has not run (no key yet)."""
    stage = STAGES[stage] if isinstance(stage, str) else stage
    missing = [u for u in stage.upstream if u not in keys]
    if missing:
        raise KeyError(f"stage {stage.name!r} needs the key of {', '.join(missing)}, which has not run")
    tree = {"seed": cfg.seed, **cfg.model_dump(mode="json")}
    values = {p: _get(tree, p) for p in stage.config}
    for path in stage.exclude:
        for declared in values:
            if path.startswith(declared + "."):
                _drop(values[declared], path[len(declared) + 1:])
    for path, default in ADDED_AT_DEFAULT.items():
        if _get(tree, path) != default:
            continue
        if path in values:
            del values[path]
        for declared in values:
            if path.startswith(declared + "."):
                _drop(values[declared], path[len(declared) + 1:])
    return {"stage": stage.name, "config": values, "derived": stage.derive(cfg) if stage.derive else {},
            "upstream": {u: keys[u] for u in stage.upstream}, "content": content or {}}


def stage_key(stage: Stage | str, cfg: PipelineConfig, keys: dict[str, str], content: dict | None = None) -> str:
    """The 16-hex-digit key of ``stage`` under ``cfg`` given the upstream ``keys`` (see :func:`stage_inputs`)."""
    return config_hash(stage_inputs(stage, cfg, keys, content))


@dataclass
class StageRun:
    """One execution of a stage: its key, its cache entry (None when not cached), whether the entry was
    reused, the compute that produced it (the recorded one on a hit) and what the body returned."""

    key: str
    entry: Path | None
    hit: bool
    compute: StageCompute
    value: Any = None
    extra: dict = field(default_factory=dict)


def run_stage(ctx, name: str, body: Callable[[Path | None, StageCompute], Any] | None = None, *,
              content: dict | None = None, record_as: str | None = None, devices: int = 1,
              after: Callable[[StageRun], dict] | None = None, record: bool = True,
              measured: StageCompute | None = None, hit: bool | None = None) -> StageRun:
    """Run stage ``name`` for the run context ``ctx`` (an :class:`orchestrator.run_context.Ctx`).

    The key comes from :func:`stage_key` and is stored in ``ctx.keys[name]``. For a cached stage, a complete
    entry is reused (one that another run of this node is building is waited for: :meth:`Cache.claim`);
    otherwise ``body(tmp_dir, compute)`` writes the entry's files into ``tmp_dir`` (renamed into place only when
    it returns) and may return a dict for the entry's metadata. For an uncached stage ``body(None, compute)``
    returns the stage's value. ``compute`` is metered (wall and CPU seconds, devices); the body adds images and
    FLOPs; a body that runs is shown while it runs (:func:`orchestrator.progress.stage_progress`). ``after(run)``
    may return extra numbers to record (e.g. an evaluation); the record (nested MLflow run, ``ctx.stages``) is
    named ``record_as`` (default ``name``). ``measured``: the compute of work done before the call (an uncached
    stage with no body, e.g. loading the data); ``hit``: the cache hit to record when the body's own cache
    decided it (the stand-in).

    Raises whatever the body raises; the cache then holds no partial entry.
    """
    stage = STAGES[name]
    key = stage_key(stage, ctx.cfg, ctx.keys, content)
    ctx.keys[name] = key
    if stage.kind is None and measured is not None:
        run = StageRun(key, None, bool(hit), measured)
    elif stage.kind is None:
        with stage_progress(record_as or name), Meter(devices=devices) as m:
            value = body(None, m.result) if body else None
        run = StageRun(key, None, bool(hit), m.result, value)
    else:
        from orchestrator.run_context import cached_compute

        value = None
        with ctx.cache.claim(stage.kind, key) as hit:  # two runs of a node needing it: one builds, one reuses
            if hit is None:
                meta: dict = {"stage": name, "inputs": stage_inputs(stage, ctx.cfg, ctx.keys, content)}
                with ctx.cache.write(stage.kind, key, meta) as tmp:
                    with stage_progress(record_as or name), Meter(devices=devices) as m:
                        value = body(tmp, m.result)
                    if isinstance(value, dict):
                        meta.update(value)
                    meta["compute"] = m.result.to_dict()
        entry = ctx.cache.path(stage.kind, key)
        run = StageRun(key, entry, hit is not None, cached_compute(entry), value)
    run.extra = after(run) if after else {}
    if record:
        cache_hit = run.hit if stage.kind or hit is not None else None
        ctx.record(record_as or name, run.compute, cache_hit, **run.extra)
    return run
