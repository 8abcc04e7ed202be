"""Paper 2's per-source signals (Borup, Phoo, Hariharan, ICCV 2023, arXiv 2304.12314): the zoo named by the
``sources`` config, each source saved once as a checkpoint (stage ``source_model``), and its frozen features
and pseudo-labels over the labeled target images and the transfer set (stage ``source_signals``: Ray Data
through :func:`orchestrator.ray_adapters.data.teacher_inference`, cached by source and transfer set, so every
method, seed and trial reads them without a second inference pass).

Pseudo-labels (the paper only says "pseudo-labels"; this is the documented choice): a multinomial logistic
regression (sklearn, L2, inverse strength ``sources.probe_c``) fitted on the source's standardised frozen
features of the *labeled* target images; its log-probabilities over the C target classes on every transfer
image are the soft targets (temperature-scaled in the KD loss). A source's own classifier head is not used for
them (its classes are another domain's); its logits over its own classes feed LEEP/NCE only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.config import ConfigError, PipelineConfig
from orchestrator.data.shards import save_images
from orchestrator.graph import run_stage
from orchestrator.methods.common import frozen_model_outputs, inference_actors
from orchestrator.stages.compute import StageCompute

log = logging.getLogger(__name__)
SOURCE_METHODS = ("distill_nearest", "distill_weighted", "random_source", "uniform_weights")
MULTI = ("distill_weighted", "uniform_weights")  # methods that need at least two sources


@dataclass
class SourceInfo:
    """A loaded zoo source: its config, cached checkpoint (``kt-model/1``, head included; a source without
    a head gets a zero (1, D) placeholder and ``has_head`` False), feature width D, parameters, forward FLOPs
    per image at its own input size, number of source classes K and the ``source_model`` stage key."""

    name: str
    source: object
    checkpoint: Path
    has_head: bool
    feature_dim: int
    params: int
    flops: int
    num_source_classes: int
    key: str


def zoo_of(cfg: PipelineConfig):
    """The :class:`~orchestrator.zoo.config.ZooConfig` the ``sources`` section names (list, zoo YAML or the
    demo zoo), checked by the label-leak rule against the task name and data format.

    Raises:
        ConfigError: no zoo given, duplicate names, a zoo file that does not read; LabelLeakError (a
            ConfigError) for a source trained on the target's labels.
    """
    from pydantic import ValidationError

    from orchestrator.zoo.config import ZooConfig, check_label_leak, load_zoo

    s = cfg.sources
    if s.demo:
        from orchestrator.methods.base import BUILDERS

        zoo = BUILDERS.get("demo_zoo")(s.demo_storage or cfg.storage_path(), cfg.name, limit=s.demo_limit)
    elif isinstance(s.zoo, str):
        zoo = load_zoo(s.zoo)
    elif s.zoo:
        try:
            zoo = ZooConfig(sources=list(s.zoo))
        except ValidationError as e:
            raise ConfigError(f"sources.zoo: {e.errors()[0]['msg']}") from None
    else:
        raise ConfigError(f"method {cfg.method!r} distils from a source zoo: set sources.zoo (a list of "
                          "{name, id, trained_on} or a zoo YAML path) or sources.demo: true")
    for target in {cfg.name, cfg.data.format}:
        check_label_leak(zoo, target)
    return zoo


def check_config(cfg: PipelineConfig) -> None:
    """Cheap checks before any heavy work (called by :func:`orchestrator.methods.preflight.preflight`): the metric is
    registered, the zoo resolves (names unique), every id parses and every checkpoint file exists, and
    ``distill_weighted``/``uniform_weights`` have at least two sources.

    Raises UnknownNameError (metric), ModelIdError (id), ConfigError (the rest), each naming the fix."""
    from orchestrator.ids import parse_model_id
    from orchestrator.similarity import SIMILARITY

    SIMILARITY.get(cfg.sources.metric)
    if cfg.sources.demo:
        return  # built (and checked) when the method runs; it always holds the three ImageNet sources
    zoo = zoo_of(cfg)
    for src in zoo.sources:
        mid = parse_model_id(src.id)
        if mid.namespace == "checkpoint" and not Path(mid.name).expanduser().is_file():
            raise ConfigError(f"zoo source {src.name!r}: checkpoint {mid.name} does not exist; fix its id or "
                              "remove it from sources.zoo")
    if cfg.method in MULTI and len(zoo.sources) < 2:
        raise ConfigError(f"method {cfg.method!r} weights several sources but the zoo has "
                          f"{len(zoo.sources)} ({', '.join(zoo.names())}); add sources to sources.zoo, or use "
                          "method: distill_nearest for a single source")


def _source_content(src) -> dict:
    """What identifies a source's weights: id, kwargs and, for a checkpoint file, its size and mtime."""
    from orchestrator.ids import parse_model_id

    mid = parse_model_id(src.id)
    content = {"id": src.id, "model_kwargs": src.model_kwargs}
    if mid.namespace == "checkpoint":
        st = Path(mid.name).expanduser().stat()
        content["file"] = [st.st_size, int(st.st_mtime)]
    return content


