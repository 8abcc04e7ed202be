import subprocess
import sys

import pytest

from tests.conftest import ROOT, TASK, run_kt  # noqa: F401 (run_kt: re-exported for the e2e tests)


@pytest.fixture(autouse=True)
def _join_the_session_ray(ray_cluster):
    """Every `kt` subprocess here joins the session's Ray (tests.conftest.ray_cluster) unless it asks for its own."""
    return ray_cluster


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory, fmnist):
    """Two `kt run --smoke` started at the same instant on one storage, each starting a local Ray of its own
    where it needs one (beside the session's), as two users of one machine run them: the Fashion-MNIST task,
    and its retrieval variant over a small mixed pool (400 images, one corrupt; same teacher and labels, so both
    need the same adapted teacher). Returns (storage directory, pool directory, [smoke, retrieval]
    CompletedProcess)."""
    import os

    from tests.pools import mixed_pool_images, write_webdataset

    storage = tmp_path_factory.mktemp("kt_smoke")
    images, keys = mixed_pool_images(fmnist.train.images[:400], 400)
    pool = write_webdataset(tmp_path_factory.mktemp("pool"), images, keys, 400, corrupt={7})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = [sys.executable, "-m", "orchestrator.cli", "run"]
    common = ["--smoke", "--storage", str(storage)]
    cmds = [[*run, str(TASK), *common],
            [*run, str(ROOT / "tasks" / "fashion_mnist_retrieval.yaml"), *common,
             "--set", f"transfer_set.retrieval.pool.root={pool}", "--set", "transfer_set.retrieval.budget=120",
             "--set", "transfer_set.retrieval.pool.target_domain_prefix=target-"]]
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    outs = [p.communicate(timeout=900) for p in procs]
    return storage, pool, [subprocess.CompletedProcess(c, p.returncode, o, e)
                           for c, p, (o, e) in zip(cmds, procs, outs)]


@pytest.fixture(scope="session")
def smoke_run(smoke_runs):
    """The smoke run of :func:`smoke_runs`, for the tests that read a finished run (test_cli, test_deploy_cli).
    Returns (storage directory, CompletedProcess)."""
    storage, _, (smoke, _) = smoke_runs
    return storage, smoke
