"""One sweep trial: the pipeline's distill -> finetune -> evaluate stages for one drawn configuration, on the
teacher outputs the sweep prepared (shared by every trial with the same transfer set).

:func:`run_trial` is a plain function of a :class:`SweepContext`, the trial's id and drawn labels, and a
``report`` callable (``ray.tune.report`` in a sweep, ``list.append`` in a test). It is idempotent per trial id:
a trial that finished writes ``trials/<id>/final.json`` and a restart only re-reports it.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from orchestrator.cache import Cache, write_atomic
from orchestrator.config import PipelineConfig, resolve_config
from orchestrator.storage import join
from orchestrator.sweeps.space import SearchSpace, apply_overrides

log = logging.getLogger(__name__)


@dataclass
class SweepContext:
    """What every trial shares (picklable; built by the sweep driver after the prepare stage).

    Attributes:
        sweep_dir: ``<local storage>/sweeps/<name>`` (the driver's state: ledger, CSV, plot).
        remote_dir: ``<storage URI>/sweeps/<name>``: the Tune experiment and each trial's Ray Train
            checkpoints (the same as ``sweep_dir`` for local storage). base: the task config every trial starts from.
        teacher_id: the loadable teacher id (None when no method of the sweep uses a teacher).
        keys: the stage keys the prepare step made (``data``, ``teacher``, ``adapted_teacher``).
        adapted: the adapted teacher checkpoint (or None); teacher_flops: its forward FLOPs per image.
        transfer_sets: ``{transfer slot (methods.common.transfer_slot): {"dir", "keys", "key", "source",
            "description", "size", "teacher_forward_passes"}}``, written by the prepare stage.
        teachers: ``{teacher slot (methods.common.teacher_slot): {"adapted", "teacher_id", "teacher_flops",
            "keys"}}``: every adapted teacher the trials can draw (``teacher.ensemble`` may be a dimension).
    """

    name: str
    sweep_dir: str
    remote_dir: str
    base: dict
    space: SearchSpace
    teacher_id: str | None
    keys: dict[str, str]
    adapted: str | None
    teacher_flops: int
    transfer_sets: dict[str, dict] = field(default_factory=dict)
    teachers: dict[str, dict] = field(default_factory=dict)


def trial_config(sctx: SweepContext, labels: dict[str, Any]) -> PipelineConfig:
    """The validated pipeline config of a trial: base task, ``fixed``, then the drawn labels."""
    return resolve_config(apply_overrides(sctx.base, sctx.space.overrides(labels)), source=f"(sweep {sctx.name} trial)")


ROW_METRICS = ("val_top1", "test_top1", "student_flops", "device_seconds", "train_flops", "images_seen",
               "distilled_val_top1", "distilled_test_top1", "student_params", "transfer_set_size",
               "teacher_forward_passes", "epoch", "distill_restarts")


def trial_row(trial_id: str, status: str, result: dict, params: dict, error: str | None = None) -> dict:
    """A trial's row in the sweep's ledger (``trials/<id>/row.json``, the CSV, `kt report`): its status
    (completed/stopped/error), the metrics of ``result`` (a Tune report: :data:`ROW_METRICS`, ``time_*`` parts),
    where its distillation ran (``execution``), the drawn ``params``, its tags and the error line."""
    tags = result.get("kt_tags") or {}
    return {"trial_id": trial_id, "status": status, **{k: result.get(k) for k in ROW_METRICS},
            "execution": result.get("kt_execution"), "params": params,
            "tags": tags, "reused_from": tags.get("reused_from"), "error": error,
            **{k: v for k, v in result.items() if k.startswith("time_")}}


def committed_row(tdir: Path) -> dict | None:
    """The row of a trial from its commit, ``final.json`` (written by the trial, atomically, once it ended;
    the one truth of "finished"), or None if it has not finished. Rows the driver's ledger wrote are derived
    from the same report; this one stands in when the driver died before writing its row."""
    done = tdir / "final.json"
    if not done.is_file():
        return None
    final = json.loads(done.read_text())
    return trial_row(tdir.name, "completed", final, final.get("kt_params") or {})


def _attempt(tdir: Path, what: str) -> None:
    with open(tdir / "attempts.log", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {what}\n")


def _ctx(sctx: SweepContext, cfg: PipelineConfig, tdir: Path):
    """The trial's run context: the prepared keys, teacher and transfer sets; no MLflow of its own (the
    driver's ledger records the trial)."""
    from orchestrator.methods.common import load_data
    from orchestrator.run_context import Ctx
    from orchestrator.tracking import NullTracker

    from orchestrator.methods.common import teacher_slot

    task, split, _ = load_data(cfg)
    t = sctx.teachers.get(teacher_slot(cfg)) or {"adapted": sctx.adapted, "teacher_id": sctx.teacher_id,
                                                 "teacher_flops": sctx.teacher_flops, "keys": {}}
    # the trial driver holds no GPU (its Train workers do): finetuning on the few labels runs on its CPU
    return Ctx(cfg, Cache(cfg.storage_uri()), NullTracker(), tdir, "cpu", task, split,
               teacher_flops=t["teacher_flops"], adapted=Path(t["adapted"]) if t["adapted"] else None,
               cpus_per_worker=sctx.space.resources.cpus_per_worker, keys={**sctx.keys, **t["keys"]},
               teacher_id=t["teacher_id"], prepared=sctx.transfer_sets, plots=False)


def finished_twin(sweep_dir: Path, tdir: Path, cfg: PipelineConfig) -> Path | None:
    """Another trial of this sweep that finished with exactly this configuration (training is seeded, so it
    would give the same result), or None."""
    mine = cfg.model_dump(mode="json")
    for other in sorted((sweep_dir / "trials").glob("*/final.json")):
        d = other.parent
        if d != tdir and (d / "config.json").is_file() and json.loads((d / "config.json").read_text()) == mine:
            return d
    return None


def stopped_result(tdir: Path) -> dict | None:
    """The last result of a trial the sweep driver recorded as stopped early (ASHA) in ``row.json``, as a
    report (no ``kt_final``), or None if it was not stopped."""
    row_file = tdir / "row.json"
    if not row_file.is_file() or (tdir / "final.json").is_file():
        return None
    row = json.loads(row_file.read_text())
    if row.get("status") != "stopped":
        return None
    metrics = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {**metrics, "kt_tags": row.get("tags") or {}}


def run_trial(sctx: SweepContext, trial_id: str, labels: dict[str, Any], report: Callable[[dict], None],
              callbacks: list | None = None) -> dict:
    """Run (or re-report) one trial.

    Distillation runs in this process (one CPU worker: its epochs reported to ``report``) or on a Ray Train
    worker group (reported through ``callbacks``, Tune's TuneReportCallback), as a run named after the trial: a
    restarted trial resumes from its last epoch checkpoint. The finetune stage (paper stage 3) and evaluation
    run here. The final report has ``val_top1`` (after
    finetuning: the objective), ``test_top1``, ``student_flops`` (forward FLOPs per image), ``device_seconds``
    (distill + finetune), ``train_flops``, ``images_seen``, ``kt_final`` = 1, ``kt_tags`` (str values),
    ``kt_params`` (the drawn labels) and ``kt_earlier`` (per-epoch distillation ``loss``/``val_top1`` lists: the
    ledger logs any epoch a killed driver missed). Its commit is ``trials/<id>/final.json``, written atomically
    before the report: once it exists, the trial is finished for resume and the ledger (:func:`committed_row`).
    A trial whose configuration equals a finished trial's reuses that result (tag ``reused_from``).

    Raises:
        ConfigError for a drawn configuration that does not validate; whatever a stage raises.
    """
    started = time.time()
    tdir = Path(sctx.sweep_dir) / "trials" / trial_id
    tdir.mkdir(parents=True, exist_ok=True)
    done = tdir / "final.json"
    stopped = stopped_result(tdir)
    if stopped is not None:  # the driver recorded an early stop, then died before Tune saved it: not again
        log.info("trial %s was stopped early before; re-reporting its last result", trial_id)
        _attempt(tdir, "re-reported its early stop")
        report(stopped)
        return stopped
    if done.is_file():
        log.info("trial %s finished before; re-reporting its result", trial_id)
        final = json.loads(done.read_text())
    else:
        cfg = trial_config(sctx, labels)
        write_atomic(tdir / "config.json", json.dumps(cfg.model_dump(mode="json"), indent=1))
        twin = finished_twin(Path(sctx.sweep_dir), tdir, cfg)
        if twin is not None:  # samplers can draw a configuration again (NSGA-II children, TPE on categoricals)
            log.info("trial %s has the configuration of finished trial %s: its result is reused", trial_id, twin.name)
            final = {**json.loads((twin / "final.json").read_text()), "reused_result": 1.0, "kt_params": dict(labels)}
            final["kt_tags"] = {**final["kt_tags"], "reused_from": twin.name, "trial_dir": str(tdir)}
            if (twin / "student.pt").is_file():  # the same training: the same student, kept here too
                write_atomic(tdir / "student.pt", (twin / "student.pt").read_bytes())
                final["kt_tags"]["student_bundle"] = str(tdir / "student.pt")
            _attempt(tdir, f"reused {twin.name}")
        else:
            _attempt(tdir, "start")
            final = _train(sctx, cfg, trial_id, tdir, callbacks, started, report)
            final["kt_params"] = dict(labels)
            _attempt(tdir, "finished")
            log.info("trial %s: val top-1 %.4f, test top-1 %.4f", trial_id, final["val_top1"], final["test_top1"])
        write_atomic(done, json.dumps(final, indent=1))
    report(final)
    return final


TRAINING_STAGES = ("distill", "finetune", "ssl_pretrain", "baseline")  # what a trial's device time is spent on


def _train(sctx: SweepContext, cfg: PipelineConfig, trial_id: str, tdir: Path, callbacks: list | None,
           started: float, report: Callable[[dict], None]) -> dict:
    """The trial's method (distillation in this process or on a Ray Train worker group, finetuning), evaluated
    on the validation and test images; the trial's final report, with the seconds of its parts
    (:func:`trial_timing`). ``started``: when the trial function began (Unix seconds). An in-process
    distillation reports its epochs to ``report``; a worker group's go through ``callbacks``."""
    import torch

    from orchestrator.methods import METHODS
    from orchestrator.methods.student_stages import stage_evaluate

    torch.set_num_threads(max(1, int(sctx.space.resources.cpus_per_worker)))
    t0 = time.perf_counter()
    ctx = _ctx(sctx, cfg, tdir)
    t_data = time.perf_counter()
    fwd = _student_flops(ctx, cfg)
    t_setup = time.perf_counter()
    ctx.train_hooks = {"run_name": trial_id, "storage": join(sctx.remote_dir, "train"), "callbacks": callbacks,
                       "report": report, "extra_metrics": {"student_flops": float(fwd)}}
    method = METHODS.get(cfg.method)
    res = method.train(ctx)
    final_test = stage_evaluate(ctx, "student", method.role, res.student, res.preprocess, res.model_id)
    st = ctx.stages
    final_val = st["evaluate_student"]["val_top1"]
    dist = st.get("evaluate_distilled", {})
    train = [st[k] for k in TRAINING_STAGES if k in st]
    d = st.get("distill", {})
    passes = st.get("teacher_inference", {}).get("teacher_forward_passes", 0) + d.get("teacher_forward_passes", 0)
    final = {
        "val_top1": final_val, "test_top1": final_test, "distilled_val_top1": dist.get("val_top1", float("nan")),
        "distilled_test_top1": dist.get("top1", float("nan")), "student_flops": float(fwd),
        "student_params": float(sum(p.numel() for p in res.student.parameters())),
        "device_seconds": sum(x["device_seconds"] for x in train), "train_flops": sum(x["flops"] for x in train),
        "images_seen": float(sum(x["images"] for x in train)), "distill_epochs": float(d.get("epochs", 0)),
        "distill_restarts": float(d.get("restarts", 0)),
        "transfer_set_size": float(st.get("transfer_set", {}).get("size", 0)),
        "teacher_forward_passes": float(passes), "kt_final": 1.0, "kt_earlier": d.get("per_epoch") or {},
        **({"kt_execution": d["execution"]} if "execution" in d else {}),
        "kt_tags": {"method": cfg.method, "teacher": ctx.teacher_id or "", "transfer_set.source": cfg.transfer_set.source,
                    "student": res.model_id, "trial_dir": str(tdir),
                    **{f"{k}.key": v for k, v in ctx.keys.items() if k in LINEAGE_STAGES}},
    }
    t_save = time.perf_counter()
    final["kt_tags"]["student_bundle"] = str(keep_student(sctx, trial_id, tdir, ctx, res, final))
    final.update(trial_timing(st, cfg, started, t_data - t0, t_setup - t_data, time.perf_counter() - t_save))
    return final


def trial_timing(stages: dict, cfg: PipelineConfig, started: float, data_s: float, setup_s: float,
                 save_s: float) -> dict[str, float]:
    """The seconds of a trial's parts (benchmarks/trial_overhead.py): ``time_data_s`` (images and split),
    ``time_setup_s`` (the student's FLOP count), ``time_distill_steps_s`` (rank 0's epochs),
    ``time_worker_group_s`` (the rest of the distill stage's wall time: Ray Train start-up, reports,
    checkpoints, shutdown), ``time_finetune_s``, ``time_evaluate_s`` (every evaluation), ``time_save_s`` (the
    student bundle), and ``time_started_unix`` (when the trial function began)."""
    d = stages.get("distill", {})
    steps = d.get("device_seconds", 0.0) / max(1, cfg.distill.num_workers)
    return {"time_started_unix": started, "time_data_s": data_s, "time_setup_s": setup_s,
            "time_distill_steps_s": steps, "time_worker_group_s": max(0.0, d.get("wall_seconds", 0.0) - steps),
            "time_finetune_s": sum(stages.get(k, {}).get("wall_seconds", 0.0) for k in ("finetune", "baseline")),
            "time_evaluate_s": sum(v.get("wall_seconds", 0.0) for k, v in stages.items() if k.startswith("evaluate")),
            "time_save_s": save_s}


LINEAGE_STAGES = ("adapted_teacher", "transfer_set", "teacher_outputs", "teacher_features", "ssl_pretrain")


def keep_student(sctx: SweepContext, trial_id: str, tdir: Path, ctx, res, final: dict) -> Path:
    """Write the trial's final student as ``<trial dir>/student.pt`` (a kt-student/1 bundle with its lineage),
    before ``final.json``: a trial that finished always holds its student."""
    from orchestrator.models.export import BUNDLE_FILE, example_images, save_student

    cfg = ctx.cfg
    lineage = {**{k: v for k, v in final["kt_tags"].items() if k != "trial_dir"},
               "task": cfg.name, "sweep": sctx.name, "trial_id": trial_id,
               **{k: final[k] for k in ("val_top1", "test_top1", "student_flops", "student_params")}}
    return save_student(tdir / BUNDLE_FILE, res.student.cpu().eval(), res.preprocess, model_id=res.model_id,
                        model_kwargs=res.model_kwargs, classes=ctx.task.classes,
                        examples=example_images(ctx.task.test.images), lineage=lineage)


def _student_flops(ctx, cfg: PipelineConfig) -> int:
    """The student's forward FLOPs per image at its input resolution."""
    from orchestrator.models.students import create_student, student_preprocess
    from orchestrator.stages.compute import forward_flops

    from orchestrator.methods.common import student_arch

    mid, kwargs = student_arch(cfg)
    pre = student_preprocess(mid, kwargs, ctx.task)
    return forward_flops(create_student(mid, ctx.task.num_classes, pre, kwargs), (pre.channels, *pre.size))
