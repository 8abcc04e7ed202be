"""kt-orchestrator: Ray-distributed task-oriented knowledge transfer from vision foundation models.

Public API (heavy modules load on first use)::

    import orchestrator
    result = orchestrator.run("tasks/fashion_mnist.yaml", overrides=["distill.epochs=5"])
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.config import PipelineConfig
    from orchestrator.pipeline import RunResult

__all__ = ["run", "load_config", "PipelineConfig"]


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


def __getattr__(name: str):
    if name == "PipelineConfig":
        from orchestrator.config import PipelineConfig

        return PipelineConfig
    raise AttributeError(name)
