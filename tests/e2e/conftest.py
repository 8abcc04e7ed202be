import subprocess
import sys

import pytest

from tests.conftest import ROOT, TASK, run_kt  # noqa: F401 (run_kt: re-exported for the e2e tests)


@pytest.fixture(autouse=True)
def _join_the_session_ray(ray_cluster):
    """Every `kt` subprocess here joins the session's Ray (tests.conftest.ray_cluster) unless it asks for its own."""
    return ray_cluster


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory):
    """Two `kt run TASK --smoke` started at the same instant on one storage, each with a local Ray of its own
    (beside the session's: three Rays on this machine), as two users of one machine run them. Returns (storage
    directory, [CompletedProcess, CompletedProcess])."""
    import os

    storage = tmp_path_factory.mktemp("kt_smoke")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = [sys.executable, "-m", "orchestrator.cli", "run", str(TASK), "--smoke", "--storage", str(storage)]
    procs = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    return storage, [subprocess.CompletedProcess(args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


@pytest.fixture(scope="session")
def smoke_run(smoke_runs):
    """The first of :func:`smoke_runs`, for the tests that read a finished run (test_cli, test_deploy_cli).
    Returns (storage directory, CompletedProcess)."""
    storage, (first, _) = smoke_runs
    return storage, first
