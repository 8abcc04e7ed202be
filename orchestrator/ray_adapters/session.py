"""Start or join Ray once per process, quietly and with bounded object-store memory."""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join ``$RAY_ADDRESS`` (a cluster, or inside a Ray Job) or start a local Ray.

    Local Ray gets 2 GiB of object store (docker's small /dev/shm otherwise makes ``ray.init`` fail) and its
    dashboard on 127.0.0.1 only (Ray Train's state queries need it). Ray Data progress bars only on a terminal.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        # address="local": always a new local Ray, never a cluster some earlier `ray start` left registered
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=2 * 1024**3, dashboard_host="127.0.0.1",
                 logging_config=ray.LoggingConfig(log_level="WARNING"))
    if handlers:  # LoggingConfig resets the driver's root logger to WARNING: keep the application's logging
        root.setLevel(level)
        root.handlers[:] = handlers
        logging.getLogger("ray").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.print_on_execution_start = False
    log.info("ray resources: %s", ray.cluster_resources())
