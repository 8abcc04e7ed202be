"""Paper 2's methods (Borup, Phoo, Hariharan, "Distilling from Similar Tasks for Transfer Learning on a
Budget", ICCV 2023, arXiv 2304.12314) and their source-choice baselines, all on the same per-source signals
(:mod:`orchestrator.methods.source_signals`) and the same multi-source loss
(:mod:`orchestrator.stages.multi_distill`)::

    L = ce_weight CE(labeled) + sum_s w_s ( kd_weight KL_T(pseudo_s || student) + feature_weight feat_s )

=====================  ===================================================================================
``distill_nearest``    the one source with the best ``sources.metric`` score, w = 1 (DistillNearest)
``distill_weighted``   every source, w = weights_from_scores(scores, weighting, weight_temperature, top_k)
                       (DistillWeighted; softmax over z-scored scores by default)
``random_source``      one source drawn uniformly at random with the run's seed (baseline)
``uniform_weights``    every source, w_s = 1 / S (baseline: weighting without similarity)
=====================  ===================================================================================

The paper's exact similarity metric, weighting and loss are not public beyond its abstract: these are natural
versions (metric from :mod:`orchestrator.similarity`, weights from ``ranking.weights_from_scores``). Then an
optional finetune on the labels (``sources.finetune``, epochs 0 = off). The best-source *oracle* (chosen by
test accuracy) is a benchmark row only (``benchmarks/source_selection.py``), never a training choice.
"""
from __future__ import annotations

import logging

import numpy as np

from orchestrator.data.shards import open_images
from orchestrator.graph import run_stage
from orchestrator.methods.base import Method, MethodResult, register
from orchestrator.methods.common import stage_transfer_set
from orchestrator.methods.source_signals import all_signals, check_config, load_sources, source_scores
from orchestrator.methods.student_stages import stage_evaluate, stage_train
from orchestrator.stages.compute import StageCompute, train_flops

log = logging.getLogger(__name__)


def choose_weights(ctx, method: str, scores: dict[str, float]) -> dict[str, float]:
    """The per-source weights ``method`` distils with ({source: weight}, summing to 1)."""
    from orchestrator.similarity import weights_from_scores

    s = ctx.cfg.sources
    names = sorted(scores)
    if method == "distill_nearest":
        return {max(names, key=lambda n: (scores[n], n)): 1.0}
    if method == "random_source":
        return {names[int(np.random.default_rng([ctx.cfg.seed, 17]).integers(len(names)))]: 1.0}
    if method == "uniform_weights":
        return {n: 1.0 / len(names) for n in names}
    return weights_from_scores(scores, s.weighting, s.weight_temperature, s.top_k)