def stage_source_model(ctx, src) -> SourceInfo:
    """Load zoo source ``src`` (:func:`orchestrator.zoo.signals.load_source`, head included) and cache it as
    a checkpoint (stage ``source_model``). Raises ModelLoadError naming the source and the fix."""
    import json

    from orchestrator.cache import META
    from orchestrator.models.teachers import ModelLoadError

    def body(tmp: Path, c: StageCompute) -> dict:
        import torch

        from orchestrator.ids import ModelIdError
        from orchestrator.models.teachers import save_model_checkpoint
        from orchestrator.registry import UnknownNameError
        from orchestrator.stages.compute import forward_flops
        from orchestrator.zoo.signals import load_source

        try:
            t = load_source(src)
        except (ModelLoadError, ModelIdError, UnknownNameError) as e:
            raise ModelLoadError(f"zoo source {src.name!r} ({src.id}) does not load: {e}. Fix its id or "
                                 "model_kwargs in sources.zoo, or remove it") from None
        has_head = t.head is not None
        if not has_head:  # a placeholder so teacher inference runs; its logits are never used
            t.head = torch.nn.Linear(t.feature_dim, 1)
            torch.nn.init.zeros_(t.head.weight)
            torch.nn.init.zeros_(t.head.bias)
        save_model_checkpoint(t, tmp / "source.pt", t.classes if has_head else None)
        return {"has_head": has_head, "feature_dim": int(t.feature_dim), "name": src.name,
                "params": int(sum(p.numel() for p in t.backbone.parameters())),
                "flops": int(forward_flops(t, (t.preprocess.channels, *t.preprocess.size))),
                "num_source_classes": int(t.head.out_features) if has_head else 0}

    run = run_stage(ctx, "source_model", body, content={"source": _source_content(src)}, record=False)
    m = json.loads((run.entry / META).read_text())
    return SourceInfo(src.name, src, run.entry / "source.pt", m["has_head"], m["feature_dim"], m["params"],
                      m["flops"], m["num_source_classes"], run.key)


def load_sources(ctx) -> list[SourceInfo]:
    """Every zoo source loaded (cached), then the metric/head check, before any inference.

    Raises ModelLoadError (a source that does not load) or SimilarityError (``sources.metric`` needs source
    logits and a source has no classifier head: the message lists the feature-only metrics)."""
    from orchestrator.similarity import SIMILARITY
    from orchestrator.similarity.core import missing_logits_error

    infos = [stage_source_model(ctx, s) for s in zoo_of(ctx.cfg).sources]
    metric = ctx.cfg.sources.metric
    if SIMILARITY.get(metric).needs_source_logits:
        for i in infos:
            if not i.has_head:
                raise missing_logits_error(metric, i.name)
    return infos


