"""Two Ray nodes (``ray.cluster_utils.Cluster``) sharing a ``file://`` storage URI: a Ray Train worker group on the
second node distils from an ImageFolder's image shards and the cached teacher outputs, reading rows from the URI;
that node's mirror holds no copy of the images or the outputs."""
import os

import numpy as np
import pytest

from orchestrator.config import DatasetConfig, DistillConfig
from orchestrator.models import Preprocess
from tests.conftest import TINY_RESNET
from tests.pools import write_mixed_image_folder

pytestmark = pytest.mark.ray


@pytest.fixture()
def two_nodes(tmp_path, monkeypatch):
    """A head node with no CPUs (the driver's) and node B with 2 CPUs and a mirror of its own; this process
    connected to it. Afterwards disconnected and stopped (the session's Ray is joined again on demand)."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    node_b = tmp_path / "node_b_mirror"
    cluster.add_node(num_cpus=2, env_vars={"KT_MIRROR": str(node_b)})
    ray.init(address=cluster.address)
    try:
        yield node_b
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_worker_node_distils_from_shards_on_a_file_uri_without_mirroring(tmp_path, fmnist, tiny_teacher_ckpt,
                                                                          two_nodes, monkeypatch):
    from orchestrator.cache import Cache
    from orchestrator.data import load_task_data
    from orchestrator.data.shards import ShardedImages, save_images
    from orchestrator.ray_adapters.train import distill_ray
    from orchestrator.stages.teacher_outputs import teacher_logits

    monkeypatch.setenv("KT_MIRROR", str(tmp_path / "driver_mirror"))
    uri = (tmp_path / "shared").as_uri()
    idx = np.concatenate([np.flatnonzero(fmnist.train.labels == c)[:40] for c in range(10)])
    write_mixed_image_folder(tmp_path / "task", fmnist.train.images[idx], fmnist.train.labels[idx],
                             [str(c) for c in range(10)])
    task = load_task_data(DatasetConfig(format="image_folder", root=str(tmp_path / "task"), channels=1,
                                        image_size=28, in_memory_max_mb=0), storage=uri)
    images = task.train.images
    assert isinstance(images, ShardedImages) and images.location.startswith("file://")
    cache = Cache(uri)
    with cache.write("teacher_outputs", "k" * 16) as tmp:  # what stage_teacher_outputs writes for a lazy set
        save_images(tmp, images)
        np.save(tmp / "logits.npy", teacher_logits(str(tiny_teacher_ckpt), images.materialize()))
    labeled = task.train.subset(np.arange(0, len(task.train), 10))
    data = {"storage": uri, "kind": "teacher_outputs", "key": "k" * 16,
            "labeled": {"images": np.asarray(labeled.images), "labels": labeled.labels}, "val": None}
    cfg = DistillConfig(epochs=2, batch_size=32, lr=3e-3, ce_weight=0.5, execution="worker_group").model_dump()
    pre = Preprocess(1, (28, 28), (0.286,), (0.353,))
    state, log = distill_ray(data, "timm/resnet10t", TINY_RESNET, 10, pre.to_dict(), cfg, 0,
                             f"{uri}/ray_results", "two-node", 2, False, execution="worker_group")
    assert log["execution"] == "worker_group" and len(log["loss"]) == 2 and np.isfinite(log["loss"]).all()
    assert state  # the trained student's weights came back
    mirrored = [p for p in two_nodes.rglob("*") if p.suffix in (".npy", ".tar", ".parquet")]
    assert mirrored == []  # node B read the shards, the manifest and the logits from the URI
    assert os.path.isdir(tmp_path / "shared" / "cache" / "image_shards")
