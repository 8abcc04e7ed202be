"""Optuna samplers that Tune can pickle, and a searcher that hands each trial a configuration not run before
(imported only when a sweep builds its search algorithm)."""
from __future__ import annotations

import copy
import json
import logging
import threading

import optuna
from ray.tune.search import Searcher

log = logging.getLogger(__name__)


class NSGAIISampler(optuna.samplers.NSGAIISampler):
    """optuna's NSGA-II sampler (Deb et al. 2002), picklable again.

    Tune pickles its search algorithm, the Optuna study and sampler with it, into the experiment state (at the
    start and at every checkpoint: resume reads it back). Since optuna 5.1 the genetic samplers hold a
    ``threading.Lock`` (``_thread_lock``), which cannot be pickled: a multi-objective sweep then failed in
    ``tune.Tuner(...)`` with ``TypeError: cannot pickle '_thread.lock' object``. The lock is left out of the
    pickle and a new one made on unpickling; nothing else changes. The class keeps optuna's name, so the
    generation keys it writes into trial attributes (``NSGAIISampler:generation``) stay optuna's own.
    """

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


class DistinctConfigs(Searcher):
    """A Tune searcher that never hands out a configuration it handed out before in this sweep.

    Samplers draw the same configuration again: an NSGA-II child can equal a parent (crossover takes every gene
    from one side and no gene mutates), TPE redraws its best categorical labels. Tune would run it as another
    trial, so a sweep of N trials explored fewer than N configurations. This wrapper asks the inner searcher
    (``OptunaSearch``) again, up to ``max_redraws`` times, while the drawn labels equal an earlier trial's
    (running, finished or failed). Each repeat is told to Optuna as a pruned trial: it brings no new result, TPE
    then counts that point among its worse ones and moves away from it, NSGA-II leaves it out of its population
    (only complete trials count there) and breeds another child. Tune sees one suggestion per trial.

    Its state (labels handed out, the inner trial of each Tune trial) is plain data: it pickles with the
    searcher, and Tune's experiment checkpoint keeps it (``get_state``/``set_state``; the inner searcher saves
    itself), so a resumed sweep still avoids what it ran before the interruption. Put a ``ConcurrencyLimiter``
    around it, not inside.
    """

    def __init__(self, searcher: Searcher, max_redraws: int = 100):
        self.searcher = searcher  # the name Tune's SearchGenerator follows to save wrapped searchers
        self.max_redraws = max_redraws
        self.seen: dict[str, str] = {}  # canonical labels -> the Tune trial that got them
        self.inner_ids: dict[str, str] = {}  # Tune trial -> its inner trial, where a redraw made them differ
        self.redraws = 0  # repeats turned away in this sweep
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    @property
    def metric(self):
        return self.searcher.metric

    @property
    def mode(self):
        return self.searcher.mode

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id: str):
        """The inner searcher's first suggestion for ``trial_id`` that no earlier trial got (None or
        ``Searcher.FINISHED`` pass through). After ``max_redraws`` repeats in a row the last one is returned,
        with a warning: the space has no configuration left that the sampler finds."""
        repeats: list[str] = []
        for attempt in range(self.max_redraws + 1):
            inner_id = trial_id if attempt == 0 else f"{trial_id}~redraw{attempt}"
            config = self.searcher.suggest(inner_id)
            if config is None or config == Searcher.FINISHED:
                return config
            key = canonical(config)
            earlier = self.seen.get(key)
            if earlier is None or attempt == self.max_redraws:
                break
            repeats.append(earlier)
            self.searcher.on_trial_complete(inner_id, None, error=False)  # pruned: no result, not a failure
        self.redraws += len(repeats)
        if inner_id != trial_id:
            self.inner_ids[trial_id] = inner_id
        if earlier is not None:
            log.warning("trial %s: the sampler repeated earlier configurations %d times in a row; it runs the "
                        "configuration of trial %s again (the search space may be exhausted)", trial_id,
                        len(repeats) + 1, earlier)
        else:
            self.seen[key] = trial_id
            if repeats:
                log.info("trial %s: the sampler drew the configuration of trial(s) %s again; drew anew %d time(s)",
                         trial_id, ", ".join(dict.fromkeys(repeats)), len(repeats))
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(self.inner_ids.get(trial_id, trial_id), result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.searcher.on_trial_complete(self.inner_ids.get(trial_id, trial_id), result=result, error=error)

    def on_pause(self, trial_id: str) -> None:
        self.searcher.on_pause(self.inner_ids.get(trial_id, trial_id))

    def on_unpause(self, trial_id: str) -> None:
        self.searcher.on_unpause(self.inner_ids.get(trial_id, trial_id))

    def add_evaluated_point(self, parameters, value, error=False, pruned=False, intermediate_values=None):
        self.seen.setdefault(canonical(parameters), "(evaluated point)")
        return self.searcher.add_evaluated_point(parameters, value, error, pruned, intermediate_values)

    def get_state(self) -> dict:
        """This wrapper's own state (what Tune's experiment checkpoint keeps of it; the inner searcher is
        saved on its own)."""
        return copy.deepcopy({k: v for k, v in self.__dict__.items() if k != "searcher"})

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)


def canonical(config: dict) -> str:
    """A configuration as a string, equal for equal configurations (keys sorted, at every level)."""
    return json.dumps(config, sort_keys=True, default=str)