def _probe(feats: np.ndarray, labels: np.ndarray, c: float, num_classes: int, seed: int):
    """Fit the pseudo-label probe; returns (predict_log_proba: (M, D) -> (M, C) float32, train top-1)."""
    from sklearn.linear_model import LogisticRegression

    mean, std = feats.mean(0), feats.std(0) + 1e-6
    clf = LogisticRegression(C=c, max_iter=500, random_state=seed).fit((feats - mean) / std, labels)

    def log_proba(x: np.ndarray) -> np.ndarray:
        out = np.full((len(x), num_classes), np.log(1e-8), np.float32)  # classes absent from the labels
        out[:, clf.classes_] = clf.predict_log_proba((np.asarray(x, np.float32) - mean) / std)
        return np.maximum(out, np.log(1e-8)).astype(np.float32)  # finite: exp(-inf) * -inf is NaN in KL

    return log_proba, float(clf.score((feats - mean) / std, labels)), (mean, std, clf)


def _infer(ctx, info: SourceInfo, images: np.ndarray, out: Path):
    """(logits (N, K) float32, features (N, D) float16) of a source, by Ray Data actors (or in this process
    for a small pass: :func:`orchestrator.methods.common.inference_actors`)."""
    s = ctx.cfg.sources
    actors = inference_actors(ctx, len(images), info.flops, s.inference_actors)
    return frozen_model_outputs(ctx, info.checkpoint, images, out, s.inference_batch_size, actors,
                                f"source {info.name}")


def stage_source_signals(ctx, info: SourceInfo, ts) -> Path:
    """Source ``info``'s signals on the labeled images and transfer set ``ts`` (stage ``source_signals``,
    cached). Entry files: ``labeled_features.npy`` (N_l, D) float32, ``labeled_logits.npy`` (N_l, K) float32
    (source classes), ``features.npy`` (N, D) float16 and ``pseudo.npy`` (N, C) float32 log-probabilities on
    the transfer set, ``images.npy`` (N, H, W, C) uint8 (what Ray Train workers read), ``probe.npz``. The same
    Ray Data pass embeds the test images: the meta's ``probe_test_top1`` is the probe's test top-1 (the
    source's linear-probe transfer accuracy, for ``kt rank-sources --evaluate``; features not kept)."""
    labeled, test = ctx.task.train.subset(ctx.split.labeled), ctx.task.test

    def body(tmp: Path, c: StageCompute) -> dict:
        parts = [labeled.images, ts.images, test.images]
        if all(p.shape[1:] == parts[0].shape[1:] for p in parts):  # one Ray Data pass over all three
            z, f = _infer(ctx, info, np.concatenate(parts), tmp / "shards")
            cut = np.cumsum([len(p) for p in parts])[:-1]
            (zl, _, _), (fl, ft, fte) = np.split(z, cut), np.split(f, cut)
        else:
            zl, fl = _infer(ctx, info, labeled.images, tmp / "shards_labeled")
            ft = _infer(ctx, info, ts.images, tmp / "shards")[1]
            fte = _infer(ctx, info, test.images, tmp / "shards_test")[1]
        fl = fl.astype(np.float32)
        log_proba, train_top1, (mean, std, clf) = _probe(fl, labeled.labels, ctx.cfg.sources.probe_c,
                                                        ctx.task.num_classes, ctx.cfg.seed)
        test_top1 = float((log_proba(fte).argmax(1) == test.labels).mean())
        np.save(tmp / "labeled_features.npy", fl)
        np.save(tmp / "labeled_logits.npy", zl.astype(np.float32))
        np.save(tmp / "features.npy", ft.astype(np.float16))
        np.save(tmp / "pseudo.npy", log_proba(ft))
        save_images(tmp, ts.images)
        np.savez(tmp / "probe.npz", mean=mean, std=std, coef=clf.coef_, intercept=clf.intercept_,
                 classes=clf.classes_)
        c.images = len(labeled) + len(ts)  # the test pass is evaluation (probe_test_top1), not transfer compute
        c.flops = info.flops * c.images
        return {"source": info.name, "probe_train_top1": train_top1, "probe_test_top1": test_top1,
                "has_head": info.has_head, "feature_dim": info.feature_dim, "transfer_set": ts.description}

    actors = inference_actors(ctx, len(labeled) + len(ts) + len(test), info.flops, ctx.cfg.sources.inference_actors)
    run = run_stage(ctx, "source_signals", body, content={"source_model": info.key},
                    record_as=f"source_signals_{info.name}", devices=max(1, actors),
                    after=lambda r: {"source_forward_passes": 0 if r.hit else len(labeled) + len(ts)})
    if run.hit:
        log.info("source %s: signals cache hit (%s), no inference", info.name, run.key)
    return run.entry


