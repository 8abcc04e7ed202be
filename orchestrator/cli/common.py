"""What every `kt` command module shares: the Typer app, common options, logging set-up and user-error
handling. Heavy modules (torch, ray, mlflow) are imported inside commands only."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Task-oriented knowledge transfer from vision foundation models into small students.")

SetOpt = typer.Option(None, "--set", "-s", help="override a config value: --set distill.epochs=5 (repeatable)")
SmokeOpt = typer.Option(False, "--smoke", help="apply the task's smoke profile (small subset, tiny models)")
StorageOpt = typer.Option(None, "--storage", help="storage root for cache, runs and the MLflow store")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("alembic", "mlflow", "urllib3", "filelock", "timm", "matplotlib", "faiss"):  # faiss: CPU probing
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(task: Path, sets: list[str] | None, smoke: bool, storage: str | None):
    from orchestrator.config import load_config

    overrides = list(sets or [])
    if storage:
        overrides.append(f"storage={storage}")
    return load_config(task, overrides, smoke)


def _fail(e: Exception) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {e}", highlight=False)
    raise typer.Exit(2)


def _user_errors() -> tuple[type[Exception], ...]:
    from orchestrator.config import ConfigError
    from orchestrator.data.loaders import DataError
    from orchestrator.ids import ModelIdError
    from orchestrator.models.export import DeployError
    from orchestrator.models.onnx_student import InputShapeError
    from orchestrator.models.teachers import ModelLoadError
    from orchestrator.registry import UnknownNameError
    from orchestrator.stages.curate import EmptyTransferSetError
    from orchestrator.stages.index import IndexMismatchError

    from orchestrator.similarity.core import SimilarityError

    return (ConfigError, DataError, ModelIdError, ModelLoadError, UnknownNameError, EmptyTransferSetError,
            IndexMismatchError, DeployError, InputShapeError, SimilarityError)
