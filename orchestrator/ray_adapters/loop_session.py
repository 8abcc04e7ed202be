"""Where a student training loop runs, and the one epoch checkpoint every place shares.

A loop (:mod:`orchestrator.ray_adapters.train`, :mod:`orchestrator.ray_adapters.multi_train`) runs in one of
three places, chosen by :func:`resolve_execution` and driven by :func:`run_loop`:

* ``worker_group``: a TorchTrainer of ``num_workers`` Ray Train workers (DDP; gloo on CPU, NCCL on GPU), for
  two or more workers and for GPUs. Reports go through ``ray.train.report`` (inside a sweep trial, Tune's
  ``TuneReportCallback`` forwards them); a lost worker group is restarted by Ray Train's FailureConfig.
* ``in_process`` in ``kt run``: Ray Train's local mode, ``ScalingConfig(num_workers=0)`` (Ray >= 2.50): the
  loop runs in the calling process with Ray Train's API, and Ray need not be started at all.
* ``in_process`` inside a Ray Tune trial, where Ray Train's API refuses to run (Ray issue #49454): the loop is
  called directly and its reports go to the ``report`` callable the trial passes (``ray.tune.report``).

In every place rank 0 writes the loop's resumable state after each reporting epoch, atomically, to
``<storage>/<run name>/kt_state.pt`` (:func:`state_location`; a local path or a storage URI, the same for every
node), before that epoch's report, and every (re)start resumes from it: a worker group restarted by Ray Train, a
Tune trial restarted by its FailureConfig, a ``kt run --resume`` or a sweep's ``--resume``. Ray Train's own
checkpoints are not used. What ran is returned with the state (:func:`run_loop`), for the stage's record.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Callable

from orchestrator.storage import download_file, filesystem, is_uri, join, upload_file

log = logging.getLogger(__name__)

STATE_FILE = "kt_state.pt"  # the loop's resumable state under its run dir
EXECUTIONS = ("auto", "in_process", "worker_group")


def resolve_execution(execution: str, num_workers: int, use_gpu: bool) -> str:
    """Where a loop of ``num_workers`` workers runs: ``"in_process"`` or ``"worker_group"``.

    ``auto``: in process for 0 workers, and for one CPU worker (a worker group's start-up, a new Python process
    that imports torch and timm, costs more than the loop it would save at that size); a worker group otherwise.
    ``in_process`` forces it (one process, whatever ``num_workers``: world size 1); ``worker_group`` forces a
    worker group. Raises ValueError for an unknown value or a worker group of 0 workers."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution {execution!r} is not one of {EXECUTIONS}")
    if execution == "worker_group" and num_workers < 1:
        raise ValueError("execution: worker_group needs num_workers >= 1 (num_workers: 0 runs in process)")
    if execution == "in_process" or num_workers == 0 or (execution == "auto" and num_workers == 1 and not use_gpu):
        return "in_process"
    return "worker_group"


def state_location(storage_path: str | Path, name: str) -> str:
    """Where run ``name`` under ``storage_path`` (a local path or a storage URI) keeps its loop state."""
    return join(str(storage_path), name, STATE_FILE)


def save_to(location: str, write: Callable[[Path], None]) -> None:
    """Persist a state file atomically at ``location`` (a local path or a storage URI): ``write(path)`` writes
    it locally, then it is moved (local) or uploaded (URI) into place; a reader never sees half a file."""
    if not is_uri(location):
        dst = Path(location)
        dst.parent.mkdir(parents=True, exist_ok=True)
        write(dst)  # stages.distill.save_state writes a temporary sibling and renames it
        return
    fs, path = filesystem(location)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / STATE_FILE
        write(local)
        upload_file(local, fs, path)


def load_from(location: str, read: Callable[[Path], object]):
    """``read(local path)`` of the state at ``location``, or None when there is none yet."""
    if not is_uri(location):
        return read(Path(location)) if Path(location).is_file() else None
    fs, path = filesystem(location)
    if fs.get_file_info(path).type.name != "File":
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return read(download_file(fs, path, Path(tmp) / STATE_FILE))


