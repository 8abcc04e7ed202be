"""The retrieval source on a module-scoped local Ray (2 CPUs): Ray Data embedding, faiss index, curation."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from orchestrator.cache import Cache
from orchestrator.config import PoolConfig, RetrievalConfig, TransferSetConfig
from orchestrator.data import make_split
from orchestrator.transfer_sets.retrieval import load_manifest, random_pool_sample
from orchestrator.stages.embed import shard_paths
from orchestrator.stages.pools import list_shards
from orchestrator.transfer_sets.base import TransferContext
from orchestrator.transfer_sets.pools import build_transfer_set
from tests.conftest import ROOT, TINY_RESNET
from tests.pools import mixed_pool_images, write_webdataset

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def pool(tmp_path_factory, fmnist):
    """300 unlabeled Fashion-MNIST images mixed with 300 off-domain patterns, 4 WebDataset shards; 30 queries."""
    split = make_split(fmnist.train.labels, None, 3, 0)  # 3 labeled images per class
    images, keys = mixed_pool_images(fmnist.train.images[split.unlabeled][:300], 300)
    root = write_webdataset(tmp_path_factory.mktemp("pool"), images, keys, 150)
    return root, split


@pytest.fixture(scope="module")
def embedder(tmp_path_factory, fmnist):
    """A tiny SimCLR-trained embedder (3 epochs on the 1,000 images, no labels): unlike a random-init network,
    its features spread over the sphere (mean cosine ~0.4), as a VFM's do."""
    from orchestrator.config import StandinConfig
    from orchestrator.models import save_model_checkpoint
    from orchestrator.stages.pretrain import pretrain_standin

    cfg = StandinConfig(model_kwargs=TINY_RESNET, input_size=16, epochs=3, batch_size=100, lr=3e-3)
    t = pretrain_standin(fmnist.train.images, cfg, [0.286], [0.353])
    return save_model_checkpoint(t, tmp_path_factory.mktemp("embedder") / "embedder.pt")


def _ctx(fmnist, split, cache_dir, embedder, adapted):
    return TransferContext(fmnist, split, Cache(cache_dir), f"checkpoint/{embedder}", "emb", {}, adapted, "adapted")


def _cfg(root, **kw):
    rc = RetrievalConfig(pool=PoolConfig(root=str(root), target_domain_prefix="target-"), budget=90,
                         embed_actors=2, **kw)
    return TransferSetConfig(source="retrieval", retrieval=rc)


def test_retrieval_source_prefers_the_target_domain_and_is_stable(local_ray, fmnist, pool, embedder,
                                                                  tiny_teacher_ckpt, tmp_path):
    root, split = pool
    ctx = _ctx(fmnist, split, tmp_path / "a", embedder, tiny_teacher_ckpt)
    ts = build_transfer_set(ctx, _cfg(root))
    assert len(ts) == 90 and ts.images.shape == (90, 28, 28, 1) and ts.source == "retrieval"
    assert ts.info["pool_images"] == 600 and ts.info["selected"] == 90
    m = load_manifest(ts.manifest)
    assert len(set(m.id)) == 90 and set(m.query) <= set(split.labeled.tolist())
    assert ts.info["target_domain_fraction"] >= 0.9  # the pool is half target images
    control = random_pool_sample(ctx, _cfg(root), len(ts))
    assert len(control) == 90 and control.info["target_domain_fraction"] < 0.75
    # same inputs in a fresh cache (embeddings, index and manifest recomputed): the same manifest
    again = build_transfer_set(_ctx(fmnist, split, tmp_path / "b", embedder, tiny_teacher_ckpt), _cfg(root))
    assert again.key == ts.key and load_manifest(again.manifest).content_hash() == m.content_hash()
    np.testing.assert_array_equal(again.images, ts.images)
    # same cache: every entry is a hit
    ctx.cache.hits.clear()
    build_transfer_set(ctx, _cfg(root))
    assert ctx.cache.hits == {"embeddings": 1, "index": 1, "manifests": 1}


def test_class_balance_uses_the_adapted_teachers_pseudo_labels(local_ray, fmnist, pool, embedder,
                                                               tiny_teacher_ckpt, tmp_path):
    root, split = pool
    ts = build_transfer_set(_ctx(fmnist, split, tmp_path, embedder, tiny_teacher_ckpt), _cfg(root, balance=True))
    m = load_manifest(ts.manifest)
    assert (m.pseudo_label >= 0).all() and np.bincount(m.pseudo_label, minlength=10).max() <= 9  # ceil(90/10)


def test_manifest_reuse_fetches_the_same_images(local_ray, fmnist, pool, embedder, tiny_teacher_ckpt, tmp_path):
    root, split = pool
    ctx = _ctx(fmnist, split, tmp_path, embedder, tiny_teacher_ckpt)
    ts = build_transfer_set(ctx, _cfg(root))
    cfg = _cfg(root)
    cfg.retrieval.manifest = str(ts.manifest)
    reused = build_transfer_set(ctx, cfg)
    assert reused.key == ts.key
    np.testing.assert_array_equal(reused.images, ts.images)


KILLED_JOB = """
import sys
from pathlib import Path
from orchestrator.config import PoolConfig
from orchestrator.ray_adapters.embed import embed_pool
from orchestrator.ray_adapters.session import ensure_ray
from orchestrator.stages.pools import list_shards
ensure_ray(num_cpus=1)
cfg = PoolConfig(root=sys.argv[1])
embed_pool(list_shards(cfg), "checkpoint/" + sys.argv[2], {}, cfg, (28, 28), 1, Path(sys.argv[3]), actors=1)
"""


def test_killed_embedding_job_resumes_without_redoing_finished_shards(local_ray, fmnist, tiny_teacher_ckpt,
                                                                      tmp_path):
    from orchestrator.ray_adapters.embed import embed_pool

    images = np.concatenate([fmnist.train.images] * 6)  # 6 shards of 1,000 real images
    root = write_webdataset(tmp_path / "pool", images, [f"k{i}" for i in range(len(images))], 1000)
    out = tmp_path / "emb"
    own_ray = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own, killed with it
    p = subprocess.Popen([sys.executable, "-c", KILLED_JOB, str(root), str(tiny_teacher_ckpt), str(out)],
                         cwd=ROOT, env=own_ray, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        deadline = time.time() + 240
        while not list(out.glob("*.json")) and time.time() < deadline and p.poll() is None:
            time.sleep(0.02)
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the job and the local Ray it started, nothing else
        p.wait()
    done = {f.name: f.stat().st_mtime_ns for f in out.glob("*")}
    assert 1 <= len([f for f in done if f.endswith(".json")]) < 6, done
    cfg = PoolConfig(root=str(root))
    results = embed_pool(list_shards(cfg), f"checkpoint/{tiny_teacher_ckpt}", {}, cfg, (28, 28), 1, out)
    assert [r["images"] for r in results] == [1000] * 6 and not any(r["error"] for r in results)
    for name, mtime in done.items():
        if name.endswith((".json", ".parquet")) and not name.startswith("."):
            assert (out / name).stat().st_mtime_ns == mtime, f"{name} was redone"
    assert all(shard_paths(out, i)[0].is_file() for i in range(6))
