import pytest

from tests.conftest import TASK, run_kt


@pytest.fixture(autouse=True)
def _join_the_session_ray(ray_cluster):
    """Every `kt` subprocess here joins the session's Ray (tests.conftest.ray_cluster) unless it asks for its own."""
    return ray_cluster


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One `kt run TASK --smoke` as a user runs it (a local Ray of its own), shared by the tests that read a
    finished run (test_cli, test_deploy_cli). Returns (storage directory, CompletedProcess)."""
    storage = tmp_path_factory.mktemp("kt_smoke")
    return storage, run_kt("run", str(TASK), "--smoke", "--storage", str(storage), own_ray=True)