def all_signals(ctx, infos: list[SourceInfo], ts) -> dict[str, Path]:
    """Every source's signals entry ({name: dir}); records their summed compute as ``source_inference``
    (the transfer compute paper 2's methods spend on the zoo)."""
    entries, total, hits = {}, StageCompute(), []
    for i in infos:
        entries[i.name] = stage_source_signals(ctx, i, ts)
        ctx.keys[f"source_signals/{i.name}"] = ctx.keys["source_signals"]
        st = ctx.stages[f"source_signals_{i.name}"]
        hits.append(st.get("cache_hit", 0.0))
        for k in ("images", "flops", "wall_seconds", "device_seconds", "cpu_seconds"):
            setattr(total, k, getattr(total, k) + type(getattr(total, k))(st.get(k, 0)))
    ctx.record("source_inference", total, bool(all(hits)), sources=len(infos))
    return entries


def source_scores(ctx, infos: list[SourceInfo], entries: dict[str, Path], metric: str | None = None
                  ) -> tuple[dict[str, float], dict[str, float]]:
    """({source: score}, {source: scoring seconds}) of ``metric`` (default ``sources.metric``) on the cached
    labeled features/logits; each score is cached (stage ``source_score``, keyed by the source's signals and
    the metric; metrics that shuffle use seed 0, so the score is a property of source and labeled set, the
    same for every student seed). Raises SimilarityError naming the source for a non-finite score."""
    import json
    import time

    from orchestrator.cache import META
    from orchestrator.similarity import SIMILARITY, SimilarityError, score

    metric = metric or ctx.cfg.sources.metric
    labels = ctx.task.train.labels[ctx.split.labeled]
    scores, seconds = {}, {}
    for i in infos:
        e = entries[i.name]

        def body(tmp: Path, c: StageCompute) -> dict:
            needs = i.has_head and SIMILARITY.get(metric).needs_source_logits
            logits = np.load(e / "labeled_logits.npy") if needs else None
            t0 = time.perf_counter()
            v = score(metric, np.load(e / "labeled_features.npy"), labels, logits, seed=0, source=i.name)
            if not np.isfinite(v):
                raise SimilarityError(f"metric {metric!r} scored source {i.name!r} {v}: not finite; use another "
                                      "metric (sources.metric) or remove the source")
            return {"score": float(v), "seconds": time.perf_counter() - t0, "source": i.name, "metric": metric}

        run = run_stage(ctx, "source_score", body, content={"signals": e.name, "metric": metric}, record=False)
        m = json.loads((run.entry / META).read_text())
        scores[i.name], seconds[i.name] = m["score"], m["seconds"]
    return scores, seconds


def stage_probe_eval(ctx, info: SourceInfo, entry: Path) -> float:
    """Test top-1 (fraction) of source ``info``'s pseudo-label probe on the target's test images (its
    linear-probe transfer accuracy), recorded by :func:`stage_source_signals` in ``entry``'s meta."""
    import json

    from orchestrator.cache import META

    return float(json.loads((entry / META).read_text())["probe_test_top1"])
