"""Optuna samplers that Tune can pickle (imported only when a sweep builds its search algorithm)."""
from __future__ import annotations

import threading

import optuna


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