def stage_multi_distill(ctx, weights: dict[str, float], entries: dict):
    """Distil the student from the weighted sources (graph stage ``multi_distill``) with
    :func:`orchestrator.ray_adapters.multi_train.multi_distill_ray`: in this process or on a Ray Train worker
    group (``sources.distill.execution``/``num_workers``; ``backend: local`` is in process). Returns (student
    nn.Module on ``ctx.device``, its preprocess)."""
    from orchestrator.models.students import create_student, student_preprocess
    from orchestrator.ray_adapters.loop_session import resolve_execution
    from orchestrator.ray_adapters.multi_train import multi_distill_ray
    from orchestrator.stages.distill import student_state
    from orchestrator.stages.schedule import distill_plan
    from orchestrator.storage import join

    cfg, task = ctx.cfg, ctx.task
    s = cfg.sources
    pre = student_preprocess(cfg.student.id, cfg.student.model_kwargs, task)
    labeled = task.train.subset(ctx.split.labeled)
    names = [n for n in weights if weights[n] > 0]
    content = {"sources": {n: ctx.keys[f"source_signals/{n}"] for n in names},
               "weights": {n: round(weights[n], 8) for n in names}}
    n_img = len(open_images(entries[names[0]]))
    mode = resolve_execution(s.distill.execution, s.distill.num_workers, s.distill.use_gpu)
    world = 1 if mode == "in_process" else s.distill.num_workers
    ctx.tracker.params({"multi_distill.execution_used": mode})
    out: dict = {}

    def body(_, c: StageCompute):
        student = create_student(cfg.student.id, task.num_classes, pre, cfg.student.model_kwargs)
        key = ctx.keys["multi_distill"]
        with ctx.cache.lock("ray_train-multi_distill", key):  # one run dir per key on this node
            state, tlog = multi_distill_ray(
                [{"name": n, "weight": weights[n], "entry": ctx.cache_ref(entries[n])} for n in names],
                {"images": labeled.images, "labels": labeled.labels}, cfg.student.id, cfg.student.model_kwargs,
                task.num_classes, pre.to_dict(), s.model_dump(mode="json"), cfg.seed,
                ctx.train_hooks.get("storage") or join(cfg.storage_uri(), "ray_results"),
                ctx.train_hooks.get("run_name") or f"multi_distill-{key}", ctx.cpus_per_worker,
                report=ctx.train_hooks.get("report"))
        student.load_state_dict(student_state(state))
        per_img = train_flops(student, (pre.channels, *pre.size))
        ce_imgs = min(s.distill.batch_size, len(labeled)) if s.ce_weight else 0
        c.images = distill_plan(n_img, s.distill, world).images(len(tlog["loss"]), s.distill.batch_size + ce_imgs)
        c.flops = per_img * c.images
        c.device_seconds = sum(tlog["seconds"]) * world
        for e, loss in enumerate(tlog["loss"]):
            ctx.tracker.metrics({"multi_distill_loss": loss}, step=e)
        out.update(epochs=len(tlog["loss"]), final_loss=tlog["loss"][-1], sources=len(names), execution=mode,
                   restarts=len(tlog["starts"]) - 1)
        return student

    run = run_stage(ctx, "multi_distill", body, content=content, devices=world, record_as="distill",
                    after=lambda r: out)
    return run.value.to(ctx.device), pre


def train_from_sources(ctx, method: str) -> MethodResult:
    """Load the zoo (checks first), signals per source (cached), scores, weights, distil, finetune."""
    cfg = ctx.cfg
    infos = load_sources(ctx)  # bad ids / heads fail here, before any inference
    ts = stage_transfer_set(ctx)
    entries = all_signals(ctx, infos, ts)
    scores, _ = source_scores(ctx, infos, entries)
    weights = choose_weights(ctx, method, scores)
    log.info("%s: %s scores %s -> weights %s", method, cfg.sources.metric,
             {k: round(v, 3) for k, v in scores.items()}, {k: round(v, 3) for k, v in weights.items()})
    ctx.tracker.params({f"sources.weight.{k}": round(v, 4) for k, v in weights.items()})
    student, pre = stage_multi_distill(ctx, weights, entries)
    top = max(weights, key=weights.get)
    metrics = {"distilled_top1": stage_evaluate(ctx, "distilled", "student (distilled from sources)", student, pre),
               "sources_used": float(sum(w > 0 for w in weights.values())), "top_weight": weights[top]}
    ctx.tracker.tags({"sources.top": top, "sources.metric": cfg.sources.metric})
    if cfg.sources.finetune.budget().value:  # a budget of 0 (steps or epochs): no finetune
        student = stage_train(ctx, "multi_finetune", student, pre, cfg.sources.finetune, record_as="finetune")
    ctx.stages.setdefault("source_choice", {}).update({"weights": weights, "scores": scores})
    return MethodResult(student, pre, cfg.student.id, cfg.student.model_kwargs, metrics)


def _method(name: str, summary: str, role: str) -> Method:
    return register(Method(name, lambda ctx: train_from_sources(ctx, name), summary,
                           "Borup, Phoo, Hariharan, ICCV 2023 (arXiv 2304.12314)", role, False,
                           ("source_inference", "distill"), needs_sources=True, checks=(check_config,)))


NEAREST = _method("distill_nearest", "distil the most similar zoo source (features + pseudo-labels)",
                  "student (DistillNearest)")
WEIGHTED = _method("distill_weighted", "distil every zoo source, weighted by task similarity",
                   "student (DistillWeighted)")
RANDOM = _method("random_source", "distil one zoo source drawn at random (baseline)", "student (random source)")
UNIFORM = _method("uniform_weights", "distil every zoo source with equal weights (baseline)",
                  "student (uniform weights)")
