"""Ray Tune adapter: Optuna search (TPE, or NSGA-II for accuracy-vs-compute), ASHA early stopping, per-trial
resources and retries, resume, and a driver-side callback that writes each trial's MLflow child run and its
row in the sweep's trial ledger.

Each trial is a function trainable whose distillation runs in the trial's own process (one CPU worker: its
epochs reported with ``tune.report``) or on a Ray Train worker group (the Ray 2.x pattern for Train inside Tune:
``TorchTrainer.fit()`` in the trial, metrics forwarded by ``TuneReportCallback``).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

from ray import tune  # this module is the Tune adapter: imported only when a sweep runs

from orchestrator.ray_adapters.session import free_run_placement_groups

log = logging.getLogger(__name__)

EXPERIMENT = "tune"  # Tune experiment dir: <sweep_dir>/tune


def trial_trainable(config: dict, sctx, run_trial) -> None:
    """The Tune trainable: ``config`` holds the labels Optuna drew for this trial; ``run_trial(sctx, trial_id,
    labels, report, callbacks)`` is the application's trial (passed in: this adapter imports no layer above it)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("ray").setLevel(logging.WARNING)  # Ray Train's per-report INFO lines
    run_trial(sctx, tune.get_context().get_trial_id(), dict(config), tune.report, [TuneReportCallback()])


