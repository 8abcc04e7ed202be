"""Warm Ray worker processes: started, with torch, timm and Ray Train already imported, before an actor needs one.

Every Ray Data actor, Ray Train controller and worker, and Tune trial is a new Python process, and importing
torch, timm and Ray Train in it takes about 5 s of one core (``python -X importtime``: torch 1.6 s, timm and
the torchvision it pulls in 2.3 s, ``ray.train.torch`` 1.1 s beyond torch). A Ray that kt starts has its worker
processes import :data:`PRELOAD` before they accept work (Ray's ``preload_python_modules``; on a cluster,
``RAY_preload_python_modules`` in `ray start`'s environment, as cluster.yaml sets it), and Ray starts
``num_cpus`` of them with the first driver. Ray does not start more until an actor asks for one, so a stage that
has used some up calls :func:`warm_workers` for the next: an actor then starts in about 0.2 s instead of 5.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

#: What a worker process of a Ray that kt starts imports before it accepts work (comma-joined for
#: ``RAY_preload_python_modules``). Each costs memory in every idle worker (about 400 MB RSS in all).
PRELOAD = ("torch", "timm", "ray.train.torch")

#: Seconds a worker that :func:`warm_workers` started waits idle for an actor before Ray may stop it.
KEEP_ALIVE_S = 600


def preload_env() -> dict[str, str]:
    """The environment variable that makes a `ray start` (or a Ray that ``ray.init`` starts) preload
    :data:`PRELOAD` in its worker processes: ``{"RAY_preload_python_modules": "torch,timm,ray.train.torch"}``."""
    return {"RAY_preload_python_modules": ",".join(PRELOAD)}


def warm_workers(n: int, keep_alive_s: int = KEEP_ALIVE_S) -> bool:
    """Ask this node's raylet to start ``n`` idle Python worker processes for this job, kept ``keep_alive_s``
    seconds, so that the next ``n`` actors started here (a Ray Data pool's, a Ray Train run's controller and
    workers, Tune's next trials) find a process that has already imported :data:`PRELOAD`.

    It is the raylet's ``PrestartWorkers`` call, the one Ray makes itself for a backlog of tasks
    (``enable_worker_prestart``). Best effort: nothing happens (returns False) when ``n < 1``, when Ray is not
    initialised, when the job has a runtime environment (a worker started without it would not match; Ray Jobs
    with a ``working_dir``) or when the call fails (another Ray version); otherwise returns True once the raylet
    accepted the request (the processes start in the background).
    """
    import ray

    if n < 1 or not ray.is_initialized():
        return False
    try:
        ctx = ray.get_runtime_context()
        if ctx.get_runtime_env_string() not in ("", "{}"):
            return False
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc

        me = ctx.get_node_id()
        node = next(x for x in ray.nodes() if x["NodeID"] == me)
        channel = init_grpc_channel(f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}")
        request = node_manager_pb2.PrestartWorkersRequest(
            language=common_pb2.PYTHON, job_id=bytes.fromhex(ctx.get_job_id()), num_workers=int(n),
            keep_alive_duration_secs=int(keep_alive_s))
        node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(request, timeout=10)
        channel.close()
        return True
    except Exception as e:  # noqa: BLE001 - a speed-up only: the next actor then starts a process itself
        log.debug("could not warm %d Ray worker processes: %s", n, e)
        return False
