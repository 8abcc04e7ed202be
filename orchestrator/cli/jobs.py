"""`kt submit / jobs / status / logs / stop`: runs and sweeps on a Ray cluster through the Ray Jobs API."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from orchestrator.cli.common import _fail, _setup_logging, app


AddressOpt = typer.Option(None, "--address", help="Ray Jobs API [$KT_JOBS_ADDRESS or http://127.0.0.1:8265]")


def _jobs_errors():
    from orchestrator.ray_adapters.jobs import JobsError

    return (JobsError,)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(ctx: typer.Context,
           kind: str = typer.Argument(..., help="run or sweep, followed by its arguments as for `kt run`/`kt sweep`"),
           address: Optional[str] = AddressOpt,
           working_dir: Path = typer.Option(Path("."), "--working-dir", help="uploaded as the job's working "
                                            "directory (task and space files, the project)"),
           env: Optional[List[str]] = typer.Option(None, "--env", help="KEY=VALUE for the job (repeatable)"),
           pip: Optional[List[str]] = typer.Option(None, "--pip", help="extra pip requirement for the job"),
           exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="glob left out of the upload"),
           follow: bool = typer.Option(False, "--follow", help="stream the job's log until it ends")) -> None:
    """Submit `kt run ...` or `kt sweep ...` to a Ray cluster through the Jobs API; prints the job id."""
    _setup_logging()
    if kind not in ("run", "sweep"):
        _fail(ValueError(f"kt submit takes run or sweep, not {kind!r}: kt submit sweep SPACE --task TASK"))
    envs = {}
    for item in env or []:
        k, sep, v = item.partition("=")
        if not sep:
            _fail(ValueError(f"--env {item!r} is not KEY=VALUE"))
        envs[k] = v
    try:
        from orchestrator.ray_adapters.jobs import submit as submit_job

        job = submit_job([kind, *ctx.args], address, working_dir, envs, list(pip or []), list(exclude or []))
    except _jobs_errors() as e:
        _fail(e)
    typer.echo(f"submitted job {job.job_id} to {job.address}")
    typer.echo(f"  follow it: kt logs {job.job_id} --follow    status: kt status {job.job_id}    "
               f"stop: kt stop {job.job_id}")
    if follow:
        _end(job, job.follow())


def _end(job, status: str) -> None:
    typer.echo(f"job {job.job_id}: {status}")
    if status != "SUCCEEDED":
        if status == "FAILED":
            typer.echo("last lines of its log:", err=True)
            typer.echo(job.logs(tail=30), err=True)
            msg = getattr(job.info(), "message", None)
            if msg:
                typer.echo(f"Ray: {msg.strip().splitlines()[-1]}", err=True)
        raise typer.Exit(1)


@app.command()
def jobs(address: Optional[str] = AddressOpt) -> None:
    """List the cluster's jobs, newest first."""
    from rich.console import Console
    from rich.table import Table

    try:
        from orchestrator.ray_adapters.jobs import list_jobs

        items = list_jobs(address)
    except _jobs_errors() as e:
        _fail(e)
    t = Table(title="Ray jobs")
    for col in ("job", "status", "started", "entrypoint"):
        t.add_column(col)
    import time as _t

    for j in items:
        started = _t.strftime("%Y-%m-%d %H:%M:%S", _t.localtime(j.start_time / 1000)) if j.start_time else "-"
        t.add_row(j.submission_id or j.job_id or "-", str(j.status.value), started, j.entrypoint)
    Console(width=None if sys.stdout.isatty() else 200).print(t)


@app.command()
def status(job: str = typer.Argument(..., help="job id (from kt submit / kt jobs)"),
           address: Optional[str] = AddressOpt) -> None:
    """Print a job's status (exit code 1 if it failed or was stopped)."""
    from orchestrator.ray_adapters.jobs import JobHandle

    try:
        h = JobHandle(job, address or _addr())
        s = h.status()
    except _jobs_errors() as e:
        _fail(e)
    typer.echo(s)
    if s in ("FAILED", "STOPPED"):
        raise typer.Exit(1)


@app.command()
def logs(job: str = typer.Argument(..., help="job id"), address: Optional[str] = AddressOpt,
         follow: bool = typer.Option(False, "--follow", "-f", help="stream until the job ends")) -> None:
    """Print a job's log (its driver's output); --follow streams it and exits with the job's outcome."""
    from orchestrator.ray_adapters.jobs import JobHandle

    try:
        h = JobHandle(job, address or _addr())
        if follow:
            _end(h, h.follow())
        else:
            typer.echo(h.logs())
    except _jobs_errors() as e:
        _fail(e)


@app.command()
def stop(job: str = typer.Argument(..., help="job id"), address: Optional[str] = AddressOpt) -> None:
    """Stop a running job."""
    from orchestrator.ray_adapters.jobs import JobHandle

    try:
        h = JobHandle(job, address or _addr())
        was = h.stop()
        final = h.wait(timeout=60)
    except _jobs_errors() as e:
        _fail(e)
    typer.echo(f"job {job}: {'stopped' if was else 'was not running'} ({final})")


def _addr() -> str:
    from orchestrator.ray_adapters.jobs import default_address

    return default_address()
