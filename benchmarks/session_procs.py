"""The processes of one process session (a `ray start --head --block` started with ``start_new_session``): what
the benchmarks that own a Ray cluster stop or kill, and nothing else on the machine."""
from __future__ import annotations

import os
from pathlib import Path


def session_pids(sid: int, title: str | None = None) -> list[int]:
    """PIDs of the processes in session ``sid`` (read from /proc), those whose command line contains ``title``
    when given."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getsid(int(d.name)) == sid and (
                    title is None or title in (d / "cmdline").read_bytes().decode(errors="replace")):
                out.append(int(d.name))
        except (OSError, ProcessLookupError):
            continue
    return out


def stop_session(p) -> None:
    """Stop the `ray start --head --block` process ``p`` (a ``subprocess.Popen`` started with
    ``start_new_session``) and everything in its session: SIGTERM (``--block`` stops the processes it started),
    then SIGKILL to what is left of the session (Ray workers have process groups of their own, so a ``killpg``
    alone would miss them) and to its process group."""
    import signal
    import subprocess

    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    for pid in session_pids(p.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()
