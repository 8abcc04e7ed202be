"""Deploy a trained student without re-training it: find it (a `kt run` directory, a sweep trial, or a sweep and
a trial id or compute budget), export it (ONNX, TorchScript, state dict), register it as a new version of a
registered model in the MLflow Model Registry, tagged with its lineage.

Where students live: ``<storage>/runs/<name>-<time>/student/student.pt`` (+ ``student.onnx``; the run's MLflow
model URI in ``result.json``) and ``<storage>/sweeps/<sweep>/trials/<id>/student.pt`` (written before the
trial's ``final.json``; ``student/student.pt`` on the trial's child run).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.models.export import BUNDLE_FILE, FORMATS, DeployError

log = logging.getLogger(__name__)

MODEL_JSON = "student_model.json"  # beside a trial's bundle: the MLflow model logged for it (reused)


@dataclass
class StudentSource:
    """Where a student is. ``kind``: run, trial or file; ``run_id``: the MLflow run that holds it;
    ``model_uri``: its MLflow model if one was logged; ``extra``: lineage the bundle lacks (sweep, trial)."""

    bundle: Path
    kind: str
    label: str
    tracking_uri: str | None = None
    run_id: str | None = None
    model_uri: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Registered:
    """A new Model Registry version: ``models:/<name>/<version>``, its lineage ``tags``."""

    name: str
    version: str
    tracking_uri: str
    source: str
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _sweep_dir(source: str | Path, storage: str | Path) -> Path | None:
    for d in (Path(source), Path(storage) / "sweeps" / str(source)):
        if (d / "sweep.json").is_file():
            return d
    return None


def _pick_trial(sweep_dir: Path, trial: str | None, budget: float | None) -> tuple[str, dict]:
    """(trial id, extra lineage) of the trial named (exact id or unique prefix/suffix), else the best completed
    trial by validation top-1 within ``budget`` (student forward MFLOPs per image), else the best overall.
    A budget is recorded as ``budget_mflops``."""
    from orchestrator.sweeps.driver import load_rows
    from orchestrator.sweeps.pareto import best_per_budget

    rows = load_rows(sweep_dir)
    ids = sorted({r["trial_id"] for r in rows} | {p.name for p in (sweep_dir / "trials").glob("*") if p.is_dir()})
    if trial is not None:
        hits = [t for t in ids if t == trial] or [t for t in ids if t.startswith(trial) or t.endswith(trial)]
        if len(hits) != 1:
            raise DeployError(f"sweep {sweep_dir.name} has {'no' if not hits else 'more than one'} trial {trial!r}; "
                              f"its trials: {', '.join(ids) or '(none)'} (`kt report {sweep_dir.name}` lists them)")
        return hits[0], ({"budget_mflops": budget} if budget is not None else {})
    done = [r for r in rows if r["status"] == "completed" and r.get("val_top1") is not None]
    if not done:
        raise DeployError(f"sweep {sweep_dir.name} has no completed trial, so no student to pick; finish it "
                          f"(`kt sweep ... --name {sweep_dir.name} --resume`) or pass --trial ID")
    if budget is None:
        best = max(done, key=lambda r: (r["val_top1"], -(r.get("student_flops") or 0)))
        return best["trial_id"], {}
    [(_, row)] = best_per_budget(rows, "val_top1", "student_flops", [budget * 1e6])
    if row is None:
        cheapest = min(r["student_flops"] for r in done if r.get("student_flops") is not None) / 1e6
        raise DeployError(f"no completed trial of sweep {sweep_dir.name} costs <= {budget:g} MFLOPs/img (the cheapest: "
                          f"{cheapest:.3g}); raise --budget")
    return row["trial_id"], {"budget_mflops": budget}


def _trial_source(sweep_dir: Path, tid: str, extra: dict) -> StudentSource:
    tdir = sweep_dir / "trials" / tid
    bundle = tdir / BUNDLE_FILE
    if not bundle.is_file():
        row = json.loads((tdir / "row.json").read_text()) if (tdir / "row.json").is_file() else {}
        why = {"error": f"it failed ({row.get('error') or 'see its attempts.log'})",
               "stopped": "it was stopped early (ASHA) before it finished"}.get(row.get("status", ""))
        if why is None:
            why = ("it finished before kt kept each trial's student (or on a node whose disk this machine does not "
                   "see)" if (tdir / "final.json").is_file() else "it has not finished")
        raise DeployError(f"trial {tid} of sweep {sweep_dir.name} has no student ({bundle} is missing): {why}. "
                          "Pick a completed trial with --trial ID or --budget MFLOPS "
                          f"(`kt report {sweep_dir.name}` lists them)")
    state = json.loads((sweep_dir / "sweep.json").read_text())
    uri, run_id = state.get("tracking_uri"), None
    if uri and state.get("parent_run_id"):
        from orchestrator.tracking import ChildRuns, experiment_id

        exp = experiment_id(uri, state["experiment"])
        found = ChildRuns(uri, exp, state["parent_run_id"], "kt.trial_id").find(tid) if exp else None
        run_id = found[0] if found else None
    cached = json.loads((tdir / MODEL_JSON).read_text()) if (tdir / MODEL_JSON).is_file() else {}
    model_uri = cached.get("model_uri") if cached.get("tracking_uri") == uri else None
    return StudentSource(bundle, "trial", f"trial {tid} of sweep {sweep_dir.name}", uri, run_id, model_uri,
                         {"sweep": sweep_dir.name, "trial_id": tid, **extra})


def _run_source(run_dir: Path) -> StudentSource:
    bundle = run_dir / "student" / BUNDLE_FILE
    res = json.loads((run_dir / "result.json").read_text()) if (run_dir / "result.json").is_file() else None
    if not bundle.is_file():
        why = ("it did not finish (no result.json): run it again" if res is None else
               "it finished before kt kept students as bundles: run it again with kt run")
        raise DeployError(f"run {run_dir} has no student ({bundle} is missing): {why}")
    res = res or {}
    return StudentSource(bundle, "run", f"run {run_dir.name}", res.get("tracking_uri"), res.get("run_id"),
                         (res.get("student") or {}).get("model_uri"), {"run_dir": run_dir.name})


def find_student(source: str | Path, trial: str | None = None, budget: float | None = None,
                 storage: str | Path = "kt_runs") -> StudentSource:
    """Resolve ``source`` to a student.

    Args:
        source: a run directory, a trial directory, a sweep (its directory or its name under
            ``<storage>/sweeps``), a run name under ``<storage>/runs``, or a ``student.pt`` bundle.
        trial: with a sweep, the trial (id, or a unique prefix or suffix). budget: with a sweep and no trial,
            the best trial costing at most this many student forward MFLOPs per image.
    Raises:
        DeployError: nothing there, a run or trial without a student (failed, stopped, unfinished), an unknown
            trial, no trial within the budget. The message says what to do.
    """
    p = Path(source)
    if p.is_file():
        return StudentSource(p, "file", str(p))
    sweep_dir = _sweep_dir(source, storage)
    if sweep_dir is not None:
        tid, extra = _pick_trial(sweep_dir, trial, budget)
        return _trial_source(sweep_dir, tid, extra)
    if trial is not None or budget is not None:
        raise DeployError(f"--trial and --budget pick a trial of a sweep, and {source} is not a sweep; pass a sweep "
                          f"name (under {Path(storage) / 'sweeps'}) or directory")
    if p.is_dir() and p.parent.name == "trials" and (p.parent.parent / "sweep.json").is_file():
        return _trial_source(p.parent.parent, p.name, {})
    for d in (p, Path(storage) / "runs" / str(source)):
        if d.is_dir() and ((d / "config.yaml").is_file() or (d / "student").is_dir()):
            return _run_source(d)
    raise DeployError(f"{source} is not a run directory, a sweep trial directory, a sweep (under "
                      f"{Path(storage) / 'sweeps'}) or a student.pt file; pass one (kt run prints its run dir)")


def export(source: str | Path, fmt: str = "onnx", out: str | Path | None = None, trial: str | None = None,
           storage: str | Path = "kt_runs") -> Path:
    """`kt export`: write a trained student as ``fmt`` (onnx, torchscript, state_dict) to ``out`` (default:
    beside its bundle). ONNX is verified on the bundle's real test images. Returns the written path.

    Raises DeployError (see :func:`find_student`; an unknown format; ONNX that does not match PyTorch)."""
    from orchestrator.models.export import export as export_as
    from orchestrator.models.export import load_student

    if fmt not in FORMATS:
        raise DeployError(f"unknown export format {fmt!r}; use one of: {', '.join(FORMATS)}")
    src = find_student(source, trial, storage=storage)
    path = Path(out) if out else src.bundle.parent / FORMATS[fmt]
    path.parent.mkdir(parents=True, exist_ok=True)
    return export_as(load_student(src.bundle), fmt, path)


def lineage_tags(lineage: dict, extra: dict) -> dict[str, str]:
    """Model-version tags: every lineage value as ``kt.<key>`` (floats at full precision)."""
    return {f"kt.{k}": (repr(v) if isinstance(v, float) else str(v)) for k, v in {**lineage, **extra}.items()
            if v is not None and k != "student_bundle"}


def _model_uri(src: StudentSource, student, uri: str, storage: str | Path) -> str:
    """The student's MLflow model in store ``uri``: the one logged already, else logged now into its run."""
    import functools

    from orchestrator.cache import write_atomic
    from orchestrator.models.export import export_onnx, pyfunc_parts
    from orchestrator.tracking import log_pyfunc_model

    if src.model_uri and src.tracking_uri == uri:
        return src.model_uri
    onnx = src.bundle.parent / FORMATS["onnx"]
    if not onnx.is_file():
        export_onnx(student, onnx)
    run_id = src.run_id if src.tracking_uri == uri else None
    exp = None
    if run_id is None:  # no run of this student in that store: an experiment of registered students
        from orchestrator.tracking import Tracker

        exp = Tracker(uri, "kt-registered-students", Path(storage) / "mlartifacts").experiment_id
    model_uri = log_pyfunc_model(uri, run_id, functools.partial(pyfunc_parts, student, onnx), experiment_id=exp)
    if src.kind == "trial":
        write_atomic(src.bundle.parent / MODEL_JSON, json.dumps({"tracking_uri": uri, "model_uri": model_uri}))
    return model_uri


