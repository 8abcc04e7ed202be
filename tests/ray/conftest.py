import pytest


@pytest.fixture(scope="module")
def local_ray():
    """A module-scoped local Ray with 2 CPUs, shut down after the module (stops exactly this instance)."""
    import ray

    from orchestrator.ray_adapters.session import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()
