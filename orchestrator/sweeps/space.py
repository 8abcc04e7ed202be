"""Search spaces (``search_spaces/*.yaml``): validated, then sampled by Optuna define-by-run.

A space names config keys (dotted, as ``--set`` takes them) and how to draw each::

    space:
      transfer_set.source: {choice: [target_unlabeled, generic, retrieval]}
      transfer_set.retrieval.budget: {choice: [2000, 6000], when: {transfer_set.source: retrieval}}
      distill.temperature: {loguniform: [1.0, 8.0]}
      distill.epochs: {int: [3, 8]}
      student: {choice: {r10_narrow: {id: timm/resnet10t, model_kwargs: {...}}, mnv3: {id: ...}}}

``choice`` takes scalars, or a mapping of names to values (a whole section: Optuna sees the names). ``when``
makes a dimension conditional on earlier categorical ones. Transfer-set dimensions must be ``choice``: each
distinct transfer set is labeled by the teacher once, before the trials start.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from orchestrator.config import ConfigError, PipelineConfig, Strict, _explain, deep_merge, load_yaml, set_dotted

FIXED_PREFIXES = ("data", "labels", "standin", "teacher", "storage", "tracking", "smoke", "name")
# teacher keys a sweep may vary: each value's teacher is adapted once, before the trials start
TEACHER_DIMS = ("teacher.ensemble",)
# what the teacher outputs are of (cached views): each value's outputs are made once, before the trials start
OUTPUT_DIMS = ("distill.views", "distill.view_min_area", "distill.view_topk")


class Dim(Strict):
    """One dimension: exactly one of ``choice``, ``uniform``, ``loguniform``, ``int`` (inclusive bounds,
    ``log`` for a log scale, ``step``); ``when``: ``{earlier_key: value or [values]}`` to be active."""

    choice: list[Any] | dict[str, Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    int_: tuple[int, int] | None = Field(None, alias="int")
    log: bool = False
    step: int | None = Field(None, gt=0)
    when: dict[str, Any] | None = None

    model_config = {**Strict.model_config, "populate_by_name": True}

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("choice", "uniform", "loguniform", "int_") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of choice, uniform, loguniform, int "
                             f"(got {', '.join(g.rstrip('_') for g in given) or 'none'})")
        if self.choice is not None:
            if len(self.choice) == 0:
                raise ValueError("choice is empty")
            if isinstance(self.choice, list) and any(isinstance(v, (dict, list)) for v in self.choice):
                raise ValueError("choice values must be scalars; to choose between sections, name them: "
                                 "choice: {small: {...}, large: {...}}")
        for name in ("uniform", "loguniform", "int_"):
            lo_hi = getattr(self, name)
            if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
                raise ValueError(f"{name.rstrip('_')}: [low, high] needs low < high, got {list(lo_hi)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.loguniform[0]}")
        return self

    @property
    def categorical(self) -> bool:
        return self.choice is not None

    def names(self) -> list:
        """The categorical labels Optuna chooses between (mapping names, or the scalar values)."""
        return list(self.choice) if isinstance(self.choice, dict) else list(self.choice or [])

    def value(self, label: Any) -> Any:
        """The config value for a sampled label (a named section, or the label itself)."""
        return self.choice[label] if isinstance(self.choice, dict) else label

    def suggest(self, trial, key: str) -> Any:
        """Draw this dimension on an ``optuna.Trial`` (define-by-run); returns the label/number drawn."""
        if self.choice is not None:
            return trial.suggest_categorical(key, self.names())
        if self.uniform is not None:
            return trial.suggest_float(key, *self.uniform)
        if self.loguniform is not None:
            return trial.suggest_float(key, *self.loguniform, log=True)
        return trial.suggest_int(key, *self.int_, step=self.step or 1, log=self.log)

    def size(self) -> float:
        """How many distinct values Optuna can draw: the distinct choices, the integers in range (with
        ``step``), ``math.inf`` for a continuous dimension."""
        if self.choice is not None:
            return len(dict.fromkeys(self.names()))
        if self.int_ is not None:
            return (self.int_[1] - self.int_[0]) // (self.step or 1) + 1
        return math.inf

    def extremes(self) -> list:
        """Values to dry-run at validation: every choice, or both bounds."""
        if self.choice is not None:
            return self.names()
        return list(self.uniform or self.loguniform or self.int_)


class EarlyStopping(Strict):
    """ASHA (Li et al. 2020) on the per-epoch validation top-1; single-objective sweeps only."""

    enabled: bool = False
    grace_period: int = Field(2, gt=0, description="epochs every trial runs before it can be stopped")
    reduction_factor: int = Field(2, gt=1)


class Objective(Strict):
    """Maximise ``metric`` (validation top-1 after finetuning). With ``compute`` set the search is
    multi-objective (Optuna's NSGA-II): also minimise the student's forward FLOPs per image or its training
    device-seconds; otherwise single-objective (TPE)."""

    metric: Literal["val_top1"] = "val_top1"
    compute: Literal["student_flops", "device_seconds"] | None = None


class Search(Strict):
    """How many trials, how many at once, the sampler's seed; ``population_size``: NSGA-II's generation size
    (multi-objective only; the first generation is drawn at random); ``startup_trials``: TPE's random start
    (``num_trials`` makes a sweep's draws independent of its results, as the cache benchmark needs)."""

    num_trials: int = Field(8, gt=0)
    max_concurrent_trials: int = Field(1, gt=0)
    seed: int = 0
    population_size: int = Field(8, gt=1)
    startup_trials: int | None = Field(
        None, gt=0, description="TPE: random trials before it models the results [a third of num_trials, 2..10]")
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)


class Resources(Strict):
    """Per-trial resources. Each trial is a light driver (``trial_driver_cpus``) that runs one Ray Train
    distillation of ``workers_per_trial`` workers; the finetune and evaluation stages run in the driver."""

    workers_per_trial: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: Literal[0, 1] = Field(0, description="0: CPU workers; 1: one GPU per Train worker")
    trial_driver_cpus: float = Field(0.1, gt=0, description="Ray rejects 0; the driver mostly waits")
    max_failures: int = Field(1, ge=0, description="retries of a failed trial (same config) before it is failed")


class SearchSpace(Strict):
    """A sweep: what to search (``space``), what every trial shares (``fixed`` dotted overrides), the
    objective, the search algorithm's settings and per-trial resources."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    objective: Objective = Field(default_factory=Objective)
    search: Search = Field(default_factory=Search)
    resources: Resources = Field(default_factory=Resources)
    validation_per_class: int = Field(10, gt=0, description="held-out labeled images per class to select on")
    fixed: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Dim]

    @property
    def multi_objective(self) -> bool:
        return self.objective.compute is not None

    def transfer_set_keys(self) -> list[str]:
        """The dimensions the prepare step builds once per value, before the trials: the transfer-set keys, the
        teacher's (:data:`TEACHER_DIMS`; each distinct teacher labels each distinct transfer set) and the cached
        views' (:data:`OUTPUT_DIMS`)."""
        return [k for k in self.space if k.split(".")[0] == "transfer_set" or k in TEACHER_DIMS + OUTPUT_DIMS]

    def active(self, key: str, labels: dict[str, Any]) -> bool:
        """Whether ``key``'s ``when`` condition holds for the labels drawn so far."""
        for ref, want in (self.space[key].when or {}).items():
            allowed = want if isinstance(want, list) else [want]
            if ref not in labels or labels[ref] not in allowed:
                return False
        return True

    def suggest(self, trial) -> dict[str, Any]:
        """Optuna define-by-run: draw every active dimension in file order. Returns ``{key: label}``."""
        labels: dict[str, Any] = {}
        for key, dim in self.space.items():
            if self.active(key, labels):
                labels[key] = dim.suggest(trial, key)
        return labels

    def overrides(self, labels: dict[str, Any]) -> dict[str, Any]:
        """``fixed`` then the drawn labels as dotted config values (named sections expanded)."""
        out = dict(self.fixed)
        out.update({k: self.space[k].value(v) for k, v in labels.items() if k in self.space})
        return out

    def distinct_configs(self) -> float:
        """How many distinct label dicts :meth:`suggest` can draw (``when`` conditions applied), ``math.inf``
        with an active continuous dimension. Branches only on the labels a later condition refers to."""
        keys = list(self.space)
        referenced = [{r for k in keys[i:] for r in (self.space[k].when or {})} for i in range(len(keys) + 1)]

        @functools.lru_cache(maxsize=None)
        def count(i: int, state: tuple) -> float:
            if i == len(keys):
                return 1
            key, dim, labels = keys[i], self.space[keys[i]], dict(state)
            if not self.active(key, labels):
                return count(i + 1, state)
            if key not in referenced[i + 1]:
                return dim.size() * count(i + 1, state)
            keep = referenced[i + 1]
            return sum(count(i + 1, tuple(sorted((k, v) for k, v in {**labels, key: label}.items() if k in keep)))
                       for label in dict.fromkeys(dim.names()))

        return count(0, ())

    def transfer_set_variants(self) -> list[dict[str, Any]]:
        """Every combination of transfer-set (and teacher: :meth:`transfer_set_keys`) labels a trial can draw
        (``when`` conditions applied; a condition
        on a non-transfer-set key may hold or not, so both branches are kept). Deduplicated."""
        keys = self.transfer_set_keys()
        out: list[dict] = []

        def walk(i: int, labels: dict) -> None:
            if i == len(keys):
                if labels not in out:
                    out.append(dict(labels))
                return
            key = keys[i]
            refs = (self.space[key].when or {}).keys()
            if all(r in keys for r in refs) and not self.active(key, labels):
                walk(i + 1, labels)
                return
            if not all(r in keys for r in refs):
                walk(i + 1, labels)  # the outside condition may not hold
            for label in self.space[key].names():
                walk(i + 1, {**labels, key: label})

        walk(0, {})
        return out


def _members(ann: Any) -> list:
    """The types inside Optional/Union/Annotated annotations."""
    import typing

    args = typing.get_args(ann)
    if typing.get_origin(ann) is typing.Annotated:
        return _members(args[0])
    if args and typing.get_origin(ann) is not dict and typing.get_origin(ann) is not list:
        return [m for a in args for m in _members(a)]
    return [ann]


def _key_exists(model: type, parts: list[str]) -> bool:
    """Whether dotted ``parts`` name a field of pydantic ``model`` (free-form dicts accept any sub-key)."""
    import typing

    from pydantic import BaseModel

    field = model.model_fields.get(parts[0])
    if field is None:
        return False
    if len(parts) == 1:
        return True
    for a in _members(field.annotation):
        if isinstance(a, type) and issubclass(a, BaseModel) and _key_exists(a, parts[1:]):
            return True
        if a is dict or typing.get_origin(a) is dict:
            return True
    return False


def validate_keys(space: SearchSpace, source: str) -> None:
    """Check every dotted key names a config field, conditions refer to earlier categorical dimensions,
    transfer-set dimensions are categorical and the sweep does not vary what trials share. Raises ConfigError."""
    errors = []
    keys = list(space.space)
    for where, key in [("fixed", k) for k in space.fixed] + [("space", k) for k in keys]:
        if not _key_exists(PipelineConfig, key.split(".")):
            errors.append(f"{where}.{key}: not a config key (see tasks/fashion_mnist.yaml for the sections)")
    for i, key in enumerate(keys):
        dim = space.space[key]
        if key.split(".")[0] in FIXED_PREFIXES and key not in TEACHER_DIMS:
            errors.append(f"space.{key}: every trial of a sweep shares the data, labels and teacher adaptation; "
                          f"move it to `fixed`, or run one sweep per value (of the teacher, a sweep may vary "
                          f"{', '.join(TEACHER_DIMS)})")
        if key in space.transfer_set_keys() and not dim.categorical:
            errors.append(f"space.{key}: transfer-set, teacher and view dimensions must be `choice` (each "
                          "distinct teacher is adapted, and labels each distinct transfer set and its views, "
                          "once, before the trials)")
        for ref, want in (dim.when or {}).items():
            if ref not in keys[:i]:
                errors.append(f"space.{key}.when: {ref!r} is not an earlier dimension of the space")
            elif not space.space[ref].categorical:
                errors.append(f"space.{key}.when: {ref!r} is not a `choice` dimension")
            else:
                bad = [w for w in (want if isinstance(want, list) else [want]) if w not in space.space[ref].names()]
                if bad:
                    errors.append(f"space.{key}.when: {bad} not among {ref}'s choices {space.space[ref].names()}")
    if space.multi_objective and space.search.early_stopping.enabled:
        errors.append("search.early_stopping: not supported with objective.compute (NSGA-II would count stopped "
                      "trials as finished); disable early stopping or drop objective.compute")
    if errors:
        raise ConfigError(f"invalid search space {source}:\n  " + "\n  ".join(errors))


def check_trial_budget(space: SearchSpace, source: str) -> None:
    """A sweep runs ``search.num_trials`` distinct configurations: raise ConfigError, before anything runs,
    when the space holds fewer."""
    n = space.distinct_configs()
    if space.search.num_trials > n:
        raise ConfigError(
            f"search space {source}: search.num_trials={space.search.num_trials}, but the space holds only {n:g} "
            f"distinct configuration{'s' if n != 1 else ''}, and no trial repeats another's; lower "
            f"search.num_trials (--space-set search.num_trials={n:g}) or widen the space (more choices, wider "
            "int ranges, or a uniform/loguniform dimension)")


def trial_configs(space: SearchSpace, base: dict) -> list[tuple[str, dict]]:
    """Dry-run configs for validation: for each dimension and each of its choices (or bounds), the base
    task with ``fixed``, that value, and the conditions it needs. Returns (what, tree) pairs."""
    out = []
    for key, dim in space.space.items():
        for value in dim.extremes():
            labels = {key: value}
            for ref, want in (dim.when or {}).items():
                labels[ref] = want[0] if isinstance(want, list) else want
            out.append((f"space.{key}={value!r}", apply_overrides(base, space.overrides(labels))))
    return out or [("fixed", apply_overrides(base, space.fixed))]


def apply_overrides(base: dict, overrides: dict[str, Any]) -> dict:
    """A deep copy of ``base`` with dotted ``overrides`` set (values of any type, sections included)."""
    import copy

    tree = copy.deepcopy(base)
    for k, v in overrides.items():
        set_dotted(tree, k, v)
    return tree


def check_values(space: SearchSpace, base: dict, source: str) -> None:
    """Validate every dry-run config (pydantic, then the pipeline's preflight: model ids, sources, dataset).
    Raises ConfigError naming the dimension and value that fail."""
    from orchestrator.methods.preflight import preflight

    errors = []
    for what, tree in trial_configs(space, base):
        try:
            preflight(PipelineConfig.model_validate(tree))
        except ValidationError as e:
            errors.append(f"{what}: {str(_explain(e, '')).split(':', 1)[1].strip()}")
        except Exception as e:  # ModelLoadError, UnknownNameError, DataError: all name the problem
            errors.append(f"{what}: {e}")
    if errors:
        raise ConfigError(f"invalid search space {source}:\n  " + "\n  ".join(errors))


def load_space(path: str | Path | dict, overrides: list[str] | None = None) -> SearchSpace:
    """Load and validate a search-space YAML (or dict); ``overrides`` are ``key=value`` strings on the space
    file itself (e.g. ``search.num_trials=3``). Raises ConfigError naming the bad key."""
    from orchestrator.config import parse_overrides

    tree = load_yaml(path) if not isinstance(path, dict) else dict(path)
    source = str(path) if not isinstance(path, dict) else "(python dict)"
    if not isinstance(tree, dict):
        raise ConfigError(f"search space {source} must be a YAML mapping")
    for k, v in parse_overrides(overrides or []):
        set_dotted(tree, k, v)
    try:
        space = SearchSpace.model_validate(tree)
    except ValidationError as e:
        raise _explain(e, source) from None
    validate_keys(space, source)
    return space


def base_tree(task_tree: dict, space: SearchSpace) -> dict:
    """The task config every trial starts from: the task, a held-out validation subset, no per-trial baseline,
    Ray Train workers and devices from ``resources``, then ``fixed``."""
    r = space.resources
    tree = deep_merge(task_tree, {"labels": {"val_per_class": space.validation_per_class},
                                  "baseline": {"enabled": False},
                                  "distill": {"num_workers": r.workers_per_trial, "use_gpu": r.gpus_per_worker > 0}})
    return apply_overrides(tree, space.fixed)


def describe(labels: dict[str, Any]) -> str:
    """``a=1, b=x`` for logs."""
    return ", ".join(f"{k}={v}" for k, v in labels.items())


__all__ = ["Dim", "SearchSpace", "load_space", "check_values", "check_trial_budget", "base_tree", "describe"]
