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
from orchestrator.config import PipelineConfig, config_hash, resolve_config
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
        teacher_id/teacher_key: the teacher before adaptation (loadable id, cache key).
        adapted/adapted_key: the adapted teacher checkpoint and its cache key; teacher_flops: its forward
            FLOPs per image.
        transfer_sets: ``{transfer-set config hash: {"dir", "key", "source", "description", "size",
            "teacher_forward_passes"}}``, written by the prepare stage.
    """

    name: str
    sweep_dir: str
    remote_dir: str
    base: dict
    space: SearchSpace
    teacher_id: str
    teacher_key: str
    adapted: str
    adapted_key: str
    teacher_flops: int
    transfer_sets: dict[str, dict] = field(default_factory=dict)


def trial_config(sctx: SweepContext, labels: dict[str, Any]) -> PipelineConfig:
    """The validated pipeline config of a trial: base task, ``fixed``, then the drawn labels."""
    return resolve_config(apply_overrides(sctx.base, sctx.space.overrides(labels)), source=f"(sweep {sctx.name} trial)")


def transfer_set_hash(cfg: PipelineConfig) -> str:
    """What identifies a trial's transfer set (its section; the split and teacher are shared by the sweep)."""
    return config_hash({"transfer_set": cfg.transfer_set.model_dump(mode="json"),
                        "online": cfg.distill.teacher_outputs == "online"})