def register(source: str | Path, trial: str | None = None, budget: float | None = None, name: str | None = None,
             storage: str | Path = "kt_runs", tracking_uri: str | None = None) -> Registered:
    """`kt register`: a student as a new version of registered model ``name`` (default ``<task>-student``).

    The version's source is the student's MLflow model (a pyfunc on its verified ONNX graph: uint8 images
    (N, H, W, C) -> (N, K) probabilities), logged into the run or trial child run that trained it if it has
    none yet; its tags hold the lineage (``kt.teacher``, ``kt.adapted_teacher.key``, ``kt.transfer_set.key``,
    ``kt.transfer_set.source``, ``kt.teacher_outputs.key``, ``kt.method``, ``kt.sweep``, ``kt.trial_id``,
    ``kt.val_top1``, ``kt.test_top1``, ``kt.student_flops``, ...).

    Args:
        source, trial, budget, storage: see :func:`find_student`. tracking_uri: the store (default: the one
            the run or sweep was tracked in).
    Raises:
        DeployError: see :func:`find_student`; a bare bundle file with no store to register in.
    """
    from orchestrator.models.export import load_student
    from orchestrator.tracking import register_model_version

    src = find_student(source, trial, budget, storage)
    uri = tracking_uri or src.tracking_uri
    if not uri:
        raise DeployError(f"{src.label} has no MLflow store on record; pass --tracking-uri")
    student = load_student(src.bundle)
    extra = {**src.extra, **({"run_id": src.run_id} if src.run_id else {})}
    tags = lineage_tags({"method": "task_oriented", "student": student.model_id, **student.lineage}, extra)
    name = name or f"{student.lineage.get('task') or 'kt'}-student"
    model_uri = _model_uri(src, student, uri, storage)
    version = register_model_version(uri, model_uri, name, tags, f"kt student {student.model_id} from {src.label}")
    log.info("registered %s as models:/%s/%s", src.label, name, version)
    return Registered(name, version, uri, src.label, tags)


def register_best(sweep: str | Path, name: str | None = None, storage: str | Path = "kt_runs",
                  tracking_uri: str | None = None) -> list[Registered]:
    """`kt sweep --register best`: register the best trial per compute budget (the budgets: the student forward
    FLOPs of the Pareto front's trials, as `kt report` prints them), each trial once, tagged ``kt.budget_mflops``."""
    from orchestrator.sweeps.driver import load_rows
    from orchestrator.sweeps.pareto import best_per_budget

    sweep_dir = _sweep_dir(sweep, storage)
    if sweep_dir is None:
        raise DeployError(f"no sweep {sweep!r} (expected {Path(storage) / 'sweeps' / str(sweep) / 'sweep.json'})")
    out, seen = [], set()
    for b, row in best_per_budget(load_rows(sweep_dir), "val_top1", "student_flops"):
        if row is not None and row["trial_id"] not in seen:
            seen.add(row["trial_id"])
            out.append(register(sweep_dir, row["trial_id"], b / 1e6, name, storage, tracking_uri))
    return out
