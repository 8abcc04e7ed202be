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


@app.command()
def sweep(space: Path = typer.Argument(..., help="search space YAML, e.g. search_spaces/quick.yaml"),
          task: Path = typer.Option(..., "--task", "-t", help="task YAML, e.g. tasks/fashion_mnist.yaml"),
          set: Optional[List[str]] = SetOpt, smoke: bool = SmokeOpt, storage: Optional[str] = StorageOpt,
          space_set: Optional[List[str]] = typer.Option(
              None, "--space-set", help="override a search-space value: --space-set search.num_trials=3"),
          name: Optional[str] = typer.Option(None, "--name", help="sweep name [<space name>-<task name>]"),
          resume: bool = typer.Option(False, "--resume", help="continue the sweep of this name after its driver "
                                      "was killed: finished trials are kept, unfinished and failed ones run again")
          ) -> None:
    """Sweep transfer-set source, loss weights and student architecture with Ray Tune + Optuna; one MLflow
    parent run per sweep, one child run per trial, a Pareto plot and a trials CSV."""
    _setup_logging()
    try:
        overrides = list(set or []) + ([f"storage={storage}"] if storage else [])
        from orchestrator.sweeps.driver import sweep as run_sweep

        result = run_sweep(space, task, overrides, list(space_set or []), smoke, name, resume)
    except _user_errors() as e:
        _fail(e)
    from orchestrator.report import print_sweep_result

    print_sweep_result(result)
    if result.metrics.get("trials_failed"):
        raise typer.Exit(1)


@app.command()
def report(sweep: str = typer.Argument(..., help="sweep name (under <storage>/sweeps) or its directory"),
           storage: str = typer.Option("kt_runs", "--storage", help="storage root the sweep ran with")) -> None:
    """Print a sweep's Pareto table and the best configuration per compute budget."""
    from orchestrator.report import print_sweep_dir

    d = Path(sweep) if Path(sweep, "sweep.json").is_file() else Path(storage) / "sweeps" / sweep
    if not (d / "sweep.json").is_file():
        _fail(FileNotFoundError(f"no sweep {sweep!r}: expected {d / 'sweep.json'}; pass a sweep name from "
                                f"{Path(storage) / 'sweeps'} or a sweep directory"))
    print_sweep_dir(d)


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
