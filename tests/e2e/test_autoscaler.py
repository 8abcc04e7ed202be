"""The autoscaler reads cluster.yaml (benchmarks/autoscale.py): the fake multi-node config derived from cluster.yaml
and cluster-gcp.yaml keeps their node types, labels and worker bounds and passes Ray's own validation (fast, always
run); and the whole run (a 1-CPU head whose autoscaler adds worker nodes of cluster.yaml's types for a sweep
submitted with `kt submit`, then removes them when idle) passes. The run takes about 3-4 minutes on 2 CPU cores,
so it is left out of the default suite: `make autoscale`, or ``KT_AUTOSCALE=1 pytest tests/e2e/test_autoscaler.py``.
"""
import functools
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

CONFIGS = {"aws": ROOT / "cluster.yaml", "gcp": ROOT / "cluster-gcp.yaml"}


@pytest.fixture(autouse=True)
def _join_the_session_ray():
    """Not the session's Ray (tests/e2e/conftest.py): the run starts and stops a cluster of its own."""
    return None


def _autoscale():
    spec = importlib.util.spec_from_file_location("kt_autoscale", ROOT / "benchmarks" / "autoscale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("provider", sorted(CONFIGS))
def test_fake_config_keeps_cluster_yaml_node_types(provider):
    from ray.autoscaler._private.util import validate_config

    a = _autoscale()
    cluster = yaml.safe_load(CONFIGS[provider].read_text())
    cfg, changes = a.fake_config(cluster, cpus=2, idle_minutes=0.25, gcs_address="127.0.0.1:6379")
    validate_config(cfg)  # what the autoscaler runs on the file
    assert cfg["provider"]["type"] == "external" and cfg["provider"]["module"] == a.PROVIDER
    types = cfg["available_node_types"]
    workers = {n for n in cluster["available_node_types"] if n != cluster["head_node_type"]}
    assert set(types) == workers | {a.HEAD_TYPE} and cfg["head_node_type"] == a.HEAD_TYPE
    assert types[a.HEAD_TYPE]["resources"]["CPU"] == 1 and types[a.HEAD_TYPE]["max_workers"] == 0
    for name in workers:
        src, out = cluster["available_node_types"][name], types[name]
        assert (out["min_workers"], out["max_workers"]) == (src["min_workers"], src["max_workers"])
        assert out["labels"] == src.get("labels", {})
        assert 1 <= out["resources"]["CPU"] <= 2 and out["resources"]["GPU"] >= 1
    for k in ("max_workers", "upscaling_speed"):
        assert cfg[k] == cluster[k]
    assert changes["idle_timeout_minutes"] == (cluster["idle_timeout_minutes"], 0.25)
    assert cfg["idle_timeout_minutes"] == 0.25
    # the largest worker type is scaled to the machine's CPUs, the others by the same factor
    assert max(types[n]["resources"]["CPU"] for n in workers) == 2


def test_autoscaler_picks_the_worker_type_by_shape():
    """What cluster.yaml says of its worker types, by Ray's own scheduler (the v1 autoscaler's, which reads no
    labels): 1-GPU requests of a few CPUs go to gpu_inference first, gpu_train once that is at max_workers or a
    request needs more CPUs than gpu_inference has."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    a = _autoscale()
    cluster = yaml.safe_load(CONFIGS["aws"].read_text())
    head = cluster["head_node_type"]
    types = {n: {"resources": dict(zip(("CPU", "GPU"), a.node_shape("aws", n, nt))),
                 "max_workers": 0 if n == head else nt["max_workers"]}
             for n, nt in cluster["available_node_types"].items()}
    score = functools.partial(_default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary({}))

    def launched(bundle: dict, n: int) -> dict:
        return dict(get_nodes_for(types, {}, head, cluster["max_workers"], [bundle] * n, score)[0])

    assert launched({"CPU": 1, "GPU": 1}, 2) == {"gpu_inference": 2}
    assert launched({"CPU": 1, "GPU": 1}, 4) == {"gpu_inference": 2, "gpu_train": 2}
    assert launched({"CPU": 6, "GPU": 1}, 1) == {"gpu_train": 1}


def test_fake_provider_module_loads():
    sys.path.insert(0, str(ROOT / "benchmarks" / "fake_provider"))
    try:
        from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

        mod = importlib.import_module("kt_fake_provider")
        assert issubclass(mod.KtFakeMultiNodeProvider, FakeMultiNodeProvider)
    finally:
        sys.path.remove(str(ROOT / "benchmarks" / "fake_provider"))


@pytest.mark.skipif(os.environ.get("KT_AUTOSCALE") != "1",
                    reason="about 4 minutes: `make autoscale` or KT_AUTOSCALE=1 pytest tests/e2e/test_autoscaler.py")
def test_autoscaler_adds_cluster_yaml_nodes_for_a_sweep_and_removes_them_when_idle(tmp_path):
    out = tmp_path / "summary.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "autoscale.py"), "--json", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("autoscale: PASS"), (r.stdout + r.stderr)[-6000:]
    s = json.loads(out.read_text())
    assert not s["failed"]
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    declared = set(cluster["available_node_types"]) - {cluster["head_node_type"]}
    assert s["worker_nodes"] and set(s["worker_nodes"].values()) <= declared
    assert sum(s["train_workers_per_node"].values()) >= 2