class LoopSession:
    """What a training loop asks of the place it runs in: rank, world size, device, its checkpoint, reports.

    Built inside the loop from the config :func:`run_loop` gives it (``kt_state``: :func:`state_location`;
    ``kt_mode``: ``"in_process"`` or ``"worker_group"``) and, in a Tune trial, the ``report`` callable;
    otherwise it uses Ray Train's context (a worker group, or local mode).
    """

    def __init__(self, config: dict, report: Callable[[dict], None] | None = None):
        self.location, self.mode = config["kt_state"], config.get("kt_mode", "worker_group")
        self._report = report
        if report is None:  # a Ray Train worker, or Ray Train's local mode
            import ray.train

            ctx = ray.train.get_context()
            self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        else:
            self.rank, self.world = 0, 1

    def device(self, use_gpu: bool):
        """The training device: the worker's GPU in a worker group, the driver's first GPU in process (CPU
        without one, or without ``use_gpu``)."""
        import torch

        if not use_gpu:
            return torch.device("cpu")
        if self.mode == "worker_group":
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def restore(self, read: Callable[[Path], object]):
        """``read(path)`` of the last persisted state, or None on a first start."""
        return load_from(self.location, read)

    def report(self, metrics: dict, write: Callable[[Path], None]) -> None:
        """End of a reporting epoch: rank 0 persists the state (``write(path)``, atomically, before the report),
        then every rank reports ``metrics`` (Ray Train's report is a barrier across the worker group)."""
        if self.rank == 0:
            save_to(self.location, write)
        if self._report is not None:
            self._report(metrics)
        else:
            import ray.train

            ray.train.report(metrics)


def run_loop(train_fn: Callable[..., None], config: dict, *, name: str, storage_path: str | Path, execution: str,
             num_workers: int, use_gpu: bool, cpus_per_worker: float = 1.0, callbacks: list | None = None,
             report: Callable[[dict], None] | None = None, read: Callable[[Path], object]):
    """Run ``train_fn(config[, report])`` where ``execution`` (:func:`resolve_execution`) says, then return
    ``(read(state file), mode)``: the loop's last persisted state and ``"in_process"`` or ``"worker_group"``.

    ``report``: inside a Ray Tune trial, the trial's report callable (``ray.tune.report``): an in-process loop
    is then called directly and reports to it (``callbacks`` serve a worker group: e.g. TuneReportCallback).
    The same ``name`` and ``storage_path`` resume from the state's last epoch, in any mode.
    Raises ray.train.TrainingFailedError after a worker group's retries run out; whatever the loop raises in
    process; RuntimeError when the loop ended without persisting a state (a budget of no epochs).
    """
    mode = resolve_execution(execution, num_workers, use_gpu)
    location = state_location(storage_path, name)
    config = {**config, "kt_state": location, "kt_mode": mode}
    where = ("in the trial's process" if report is not None else "in this process (Ray Train's local mode)"
             ) if mode == "in_process" else f"on a Ray Train worker group of {num_workers}"
    log.info("training run %s: %s", name, where)
    if mode == "in_process" and report is not None:
        train_fn(config, report)
    elif mode == "in_process":
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        quiet_local_mode()
        TorchTrainer(train_fn, train_loop_config=config, scaling_config=ScalingConfig(num_workers=0),
                     run_config=RunConfig(name=name, storage_path=str(storage_path))).fit()
    else:
        _fit_worker_group(train_fn, config, name, storage_path, num_workers, use_gpu, cpus_per_worker, callbacks)
    state = load_from(location, read)
    if state is None:
        raise RuntimeError(f"training run {name} ended without a state at {location}")
    return state, mode


def _fit_worker_group(train_fn, config: dict, name: str, storage_path, num_workers: int, use_gpu: bool,
                      cpus_per_worker: float, callbacks: list | None) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from orchestrator.ray_adapters.session import ensure_ray, torch_trainer

    ensure_ray()
    torch_trainer(
        train_fn, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(storage_path),  # a local path or a storage URI
                             failure_config=FailureConfig(max_failures=1), callbacks=callbacks or []),
    ).fit()


def quiet_local_mode() -> None:
    """Ray Train's local mode logs a line per run ("Running in local mode ...") and per report ("Reported
    metrics: {...}") at INFO, which a user cannot act on: raise those loggers to WARNING."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # its modules' loggers inherit the level