def _attempt(tdir: Path, what: str) -> None:
    with open(tdir / "attempts.log", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {what}\n")


def _ctx(sctx: SweepContext, cfg: PipelineConfig, tdir: Path):
    from orchestrator.pipeline import Ctx, load_data
    from orchestrator.tracking import NullTracker

    task, split, _ = load_data(cfg)
    # the trial driver holds no GPU (its Train workers do): finetuning on the few labels runs on its CPU
    return Ctx(cfg, Cache(cfg.storage_uri()), NullTracker(), tdir, "cpu", task, split,
               teacher_flops=sctx.teacher_flops, adapted=Path(sctx.adapted),
               cpus_per_worker=sctx.space.resources.cpus_per_worker)


def _outputs(sctx: SweepContext, ctx, cfg: PipelineConfig) -> tuple[Path, dict]:
    """The prepared teacher outputs of this trial's transfer set; built here (once, under the cache's
    write) only if the prepare stage did not cover it."""
    from orchestrator.pipeline import stage_teacher_outputs, stage_transfer_set

    ts_info = sctx.transfer_sets.get(transfer_set_hash(cfg))
    if ts_info and Path(ts_info["dir"], "_COMPLETE").is_file():
        ctx.stages["teacher_inference"] = {"teacher_forward_passes": 0, "cache_hit": 1.0}
        return Path(ts_info["dir"]), ts_info
    log.warning("transfer set of this trial was not prepared; building it in the trial")
    ts, _ = stage_transfer_set(ctx, (sctx.teacher_id, sctx.teacher_key), Path(sctx.adapted), sctx.adapted_key)
    entry = stage_teacher_outputs(ctx, ts, Path(sctx.adapted), sctx.adapted_key)
    return entry, {"dir": str(entry), "key": ts.key, "source": ts.source, "description": ts.description,
                   "size": len(ts)}


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

    Distillation runs as a Ray Train run named after the trial (a restarted trial resumes from its last
    epoch checkpoint) and reports every epoch through ``callbacks`` (Tune's TuneReportCallback); the
    finetune stage (paper stage 3) and evaluation run here. The final report has ``val_top1`` (after
    finetuning: the objective), ``test_top1``, ``student_flops`` (forward FLOPs per image), ``device_seconds``
    (distill + finetune), ``train_flops``, ``images_seen``, ``kt_final`` = 1 and ``kt_tags`` (str values).
    A trial whose configuration equals a finished trial's reuses that result (tag ``reused_from``).

    Raises:
        ConfigError for a drawn configuration that does not validate; whatever a stage raises.
    """
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
            final = {**json.loads((twin / "final.json").read_text()), "reused_result": 1.0}
            final["kt_tags"] = {**final["kt_tags"], "reused_from": twin.name, "trial_dir": str(tdir)}
            if (twin / "student.pt").is_file():  # the same training: the same student, kept here too
                write_atomic(tdir / "student.pt", (twin / "student.pt").read_bytes())
                final["kt_tags"]["student_bundle"] = str(tdir / "student.pt")
            _attempt(tdir, f"reused {twin.name}")
        else:
            _attempt(tdir, "start")
            final = _train(sctx, cfg, trial_id, tdir, callbacks)
            _attempt(tdir, "finished")
            log.info("trial %s: val top-1 %.4f, test top-1 %.4f", trial_id, final["val_top1"], final["test_top1"])
        write_atomic(done, json.dumps(final, indent=1))
    report(final)
    return final


def _train(sctx: SweepContext, cfg: PipelineConfig, trial_id: str, tdir: Path, callbacks: list | None) -> dict:
    """Distill (Ray Train), finetune, evaluate on the validation and test images; the trial's final report."""
    import torch

    from orchestrator.pipeline import stage_distill, stage_supervised
    from orchestrator.stages.evaluate import evaluate

    torch.set_num_threads(max(1, int(sctx.space.resources.cpus_per_worker)))
    ctx = _ctx(sctx, cfg, tdir)
    outputs, ts_info = _outputs(sctx, ctx, cfg)
    fwd = _student_flops(ctx, cfg)
    student, pre = stage_distill(ctx, outputs, "distill", run_name=trial_id, storage=join(sctx.remote_dir, "train"),
                                 callbacks=callbacks, extra_metrics={"student_flops": float(fwd)})
    val, test, k = ctx.task.train.subset(ctx.split.val), ctx.task.test, ctx.task.num_classes
    distilled = [evaluate(student, pre, x, k, device=ctx.device).top1 for x in (val, test)]
    student = stage_supervised(ctx, "finetune", student, pre, cfg.finetune)
    final_val, final_test = [evaluate(student, pre, x, k, device=ctx.device).top1 for x in (val, test)]
    d, ft = ctx.stages["distill"], ctx.stages["finetune"]
    passes = ctx.stages.get("teacher_inference", {}).get("teacher_forward_passes", 0) + d["teacher_forward_passes"]
    final = {
        "val_top1": final_val, "test_top1": final_test, "distilled_val_top1": distilled[0],
        "distilled_test_top1": distilled[1], "student_flops": float(fwd),
        "student_params": float(sum(p.numel() for p in student.parameters())),
        "device_seconds": d["device_seconds"] + ft["device_seconds"], "train_flops": d["flops"] + ft["flops"],
        "images_seen": float(d["images"] + ft["images"]), "distill_epochs": float(d["epochs"]),
        "distill_restarts": float(d["restarts"]), "transfer_set_size": float(ts_info["size"]),
        "teacher_forward_passes": float(passes), "kt_final": 1.0,
        "kt_tags": {"teacher": sctx.teacher_id, "adapted_teacher.key": sctx.adapted_key,
                    "transfer_set.source": cfg.transfer_set.source, "transfer_set.key": ts_info["key"],
                    "teacher_outputs.key": Path(ts_info["dir"]).name, "student": cfg.student.id,
                    "trial_dir": str(tdir)},
    }
    final["kt_tags"]["student_bundle"] = str(keep_student(sctx, trial_id, tdir, ctx, student, pre, final))
    return final


def keep_student(sctx: SweepContext, trial_id: str, tdir: Path, ctx, student, pre, final: dict) -> Path:
    """Write the trial's final student as ``<trial dir>/student.pt`` (a kt-student/1 bundle with its lineage),
    before ``final.json``: a trial that finished always holds its student."""
    from orchestrator.models.export import BUNDLE_FILE, example_images, save_student

    cfg = ctx.cfg
    lineage = {**{k: v for k, v in final["kt_tags"].items() if k != "trial_dir"}, "method": "task_oriented",
               "task": cfg.name, "sweep": sctx.name, "trial_id": trial_id,
               **{k: final[k] for k in ("val_top1", "test_top1", "student_flops", "student_params")}}
    return save_student(tdir / BUNDLE_FILE, student.cpu().eval(), pre, model_id=cfg.student.id,
                        model_kwargs=cfg.student.model_kwargs, classes=ctx.task.classes,
                        examples=example_images(ctx.task.test.images), lineage=lineage)


def _student_flops(ctx, cfg: PipelineConfig) -> int:
    """The student's forward FLOPs per image at its input resolution."""
    from orchestrator.models.students import create_student, student_preprocess
    from orchestrator.stages.compute import forward_flops

    pre = student_preprocess(cfg.student.id, cfg.student.model_kwargs, ctx.task)
    student = create_student(cfg.student.id, ctx.task.num_classes, pre, cfg.student.model_kwargs)
    return forward_flops(student, (pre.channels, *pre.size))
