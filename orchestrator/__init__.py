"""kt-orchestrator: Ray-distributed task-oriented knowledge transfer from vision foundation models.

Public API (heavy modules load on first use)::

    import orchestrator
    result = orchestrator.run("tasks/fashion_mnist.yaml", overrides=["distill.epochs=5"])
    sweep = orchestrator.sweep("search_spaces/quick.yaml", "tasks/fashion_mnist.yaml")
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.config import PipelineConfig
    from orchestrator.pipeline import RunResult

__all__ = ["run", "sweep", "submit", "load_config", "PipelineConfig"]


def load_config(path: str | Path, overrides: list[str] | None = None, smoke: bool = False) -> "PipelineConfig":
    """Load and validate a task YAML (see :func:`orchestrator.config.load_config`)."""
    from orchestrator.config import load_config as _load

    return _load(path, overrides, smoke)


def run(config: "str | Path | dict[str, Any] | PipelineConfig", overrides: list[str] | None = None,
        smoke: bool = False) -> "RunResult":
    """Run the knowledge-transfer pipeline: the same config funnel as ``kt run``.

    Args:
        config: a task YAML path, a config dict, or a PipelineConfig.
        overrides: ``key=value`` strings (as ``--set``). smoke: apply the config's ``smoke`` profile.
    Returns:
        RunResult (MLflow run id, result table, metrics).
    """
    from orchestrator.config import load_config as _load
    from orchestrator.config import resolve_config
    from orchestrator.pipeline import run as _run

    if isinstance(config, (str, Path)):
        cfg = _load(config, overrides, smoke)
    else:
        cfg = resolve_config(config, overrides, smoke, source="(python dict)")
    return _run(cfg)


def sweep(space: "str | Path | dict[str, Any]", task: "str | Path | dict[str, Any]",
          overrides: list[str] | None = None, space_overrides: list[str] | None = None, smoke: bool = False,
          name: str | None = None, resume: bool = False):
    """Run a sweep: the same funnel as ``kt sweep`` (see :func:`orchestrator.sweeps.driver.sweep`).

    Args:
        space: a search-space YAML path or dict. task: a task YAML path or dict.
        overrides: ``key=value`` on the task (as ``--set``); space_overrides: on the space (``--space-set``).
        name: the sweep's name; resume: continue the sweep of that name.
    Returns:
        SweepResult (sweep dir, MLflow parent run id, one row per trial, summary metrics).
    Raises:
        ConfigError for a bad space or task (naming the key), or a name clash without ``resume``.
    """
    from orchestrator.sweeps.driver import sweep as _sweep

    return _sweep(space, task, overrides, space_overrides, smoke, name, resume)


def submit(command: list[str], address: str | None = None, working_dir: str | Path | None = None,
           env: dict[str, str] | None = None, pip: list[str] | None = None, excludes: list[str] | None = None):
    """Submit ``kt <command>`` to a Ray cluster through the Jobs API (as ``kt submit``).

    Args:
        command: e.g. ``["sweep", "search_spaces/quick.yaml", "--task", "tasks/fashion_mnist.yaml"]``.
        address: the Jobs API (default ``$KT_JOBS_ADDRESS`` or http://127.0.0.1:8265).
        working_dir: uploaded as the job's working directory (default: the current directory).
        env: environment variables for the job; pip: extra requirements; excludes: globs left out of the upload.
    Returns:
        JobHandle with ``status()``, ``logs()``, ``follow()``, ``wait()``, ``stop()``.
    Raises:
        JobsError: unreachable cluster, refused token, working directory over Ray's upload limit.
    """
    from orchestrator.ray_adapters.jobs import submit as _submit

    return _submit(list(command), address, Path(working_dir) if working_dir else None, env, pip, excludes)


def __getattr__(name: str):
    if name == "PipelineConfig":
        from orchestrator.config import PipelineConfig

        return PipelineConfig
    raise AttributeError(name)
