"""Start or join Ray once per process, quietly and with bounded object-store memory."""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join ``$RAY_ADDRESS`` (a cluster, or inside a Ray Job) or start a local Ray (:func:`_start_local`).

    Ray Data progress bars only on a terminal; the application's logging kept (Ray's LoggingConfig resets the
    root logger); one line says which Ray this process uses.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    if _PINNED is not None and os.environ.get("RAY_ADDRESS") == _PINNED:  # ours, shut down since: start another
        os.environ.pop("RAY_ADDRESS")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        where = f"Ray at {os.environ['RAY_ADDRESS']}"
    else:
        where = _start_local(num_cpus)
    if handlers:
        root.setLevel(level)
        root.handlers[:] = handlers
        logging.getLogger("ray").setLevel(logging.WARNING)
    readable_worker_lines(plain=not sys.stdout.isatty())
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    if not ctx.enable_progress_bars:  # off on purpose in a log file: no "Progress bars disabled" warning
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx.print_on_execution_start = False
    log.info("%s; resources: %s", where, ray.cluster_resources())


#: The application's own lines in Ray workers' output: kt's progress lines and its loggers' records.
OWN_LINES = r"\[kt\] |INFO orchestrator\.|WARNING orchestrator\.|ERROR orchestrator\."


def readable_worker_lines(plain: bool) -> None:
    """How this driver prints its Ray workers' lines. kt's own lines (:data:`OWN_LINES`) are printed every time:
    Ray de-duplicates lines that look alike across processes (numbers ignored), so two trials' ``distill epoch
    3/6`` lines became one with ``[repeated 2x across cluster]`` and a hint about ``RAY_DEDUP_LOGS``; Ray's own
    repeated lines stay de-duplicated. With ``plain`` (stdout is a log file, not a terminal) no ANSI colour
    codes: none around the ``(pid=...)`` prefix (``RAY_COLOR_PREFIX=0``, read per line) and none around the
    ``[repeated Nx ...]`` suffix, which Ray colours unconditionally (``ray._private.ray_logging._color``)."""
    import re

    from ray._private import ray_logging

    own = re.compile(OWN_LINES)
    for dedup in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
        dedup.allow_re = own
    if plain:
        os.environ["RAY_COLOR_PREFIX"] = "0"
        ray_logging._color = lambda msg: msg


_GCS_PORT = "RAY_GCS_SERVER_PORT"  # read by Ray when it starts a head node
_PINNED: str | None = None  # the $RAY_ADDRESS this process set for the local Ray it started


def _start_local(num_cpus: int | None) -> str:
    """Start a new local Ray (``address="local"``: never a cluster some earlier `ray start` left registered),
    pinned (:func:`_pin_local_address`), with 2 GiB of object store (docker's small /dev/shm otherwise makes
    ``ray.init`` fail) and its dashboard on 127.0.0.1 only (Ray Train's state queries need it). Returns where
    it runs (GCS address, dashboard URL), for the log."""
    import ray

    global _PINNED
    _PINNED = _pin_local_address()
    try:
        info = ray.init(address="local", num_cpus=num_cpus, object_store_memory=2 * 1024**3,
                        dashboard_host="127.0.0.1", logging_config=ray.LoggingConfig(log_level="WARNING"))
    finally:
        os.environ.pop(_GCS_PORT, None)
    return f"local Ray at {_PINNED}, dashboard http://{info.dashboard_url}"


