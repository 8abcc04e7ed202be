"""kt-orchestrator: Ray-distributed task-oriented knowledge transfer from vision foundation models.

Public API (heavy modules load on first use)::

    import orchestrator
    result = orchestrator.run("tasks/fashion_mnist.yaml", overrides=["distill.epochs=5"])
    sweep = orchestrator.sweep("search_spaces/quick.yaml", "tasks/fashion_mnist.yaml")
    version = orchestrator.register(sweep.sweep_dir)           # best trial -> MLflow Model Registry
    orchestrator.predict(version.uri, ["images/"], out="predictions.csv")
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.config import PipelineConfig
    from orchestrator.commands.run import RunResult

__all__ = ["run", "sweep", "compare", "rank_sources", "submit", "predict", "export", "register", "load_config",
           "PipelineConfig"]


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
    from orchestrator.commands.run import run as _run

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


def predict(model: str | Path, inputs: list[str | Path], out: str | Path | None = None, batch_size: int = 64,
            storage: str | Path = "kt_runs", tracking_uri: str | None = None):
    """Classify image files with a trained student (as ``kt predict``; see :func:`orchestrator.commands.predict.predict`).

    Args:
        model: a run or trial directory, ``models:/name/version`` or an ``.onnx`` file. inputs: files/folders.
        out: CSV path (path, class, probability), or None.
    Returns:
        PredictResult (``rows``, ``skipped`` unreadable files with reasons, ``out``).
    Raises:
        DeployError: no student there, an unknown model URI, an empty folder; InputShapeError: a foreign ONNX.
    """
    from orchestrator.commands.predict import predict as _predict

    return _predict(model, inputs, out, batch_size, storage, tracking_uri)


def export(source: str | Path, format: str = "onnx", out: str | Path | None = None, trial: str | None = None,
           storage: str | Path = "kt_runs") -> Path:
    """Export a trained student as onnx, torchscript or state_dict (as ``kt export``); returns the file.
    Raises DeployError (no student, unknown format, ONNX that does not match PyTorch)."""
    from orchestrator.commands.deploy import export as _export

    return _export(source, format, out, trial, storage)


def register(source: str | Path, trial: str | None = None, budget: float | None = None, name: str | None = None,
             storage: str | Path = "kt_runs", tracking_uri: str | None = None):
    """Register a trained student in the MLflow Model Registry with its lineage tags (as ``kt register``).

    Args:
        source: a sweep (name or dir), trial dir or run dir. trial / budget (student MFLOPs/img): which trial
        of a sweep (default: the best by validation top-1). name: the registered model [``<task>-student``].
    Returns:
        Registered (``name``, ``version``, ``uri`` = ``models:/name/version``, ``tags``).
    Raises:
        DeployError: no student there (failed, stopped or unfinished), an unknown trial, nothing within budget.
    """
    from orchestrator.commands.deploy import register as _register

    return _register(source, trial, budget, name, storage, tracking_uri)


def compare(task: str | Path, methods: list[str] | None = None, seeds: list[int] | None = None,
            overrides: list[str] | None = None, smoke: bool = False):
    """`kt compare`: every method in ``methods`` (default: those the task can run) x every seed in ``seeds``
    (default 0, 1, 2) on one task, tracked in MLflow; returns ``orchestrator.commands.compare.CompareResult`` (rows,
    per-method summary: test top-1 mean/std, transfer FLOPs and device-seconds). Raises ConfigError /
    UnknownNameError / ModelLoadError / DataError before any training."""
    from orchestrator.commands.compare import compare as _compare

    return _compare(task, methods, seeds, overrides, smoke)


def rank_sources(task, overrides: list[str] | None = None, smoke: bool = False, evaluate: bool = False,
                 distill: bool = False, metrics: list[str] | None = None):
    """`kt rank-sources` (paper 2): score every source of the task's zoo with every similarity metric; with
    ``evaluate`` also each source's actual transfer top-1 and each ranking's Kendall tau, Spearman rho and
    top-1 regret. Returns ``orchestrator.commands.rank_sources.RankResult``; see :func:`orchestrator.commands.rank_sources.rank_sources`."""
    from orchestrator.commands.rank_sources import rank_sources as _rank

    return _rank(task, overrides, smoke, evaluate, distill, metrics)


def __getattr__(name: str):
    if name == "PipelineConfig":
        from orchestrator.config import PipelineConfig

        return PipelineConfig
    raise AttributeError(name)