def _searcher(space):
    """Optuna (NSGA-II for a multi-objective space, else TPE) behind :class:`DistinctConfigs` (no trial gets a
    configuration an earlier trial got) and a ConcurrencyLimiter."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator.ray_adapters.samplers import DistinctConfigs, NSGAIISampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    s = space.search
    if space.multi_objective:
        sampler = NSGAIISampler(population_size=s.population_size, seed=s.seed)
        alg = OptunaSearch(space=space.suggest, metric=[space.objective.metric, space.objective.compute],
                           mode=["max", "min"], sampler=sampler)
    else:
        startup = s.startup_trials or min(10, max(2, s.num_trials // 3))
        sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=startup)
        alg = OptunaSearch(space=space.suggest, metric=space.objective.metric, mode="max", sampler=sampler)
    return ConcurrencyLimiter(DistinctConfigs(alg), max_concurrent=s.max_concurrent_trials)


def _scheduler(space, max_epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    es = space.search.early_stopping
    if not es.enabled:
        return FIFOScheduler()
    # one report per distillation epoch, then the final one after finetuning
    return ASHAScheduler(metric=space.objective.metric, mode="max", time_attr="training_iteration",
                         max_t=max_epochs + 1, grace_period=es.grace_period, reduction_factor=es.reduction_factor)


def run_tune(sctx, run_trial, max_epochs: int, callbacks: list, resume: bool):
    """Run (or, with ``resume``, continue) the sweep's Tune experiment under ``<remote_dir>/tune``, one
    ``run_trial`` (see :func:`trial_trainable`) per trial.

    Returns the list of Tune trials. A resumed experiment keeps its finished trials and searcher state;
    unfinished and errored trials run again (errored ones from scratch, each with its retries).
    """
    from orchestrator.ray_adapters.session import ensure_ray

    ensure_ray()
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # experiment state at most 1 s behind (resume)
    space, path = sctx.space, f"{sctx.remote_dir}/{EXPERIMENT}"
    trainable = tune.with_resources(tune.with_parameters(trial_trainable, sctx=sctx, run_trial=run_trial),
                                    trial_resources(space.resources, sctx.base.get("distill") or {}))
    if resume and tune.Tuner.can_restore(path):
        log.info("resuming Tune experiment %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=_searcher(space), scheduler=_scheduler(space, max_epochs),
                                        num_samples=space.search.num_trials, reuse_actors=False),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=sctx.remote_dir,  # a path or a storage URI
                                      callbacks=callbacks, verbose=0,  # TrialLedger logs a line per trial
                                      failure_config=tune.FailureConfig(max_failures=space.resources.max_failures)))
    grid = tuner.fit()
    return [res for res in grid]


def trial_resources(r, distill: dict) -> dict[str, float]:
    """What a trial's own process asks Ray for: ``trial_driver_cpus``, plus the worker's CPUs (and GPU) when its
    distillation runs in that process (:func:`~orchestrator.ray_adapters.loop_session.resolve_execution` of the
    sweep's base ``distill``); a worker group asks for its own workers when it starts. ``r``: the space's
    ``resources``."""
    from orchestrator.ray_adapters.loop_session import resolve_execution

    workers = distill.get("num_workers", r.workers_per_trial)
    if resolve_execution(distill.get("execution", "auto"), workers, r.gpus_per_worker > 0) == "worker_group":
        return {"CPU": r.trial_driver_cpus}
    gpu = {"GPU": r.gpus_per_worker} if r.gpus_per_worker else {}
    return {"CPU": r.trial_driver_cpus + r.cpus_per_worker, **gpu}


class TrialLedger(tune.Callback):
    """Driver-side Tune callback: one MLflow child run per trial (params, per-epoch metrics, compute, tags
    linking it to the teacher, transfer set and cache keys) under the sweep's parent run, and a row per
    trial in ``<sweep_dir>/trials/<id>/row.json`` (status completed/stopped/error, metrics, params), built by
    ``row(trial_id, status, result, params, error)`` (the application's, passed in).

    Child runs are found again by their ``kt.trial_id`` tag, so a resumed sweep never duplicates them. A failed
    trial's Ray Train placement group is freed (:func:`free_run_placement_groups`: its controller died with a node).
    MLflow is written from the driver only (a sqlite store need not be visible to worker nodes).
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep_dir: str, sweep: str,
                 row: Callable[..., dict], total: int = 0):
        self.uri, self.experiment_id, self.parent = tracking_uri, experiment_id, parent_run_id
        self.sweep_dir, self.sweep, self.total, self.row_of = sweep_dir, sweep, total, row
        self._client = None
        self._runs: dict[str, str] = {}
        self._done: set[str] = set()
        self._started: dict[str, float] = {}  # trial id -> when Tune started it (Unix seconds)
        self._tracking: dict[str, float] = {}  # trial id -> seconds of its MLflow writes
        self._reopened: set[str] = set()  # child runs a killed driver left RUNNING, continued here
        self._params_logged: set[str] = set()  # trials whose run params of the result were logged here

    _TRANSIENT = ("_client", "_runs", "_done", "_started", "_tracking", "_reopened", "_params_logged")

    def __getstate__(self):  # pickled into the Tune experiment state: no client, no cached ids
        return {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT}

    def __setstate__(self, state):
        self.__dict__.update(state, _client=None, _runs={}, _done=set(), _started={}, _tracking={}, _reopened=set(),
                             _params_logged=set())

    def _timed(self, trial, fn, *args) -> None:
        """``fn(*args)``, its seconds added to the trial's tracking time."""
        t0 = time.perf_counter()
        fn(*args)
        self._tracking[trial.trial_id] = self._tracking.get(trial.trial_id, 0.0) + time.perf_counter() - t0

    @property
    def runs(self):
        if self._client is None:
            from orchestrator.tracking import ChildRuns

            self._client = ChildRuns(self.uri, self.experiment_id, self.parent, "kt.trial_id")
        return self._client

    def _run_id(self, trial) -> str | None:
        tid = trial.trial_id
        if tid in self._runs or tid in self._done:
            return self._runs.get(tid)
        found = self.runs.find(tid)
        if found and found[1] == "FINISHED":
            self._done.add(tid)  # finished before a resume: leave it as it is
            return None
        if found:
            run_id = found[0]
            self.runs.reopen(run_id)
            self._reopened.add(run_id)
        else:
            from orchestrator.tracking import flatten

            run_id = self.runs.create(tid, f"trial-{tid}", flatten(dict(trial.config)), {"kt.sweep": self.sweep})
        self._runs[tid] = run_id
        return run_id

    def _row(self, trial, status: str, error: str | None = None) -> None:
        from orchestrator.cache import write_atomic

        res = dict(trial.last_result or {})
        row = {**self.row_of(trial.trial_id, status, res, dict(trial.config), error), **self._timing(trial, res)}
        d = Path(self.sweep_dir) / "trials" / trial.trial_id
        d.mkdir(parents=True, exist_ok=True)
        write_atomic(d / "row.json", json.dumps(row, indent=1, default=str))

    def _timing(self, trial, res: dict) -> dict[str, float]:
        """The trial's ``time_*`` parts (orchestrator.sweeps.trial.trial_timing) and the driver's: actor start
        (Tune started it -> its function ran), result (its end -> now), tracking (MLflow writes) and the trial's
        whole wall time (``time_trial_s``), when this driver started the run that made the result (not for a
        result a finished trial re-reports after a resume)."""
        out = {k: v for k, v in res.items() if k.startswith("time_")}
        start, now = self._started.get(trial.trial_id), time.time()
        if start is None or out.get("time_started_unix", 0.0) < start:  # a result re-reported from an earlier run
            return out
        steps = sum(v for k, v in out.items() if k.endswith("_s"))  # the trial's own parts, all seconds
        actor = out["time_started_unix"] - start
        return {**out, "time_actor_start_s": actor, "time_result_s": max(0.0, now - start - actor - steps),
                "time_tracking_s": self._tracking.get(trial.trial_id, 0.0), "time_trial_s": now - start}

    def on_trial_start(self, iteration, trials, trial, **info):
        self._started[trial.trial_id] = time.time()
        self._timed(trial, self._run_id, trial)
        log.info("trial %s started: %s", trial.trial_id, ", ".join(f"{k}={v}" for k, v in trial.config.items()))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_id(trial)
        if run_id is None:
            return
        step = result_step(result)
        if run_id in self._reopened:  # a run a killed driver left: it may have missed epochs, or logged this one
            if result.get("kt_earlier"):
                self._timed(trial, self._backfill, run_id, result["kt_earlier"])
            if step in self.runs.logged_steps(run_id, "val_top1"):
                return  # logged by the killed driver before (a committed trial re-reporting its result): once only
        metrics = {k: v for k, v in result.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _TUNE_NOISE}
        tags = {f"kt.{k}": str(v) for k, v in (result.get("kt_tags") or {}).items()}
        params = None
        if result.get("kt_execution") and trial.trial_id not in self._params_logged:  # where distillation ran
            params = {"distill.execution_used": result["kt_execution"]}
            self._params_logged.add(trial.trial_id)
        self._timed(trial, self.runs.log, run_id, metrics, step, tags, params)

    def _backfill(self, run_id: str, earlier: dict[str, list[float]]) -> None:
        """Log ``kt_earlier`` (per-epoch ``loss``/``val_top1`` lists: from a resumed Ray Train run's checkpoint
        in its first report, and in a trial's final report) at the steps (1-based epochs) the child run does not
        have yet: a killed driver can die after an epoch's checkpoint was persisted and before it logged that
        epoch's report, and the resumed run does not report that epoch again."""
        have = self.runs.logged_steps(run_id, "loss")
        for i in range(max(map(len, earlier.values()), default=0)):
            if i + 1 not in have:
                self.runs.log(run_id, {k: float(v[i]) for k, v in earlier.items() if len(v) > i}, i + 1)

    def on_trial_complete(self, iteration, trials, trial, **info):
        final = bool((trial.last_result or {}).get("kt_final"))
        status = "completed" if final else "stopped"
        res = trial.last_result or {}
        self._timed(trial, self._log_student, trial, (res.get("kt_tags") or {}).get("student_bundle") if final else None)
        self._row(trial, status)
        n_done = len(list((Path(self.sweep_dir) / "trials").glob("*/row.json")))
        log.info("trial %s %s%s: val top-1 %.4f%s [%d of %d trials ended]", trial.trial_id, status,
                 "" if final else f" early (ASHA) after epoch {res.get('epoch')}", res.get("val_top1", float("nan")),
                 f", test top-1 {res['test_top1']:.4f}" if final else "", n_done, self.total)
        self._end(trial, "FINISHED", {"kt.status": status})

    def _log_student(self, trial, bundle: str | None) -> None:
        """The trial's student bundle as an artifact (``student/student.pt``) of its child run."""
        run_id = self._run_id(trial)
        if run_id is None or not bundle:
            return
        if Path(bundle).is_file():
            self.runs.artifact(run_id, bundle, "student")
        else:  # written on a worker node whose disk the driver does not see
            log.warning("trial %s: its student %s is not visible here; not logged to MLflow", trial.trial_id, bundle)

    def on_trial_recover(self, iteration, trials, trial, **info):
        log.warning("trial %s failed (attempt %d); retrying it with the same config", trial.trial_id,
                    trial.num_failures)
        free_run_placement_groups(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        err = trial.get_error()
        msg = (str(err).strip().splitlines() or ["unknown error"])[-1][:500]
        log.error("trial %s failed after %d attempts: %s", trial.trial_id, trial.num_failures, msg)
        free_run_placement_groups(trial.trial_id)
        self._row(trial, "error", msg)
        self._end(trial, "FAILED", {"kt.status": "error", "kt.error": msg})

    def _end(self, trial, status: str, tags: dict[str, str]) -> None:
        run_id = self._run_id(trial)
        if run_id is not None:
            self.runs.end(run_id, status, tags)
            self._runs.pop(trial.trial_id, None)
            self._done.add(trial.trial_id)


def result_step(result: dict) -> int:
    """The MLflow step of a trial's report: its distillation epoch (1-based), and for the final report (after
    finetuning) the epoch after the last. Not Tune's ``training_iteration``, which restarts at 1 when a trial
    of a resumed sweep runs again while its Ray Train run resumes from a later epoch."""
    if result.get("kt_final"):
        return int(result.get("distill_epochs") or 0) + 1
    return int(result.get("epoch") or result.get("training_iteration") or 0)


_TUNE_NOISE = {"timestamp", "time_this_iter_s", "time_total_s", "pid", "time_since_restore",
               "iterations_since_restore", "kt_final", "done", "training_iteration"}

