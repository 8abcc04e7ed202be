"""Ray Jobs adapter: submit `kt run` / `kt sweep` to a cluster through the Jobs API and follow the job.

The job's driver runs on the cluster's head node with the project (or the user's task files) as its working
directory; it writes to the storage root and MLflow store configured for the cluster.
"""
from __future__ import annotations

import functools
import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
MAX_WORKING_DIR_BYTES = 500 * 1024**2  # Ray uploads working_dir through the GCS: its gRPC limit is 512 MiB
EXCLUDES = [".git", ".venv", "venv", "kt_runs", "mlruns", "*.db", "__pycache__", "*.egg-info", ".pytest_cache"]


class JobsError(RuntimeError):
    """A Jobs API problem users can fix (unreachable cluster, auth, runtime_env too large, failed job)."""


def default_address() -> str:
    """``$KT_JOBS_ADDRESS``, else ``$RAY_API_SERVER_ADDRESS``, else the local dashboard (``ray dashboard
    cluster.yaml`` forwards a remote cluster's to it)."""
    return os.environ.get("KT_JOBS_ADDRESS") or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS


def _auth_env() -> None:
    """Ray 2.60 clusters use token auth by default; the Jobs client only sends the token (from
    ``~/.ray/auth_token``, ``$RAY_AUTH_TOKEN`` or ``$RAY_AUTH_TOKEN_PATH``) when ``RAY_AUTH_MODE=token``."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or \
            (Path.home() / ".ray" / "auth_token").is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def client(address: str | None = None):
    """A JobSubmissionClient for ``address``. Raises JobsError when the cluster cannot be reached or refuses
    the token, with what to do."""
    from ray.job_submission import JobSubmissionClient

    explicit = address is not None
    address = address or default_address()
    _auth_env()
    # Ray lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS override the address passed in: an explicit --address
    # would then silently reach another cluster (the one a shell or a Ray Job exported). Explicit wins here.
    hidden = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if explicit and k in os.environ}
    try:
        return JobSubmissionClient(address)
    except ConnectionError as e:
        raise JobsError(f"cannot reach the Ray Jobs API at {address} ({e}). Start a cluster (`ray up cluster.yaml`"
                        " then `ray dashboard cluster.yaml` to forward it here, or `ray start --head` locally), or "
                        "pass --address http://HOST:8265") from None
    except Exception as e:  # AuthenticationError and friends: the class lives in a private module
        if "auth" in type(e).__name__.lower() or "token" in str(e).lower():
            raise JobsError(f"the cluster at {address} refused this client's token ({e}). Copy the head node's "
                            "~/.ray/auth_token to this machine (or set RAY_AUTH_TOKEN) and keep "
                            "RAY_AUTH_MODE=token") from None
        raise
    finally:
        os.environ.update(hidden)


def working_dir_size(root: Path, excludes: list[str]) -> int:
    """Bytes Ray would upload from ``root`` (files not matching ``excludes`` glob patterns, by any path part)."""
    import fnmatch

    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not any(fnmatch.fnmatch(d, p) for p in excludes)]
        for f in filenames:
            if not any(fnmatch.fnmatch(f, p) for p in excludes):
                try:
                    total += (Path(dirpath) / f).stat().st_size
                except OSError:
                    pass
    return total


def runtime_env(working_dir: Path, env: dict[str, str], pip: list[str] | None = None,
                excludes: list[str] | None = None) -> dict:
    """The job's runtime_env: ``working_dir`` (minus ``EXCLUDES`` + ``excludes``), env vars, extra pip packages.
    Raises JobsError when the upload would exceed Ray's limit."""
    ex = EXCLUDES + list(excludes or [])
    size = working_dir_size(working_dir, ex)
    if size > MAX_WORKING_DIR_BYTES:
        raise JobsError(f"runtime_env working_dir {working_dir} is {size / 1024**2:.0f} MiB, over Ray's "
                        f"{MAX_WORKING_DIR_BYTES / 1024**2:.0f} MiB upload limit: exclude data with --exclude PATTERN, "
                        "or put datasets and pools on the storage URI and point the task at them")
    out: dict = {"working_dir": str(working_dir), "excludes": ex, "env_vars": dict(env)}
    if pip:
        out["pip"] = list(pip)
    return out


@dataclass
class JobHandle:
    """A submitted job: ``status()``, ``logs()``, ``follow()``, ``wait()``, ``stop()``."""

    job_id: str
    address: str

    @functools.cached_property
    def _client(self):  # one connection per handle, not one per status poll
        return client(self.address)

    def status(self) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        return str(self._client.get_job_status(self.job_id).value)

    def info(self):
        """Ray's JobDetails (entrypoint, message, start/end times in ms)."""
        return self._client.get_job_info(self.job_id)

    def logs(self, tail: int | None = None) -> str:
        """The job driver's log (the last ``tail`` lines when given)."""
        text = self._client.get_job_logs(self.job_id)
        return "\n".join(text.splitlines()[-tail:]) if tail else text

    def follow(self, write=print) -> str:
        """Stream the log until the job ends; returns the final status."""
        import asyncio

        async def run():
            async for chunk in self._client.tail_job_logs(self.job_id):
                write(chunk.rstrip("\n"))

        asyncio.run(run())
        return self.wait(timeout=60)

    def wait(self, timeout: float | None = None, poll: float = 2.0) -> str:
        """Block until the job ends (or ``timeout`` seconds pass); returns the last status seen."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (s := self.status()) not in TERMINAL:
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(poll)
        return s

    def stop(self) -> bool:
        """Ask Ray to stop the job; True if it was still running."""
        return bool(self._client.stop_job(self.job_id))


def submit(command: list[str], address: str | None = None, working_dir: Path | None = None,
           env: dict[str, str] | None = None, pip: list[str] | None = None, excludes: list[str] | None = None,
           metadata: dict[str, str] | None = None) -> JobHandle:
    """Submit ``kt <command...>`` (e.g. ``["sweep", "search_spaces/quick.yaml", "--task", "tasks/x.yaml"]``) as a
    Ray job whose working directory is ``working_dir`` (default: the current directory). Returns its handle.
    Raises JobsError (unreachable cluster, token, runtime_env too large)."""
    address = address or default_address()
    wd = (working_dir or Path.cwd()).resolve()
    c = client(address)
    entrypoint = "python -m orchestrator.cli " + " ".join(shlex.quote(a) for a in command)
    job_id = c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(wd, env or {}, pip, excludes),
                          metadata={"kt.command": command[0] if command else "", **(metadata or {})},
                          entrypoint_num_cpus=0)
    log.info("submitted %s to %s: job %s", entrypoint, address, job_id)
    return JobHandle(job_id, address)


def list_jobs(address: str | None = None) -> list:
    """Every job the cluster knows (Ray JobDetails), newest first."""
    jobs = client(address).list_jobs()
    return sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)