def _pin_local_address() -> str:
    """Choose a free port for the GCS of the local Ray about to start, and set ``$RAY_ADDRESS`` and
    ``$RAY_GCS_SERVER_PORT`` to it (``ray.init(address="local")`` ignores the first; the Ray it starts, and so
    every worker process, inherits it). This process and every process of that Ray (Ray Train's state actor and
    controller, whose State API calls otherwise auto-detect "the" local cluster and fail with "Found multiple
    active Ray instances" when two runs share a machine) then talk to this Ray only; so would a subprocess this
    process starts. Returns the address (``127.0.0.1:PORT``)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ[_GCS_PORT] = str(port)
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    return os.environ["RAY_ADDRESS"]


def quiet_train_worker() -> None:
    """Called first in a Ray Train worker: hides Train's per-report INFO lines (``Reporting training result
    N: TrainingReport(...)``, logged under the file path of ``ray.train.v2._internal.execution.context``;
    checkpoint-persisted lines under ``ray.train``), and DDP's "Grad strides do not match bucket view strides"
    (1x1 convolutions whose weight gradients come back in another memory layout), which a user cannot act on."""
    import warnings

    from ray.train.v2._internal.execution import context

    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

    for name in ("ray.train", context.__file__):
        logging.getLogger(name).setLevel(logging.WARNING)


def say(message: str) -> None:
    """One progress line from a Ray Train worker, printed once on the driver. (Train V2 patches ``print`` to
    both print and log through the root logger, so a plain ``print`` shows up twice.)"""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


#: Ray Train's controller polls its workers this often (seconds; Ray's default is 2.0): a finished epoch or
#: run is seen sooner. Set for the Ray this process starts; a cluster's own env decides on a cluster.
HEALTH_CHECK_INTERVAL_S = "0.5"


def torch_trainer(train_fn, **kwargs):
    """A ``ray.train.torch.TorchTrainer(train_fn, **kwargs)`` without Ray Train's PlacementGroupCleaner.

    The cleaner is a detached actor that frees the placement group should the controller die while its driver
    lives. Stopping it at the end of every ``fit()`` waits for a State API query that, on a 2-core machine,
    does not answer in time: every run then paid 12 s (a trivial 2-worker ``fit()``: 36 s with it, 22-24 s
    without; ``benchmarks/train_overhead.py``) and printed a traceback. Here the driver owns the controller, and
    Ray releases a job's placement groups when the job ends; a placement group left by an attempt whose
    controller died (a lost node) is removed when the run starts again (:func:`free_left_placement_group`).
    """
    import functools

    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class _Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if not isinstance(c, PlacementGroupCleanerCallback)]

    rc = kwargs.get("run_config")
    if rc is not None and rc.name:  # what the cleaner did, for the one case that needs it (a run started again)
        key = f"{_PG_KEYS}{rc.storage_path}/{rc.name}"
        free_left_placement_group(key)
        train_fn = functools.partial(_recording_placement_group, key, train_fn)
    return _Trainer(train_fn, **kwargs)


_PG_KEYS = "kt/train_placement_group/"  # + "<storage path>/<run name>" in Ray's internal KV: a run's worker group


def free_run_placement_groups(run_name: str) -> int:
    """:func:`free_left_placement_group` for every recorded Ray Train run named ``run_name`` (a sweep trial's
    run is named after the trial): called by the sweep driver when a trial failed, so that the CPUs of the
    worker group its dead controller left (a lost node) go back to the trials still running. Returns how many
    were removed."""
    from ray.experimental.internal_kv import _internal_kv_list

    keys = [k.decode() for k in _internal_kv_list(_PG_KEYS)]
    return sum(free_left_placement_group(k) for k in keys if k.endswith(f"/{run_name}"))


def _recording_placement_group(key: str, train_fn, config: dict):
    """A Ray Train worker's loop, rank 0 first recording its worker group's placement group under ``key`` in
    Ray's internal KV store (on the head node: it outlives any worker node)."""
    import ray.train
    from ray.experimental.internal_kv import _internal_kv_put

    if ray.train.get_context().get_world_rank() == 0:
        pg = ray.util.get_current_placement_group()
        if pg is not None:
            _internal_kv_put(key, pg.id.hex(), overwrite=True)
    return train_fn(config)


def free_left_placement_group(key: str) -> bool:
    """Remove the placement group that an earlier attempt of this Ray Train run recorded under ``key``
    (:func:`_recording_placement_group`) if it still holds resources. A worker group's placement group belongs
    to the job, not to the controller that made it: when a node's loss kills the controller, Ray reschedules the
    group onto the nodes left, where it holds the CPUs that the run's next attempt waits for (a retried sweep
    trial then waits forever). Returns whether one was removed."""
    from ray._raylet import PlacementGroupID
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    hex_id = _internal_kv_get(key)
    if not hex_id:
        return False
    pg = PlacementGroup(PlacementGroupID(bytes.fromhex(hex_id.decode())))
    state = (placement_group_table(pg) or {}).get("state")
    _internal_kv_del(key)
    if state in (None, "REMOVED"):  # the earlier attempt ended normally (Ray Train removed it)
        return False
    log.warning("removing placement group %s, left by an earlier attempt of Ray Train run %s (state %s)",
                hex_id.decode()[:12], key.rsplit("/", 1)[-1], state)
    remove_placement_group(pg)
    return True
