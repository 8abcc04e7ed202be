"""`kt`: the command line. Heavy modules (torch, ray, mlflow) are imported inside commands only."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Task-oriented knowledge transfer from vision foundation models into small students.")

SetOpt = typer.Option(None, "--set", "-s", help="override a config value: --set distill.epochs=5 (repeatable)")
SmokeOpt = typer.Option(False, "--smoke", help="apply the task's smoke profile (small subset, tiny models)")
StorageOpt = typer.Option(None, "--storage", help="storage root for cache, runs and the MLflow store")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("alembic", "mlflow", "urllib3", "filelock", "timm", "matplotlib"):
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
    from orchestrator.models.teachers import ModelLoadError
    from orchestrator.registry import UnknownNameError
    from orchestrator.stages.curate import EmptyTransferSetError
    from orchestrator.stages.index import IndexMismatchError

    return (ConfigError, DataError, ModelIdError, ModelLoadError, UnknownNameError, EmptyTransferSetError,
            IndexMismatchError)


@app.command()
def run(task: Path = typer.Argument(..., help="task YAML, e.g. tasks/fashion_mnist.yaml"),
        set: Optional[List[str]] = SetOpt, smoke: bool = SmokeOpt, storage: Optional[str] = StorageOpt) -> None:
    """Run the whole pipeline: adapt teacher, teacher inference, distill, finetune, evaluate, baseline."""
    _setup_logging()
    try:
        cfg = _load(task, set, smoke, storage)
        from orchestrator.pipeline import run as run_pipeline

        result = run_pipeline(cfg)
    except _user_errors() as e:
        _fail(e)
    from orchestrator.report import print_run

    print_run(result)


@app.command("pretrain-teacher")
def pretrain_teacher(task: Path = typer.Argument(..., help="task YAML whose `standin` section to build"),
                     set: Optional[List[str]] = SetOpt, smoke: bool = SmokeOpt,
                     storage: Optional[str] = StorageOpt) -> None:
    """Build the local stand-in teacher (SimCLR on the task's unlabeled images, no labels); cached."""
    _setup_logging()
    try:
        cfg = _load(task, set, smoke, storage)
        import torch

        from orchestrator.cache import Cache
        from orchestrator.pipeline import load_data
        from orchestrator.standin import ensure_standin

        data, split, _ = load_data(cfg)
        info = ensure_standin(cfg, data, split, Cache(cfg.storage_path()),
                              "cuda" if torch.cuda.is_available() else "cpu")
    except _user_errors() as e:
        _fail(e)
    typer.echo(f"{info.meta['provenance']}")
    typer.echo(f"checkpoint: {info.checkpoint}  ({'cached' if info.cache_hit else 'built'})")
    typer.echo(f"linear-probe top-1 (probe on {len(split.labeled)} labeled images, test split): "
               f"{info.meta['linear_probe_top1']:.4f}")
    typer.echo(f"use it as teacher id: checkpoint/{info.checkpoint}")


@app.command("make-demo-pool")
def make_demo_pool(task: Path = typer.Argument(..., help="task YAML whose unlabeled remainder seeds the pool"),
                   out: Optional[Path] = typer.Option(None, "--out", help="pool dir [<storage>/pools/<task>_demo]"),
                   set: Optional[List[str]] = SetOpt, storage: Optional[str] = StorageOpt) -> None:
    """Build the offline demo image pool (webdataset shards): the unlabeled remainder mixed with at least as
    many real images of other domains (glyphs, icons, photo patches, digits); a no-op if already built."""
    _setup_logging()
    try:
        cfg = _load(task, set, False, storage)
        from orchestrator.demo_pool import build_demo_pool
        from orchestrator.pipeline import load_data

        data, split, _ = load_data(cfg)
        out = out or cfg.storage_path() / "pools" / f"{cfg.name}_demo"
        info = build_demo_pool(out, data.train.images[split.unlabeled], seed=cfg.seed)
    except _user_errors() as e:
        _fail(e)
    for domain, n in info["counts"].items():
        typer.echo(f"{domain:>14}: {n:>7,}")
    typer.echo(f"{'total':>14}: {info['total']:>7,} in {len(info['shards'])} shards")
    typer.echo(f"pool: {out}")


if __name__ == "__main__":
    app()
