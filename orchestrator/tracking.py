"""MLflow tracking: embedded sqlite store by default, one parent run per pipeline run, nested stage runs."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)


def default_tracking_uri(storage: Path) -> str:
    """``$KT_TRACKING_URI`` when set (on a cluster: the head's MLflow server), else ``sqlite:////<storage>/mlflow.db``
    (absolute: MLflow 3 resolves relative URIs against each process's cwd)."""
    import os

    return os.environ.get("KT_TRACKING_URI") or f"sqlite:///{(storage / 'mlflow.db').resolve()}"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists and None as strings), for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class Tracker:
    """Thin MLflow wrapper (mlflow is imported lazily).

    Args:
        tracking_uri: e.g. ``sqlite:////abs/mlflow.db`` or ``http://127.0.0.1:5000``.
        experiment: experiment name (created on first use, artifacts under ``artifact_root`` if given).
    """

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path | None = None):
        import mlflow

        self.mlflow = mlflow
        self.uri = tracking_uri
        mlflow.set_tracking_uri(tracking_uri)
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            loc = artifact_root.resolve().as_uri() if artifact_root else None
            self.experiment_id = mlflow.create_experiment(experiment, artifact_location=loc)
        else:
            self.experiment_id = exp.experiment_id

    @contextmanager
    def run(self, name: str, nested: bool = False, tags: dict | None = None, run_id: str | None = None
            ) -> Iterator[Any]:
        """Start a (nested) run, or reopen run ``run_id``; yields the mlflow ActiveRun. A failure marks the run
        FAILED."""
        with self.mlflow.start_run(run_id=run_id, run_name=None if run_id else name,
                                   experiment_id=self.experiment_id, nested=nested, tags=tags) as r:
            yield r

    def params(self, params: dict) -> None:
        """Log a flat dict of params (values truncated to MLflow's 6000-character limit)."""
        flat = {k: str(v)[:6000] for k, v in params.items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):
            self.mlflow.log_params(dict(items[i:i + 100]))

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def artifact(self, path: str | Path, subdir: str | None = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path=subdir)

    def tags(self, tags: dict[str, str]) -> None:
        self.mlflow.set_tags(tags)


class NullTracker:
    """A Tracker that records nothing: stages run inside a sweep trial, whose MLflow run is written by the
    sweep driver from the trial's reports."""

    uri = ""

    @contextmanager
    def run(self, name: str, nested: bool = False, tags: dict | None = None) -> Iterator[None]:
        yield None

    def params(self, params: dict) -> None:
        pass

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def artifact(self, path: str | Path, subdir: str | None = None) -> None:
        pass

    def tags(self, tags: dict[str, str]) -> None:
        pass


class ChildRuns:
    """Nested MLflow runs written by one process on behalf of others (a sweep driver logging its trials):
    explicit run ids through ``MlflowClient``, no global active run. Children are found again by a tag, so a
    resumed sweep continues its runs instead of duplicating them.

    Args:
        tracking_uri, experiment_id: where the runs live. parent_run_id: the runs' parent (``mlflow.parentRunId``).
        key_tag: the tag that identifies a child (e.g. ``kt.trial_id``).
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, key_tag: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.experiment_id, self.parent, self.key_tag = experiment_id, parent_run_id, key_tag

    def find(self, key: str) -> tuple[str, str] | None:
        """(run id, status) of the child tagged ``key``, or None."""
        found = self.client.search_runs([self.experiment_id], max_results=1, filter_string=(
            f"tags.`{self.key_tag}` = '{key}' and tags.`mlflow.parentRunId` = '{self.parent}'"))
        return (found[0].info.run_id, found[0].info.status) if found else None

    def create(self, key: str, name: str, params: dict, tags: dict[str, str]) -> str:
        """A new child run with ``params`` (values as strings, MLflow's 6000-character limit); its run id."""
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=name,
                                      tags={"mlflow.parentRunId": self.parent, self.key_tag: key, **tags})
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        return run.info.run_id

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def log(self, run_id: str, metrics: dict[str, float], step: int, tags: dict[str, str] | None = None) -> None:
        """Metrics at ``step`` and tags, in one request."""
        import time

        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()],
                              tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])

    def end(self, run_id: str, status: str, tags: dict[str, str]) -> None:
        """Set ``tags`` and terminate the run (``FINISHED`` or ``FAILED``)."""
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)
        self.client.set_terminated(run_id, status)
