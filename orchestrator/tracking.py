"""MLflow tracking: embedded sqlite store by default, one parent run per pipeline run, nested stage runs; the
students' MLflow models and their Model Registry versions."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

# MLflow 3 opens an experiment without this tag in its GenAI view; this value opens the runs table (the UI's
# experiment kinds: genai_development, custom_model_development, ...)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def default_tracking_uri(storage: Path) -> str:
    """``$KT_TRACKING_URI`` when set (on a cluster: the head's MLflow server), else ``sqlite:////<storage>/mlflow.db``
    (absolute: MLflow 3 resolves relative URIs against each process's cwd)."""
    import os

    return os.environ.get("KT_TRACKING_URI") or f"sqlite:///{(storage / 'mlflow.db').resolve()}"


@contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """For a ``sqlite:///`` store: hold an exclusive ``flock`` on ``<db>.lock`` (processes of one machine take
    turns creating the database's tables and the experiment; concurrent first use otherwise fails with
    "table ... already exists" or a duplicate experiment). A no-op for other stores (a server serialises)."""
    import fcntl

    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    db = Path(tracking_uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


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
        with store_lock(tracking_uri):  # two runs opening a new sqlite store: one creates its tables
            self._open_experiment(experiment, artifact_root)

    def _open_experiment(self, experiment: str, artifact_root: Path | None) -> None:
        mlflow, tracking_uri = self.mlflow, self.uri
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            loc = artifact_root.resolve().as_uri() if artifact_root else None
            self.experiment_id = mlflow.create_experiment(experiment, artifact_location=loc,
                                                          tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        else:
            self.experiment_id = exp.experiment_id
            if EXPERIMENT_KIND_TAG not in exp.tags:  # made before the tag was set: a model-training experiment
                mlflow.MlflowClient(tracking_uri).set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG,
                                                                     EXPERIMENT_KIND)

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

    def model(self, parts: Callable[[Path], dict], name: str = "model") -> str:
        """Log a student's MLflow model into the active run (see :func:`log_pyfunc_model`); its URI."""
        return log_pyfunc_model(self.uri, self.mlflow.active_run().info.run_id, parts, name)


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

    def model(self, parts: Callable[[Path], dict], name: str = "model") -> str:
        return ""


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

    def logged_steps(self, run_id: str, key: str) -> set[int]:
        """The steps at which metric ``key`` of run ``run_id`` was logged (a resumed driver's check before it
        logs a report again)."""
        return {m.step for m in self.client.get_metric_history(run_id, key)}

    def artifact(self, run_id: str, path: str | Path, subdir: str | None = None) -> None:
        """Log file ``path`` as an artifact of child ``run_id`` (under ``subdir``)."""
        self.client.log_artifact(run_id, str(path), subdir)

    def log(self, run_id: str, metrics: dict[str, float], step: int, tags: dict[str, str] | None = None,
            params: dict[str, str] | None = None) -> None:
        """Metrics at ``step``, tags and params (MLflow refuses a param logged again with another value), in one
        request."""
        import time

        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()],
                              tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
                              params=[Param(k, str(v)) for k, v in (params or {}).items()])

    def end(self, run_id: str, status: str, tags: dict[str, str]) -> None:
        """Set ``tags`` and terminate the run (``FINISHED`` or ``FAILED``)."""
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)
        self.client.set_terminated(run_id, status)


def experiment_id(tracking_uri: str, name: str) -> str | None:
    """The id of experiment ``name`` in the store at ``tracking_uri``, or None."""
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri).get_experiment_by_name(name)
    return exp.experiment_id if exp else None


def run_experiment_id(tracking_uri: str, run_id: str) -> str | None:
    """The experiment of run ``run_id``, or None where it cannot be read (no such run or store: a sqlite file
    that does not exist is not created)."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):].split("?")[0]).is_file():
        return None  # sqlite:////abs/mlflow.db, sqlite:///relative.db
    try:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    except Exception:  # a printed hint, not worth failing a finished command for
        return None


def log_pyfunc_model(tracking_uri: str, run_id: str | None, parts: Callable[[Path], dict], name: str = "model",
                     experiment_id: str | None = None) -> str:
    """Log a student as an MLflow pyfunc model (an MLflow 3 logged model) of run ``run_id``, in the run's
    experiment (or, without a run, in ``experiment_id``).

    Args:
        parts: builds the model's parts in a temporary directory (``orchestrator.models.export.pyfunc_parts``):
            ``data_path``, ``code_paths``, ``loader_module``, ``image_shape`` (H, W, C), ``num_classes`` K,
            ``example`` ((2, H, W, C) uint8), ``metadata``, ``pip_requirements``.
    Returns:
        The model's URI (``models:/<model id>``). Its signature: (-1, H, W, C) uint8 -> (-1, K) float32.
    """
    import tempfile

    import mlflow
    import numpy as np
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    # created here, not by Model.log: that one puts a model logged outside an active run in the Default experiment
    exp = client.get_run(run_id).info.experiment_id if run_id else experiment_id
    if exp is None:
        raise ValueError("log_pyfunc_model needs a run_id or an experiment_id")
    logged = client.create_logged_model(exp, name=name, source_run_id=run_id, model_type="kt-student")
    with tempfile.TemporaryDirectory(prefix="kt-pyfunc-") as tmp:
        p = parts(Path(tmp))
        sig = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *p["image_shape"]))]),
                             outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, p["num_classes"]))]))
        info = Model.log(artifact_path=None, flavor=mlflow.pyfunc, name=name, run_id=run_id,
                         model_id=logged.model_id,
                         loader_module=p["loader_module"], data_path=p["data_path"], code_paths=p["code_paths"],
                         signature=sig, input_example=p["example"], pip_requirements=p["pip_requirements"],
                         metadata=p["metadata"])
    return info.model_uri


def register_model_version(tracking_uri: str, model_uri: str, name: str, tags: dict[str, str],
                           description: str = "") -> str:
    """A new version of registered model ``name`` (created if new) from ``model_uri``, with ``tags``;
    returns the version number."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    if description:
        mlflow.MlflowClient(tracking_uri).update_model_version(name, mv.version, description)
    return str(mv.version)


def model_version_tags(tracking_uri: str, name: str, version: str) -> dict[str, str]:
    """The tags of version ``version`` of registered model ``name``."""
    from mlflow.tracking import MlflowClient

    return dict(MlflowClient(tracking_uri).get_model_version(name, version).tags)


def load_pyfunc(tracking_uri: str, uri: str):
    """``mlflow.pyfunc.load_model(uri)`` against the store at ``tracking_uri``. Raises DeployError (from
    orchestrator.models.export) for a URI that names no model there."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from orchestrator.models.export import DeployError

    mlflow.set_tracking_uri(tracking_uri)
    try:
        return mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as e:
        msg = (getattr(e, "message", None) or str(e)).strip().splitlines()[0][:300]
        raise DeployError(f"no MLflow model {uri} in {tracking_uri} ({msg}); check the name and version that "
                          "`kt register` printed, or pass --tracking-uri for another store") from None
