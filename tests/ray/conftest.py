import pytest


@pytest.fixture(scope="module")
def local_ray(ray_cluster):
    """This process joined to the session's local Ray (2 CPUs; tests.conftest.ray_cluster) for one module; the
    module's end disconnects it (the cluster itself stops at the end of the session)."""
    import ray

    from orchestrator.ray_adapters.session import ensure_ray

    ensure_ray()
    yield ray
    ray.shutdown()
