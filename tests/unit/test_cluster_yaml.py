"""cluster.yaml (AWS) and cluster-gcp.yaml against the installed Ray's own cluster-launcher validation.

`ray up` runs ``prepare_config`` (merge with ``ray/autoscaler/{aws,gcp}/defaults.yaml``, fill per-type worker
bounds) then ``validate_config`` (``ray-schema.json`` + Ray's own checks), and only after that imports the cloud
SDK to bootstrap the provider. Those two steps read only local files, so they run here without boto3 or
google-api-python-client (``test_validation_needs_no_cloud_sdk`` proves it by blocking both imports).
Nothing is launched.
"""
from __future__ import annotations

import copy
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"aws": ROOT / "cluster.yaml", "gcp": ROOT / "cluster-gcp.yaml"}
WORKER_TYPES = ("gpu_inference", "gpu_train")
AWS_GPU_FAMILIES = ("g4dn", "g5", "g6", "g6e", "p3", "p4d", "p4de", "p5")


def load(provider: str) -> dict:
    return yaml.safe_load(CONFIGS[provider].read_text())


def prepared(config: dict) -> dict:
    """What `ray up` validates: the config merged with the provider defaults, then schema-checked."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(config))
    validate_config(cfg)
    return cfg


def head_start_cmd(cfg: dict) -> str:
    (cmd,) = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
    return cmd


def gpu_count(provider: str, node_type: dict) -> int:
    if provider == "aws":
        family = node_type["node_config"]["InstanceType"].split(".")[0]
        return 1 if family in AWS_GPU_FAMILIES else 0  # the chosen types all carry one GPU
    return sum(a["acceleratorCount"] for a in node_type["node_config"].get("guestAccelerators", []))


@pytest.fixture(params=sorted(CONFIGS))
def provider(request) -> str:
    return request.param


def test_passes_rays_own_validation(provider):
    cfg = prepared(load(provider))
    assert cfg["provider"]["type"] == provider and cfg["cluster_name"] == "kt"
    # prepare_config put setup_commands in front of the head/worker ones, as `ray up` will
    assert cfg["head_setup_commands"][0] == cfg["setup_commands"][0]


def test_validation_needs_no_cloud_sdk(provider, monkeypatch):
    for sdk in ("boto3", "botocore", "googleapiclient"):
        monkeypatch.setitem(sys.modules, sdk, None)  # any import of it now raises ImportError
    prepared(load(provider))


def test_head_has_no_gpu(provider):
    cfg = prepared(load(provider))
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("GPU") == 0
    assert gpu_count(provider, head) == 0
    assert head["max_workers"] == 0  # filled in by prepare_config
    if provider == "gcp":  # declared explicitly: the head's CPUs stay schedulable for trial drivers
        assert head["resources"]["CPU"] > 0


def test_gpu_worker_types(provider):
    cfg = prepared(load(provider))
    types = cfg["available_node_types"]
    for name in WORKER_TYPES:
        nt = types[name]
        assert gpu_count(provider, nt) >= 1, name
        if provider == "aws":
            # resources are auto-detected from InstanceType; a declared GPU count would override it
            assert "GPU" not in nt["resources"]
            assert nt["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        else:
            assert nt["resources"]["GPU"] == gpu_count(provider, nt)
            assert nt["resources"]["CPU"] >= 1
            items = {i["key"]: i["value"] for i in nt["node_config"]["metadata"]["items"]}
            assert items["install-nvidia-driver"] == "True"
            sched = nt["node_config"]["scheduling"]
            assert isinstance(sched, dict)  # GCE's Scheduling is an object (ray-project/ray#46248)
            assert sched["preemptible"] is True and sched["onHostMaintenance"] == "TERMINATE"
            assert sched["automaticRestart"] is False
    if provider == "aws":  # one AMI for all node types, and it has to be set before `ray up`
        assert len({nt["node_config"]["ImageId"] for nt in types.values()}) == 1


def test_node_labels_are_valid(provider):
    from ray._private.label_utils import validate_node_labels

    for nt in load(provider)["available_node_types"].values():
        validate_node_labels(nt.get("labels", {}))


def test_autoscaling_bounds(provider):
    cfg = prepared(load(provider))
    types = cfg["available_node_types"]
    assert sum(nt["min_workers"] for nt in types.values()) <= cfg["max_workers"]
    for name in WORKER_TYPES:
        assert types[name]["min_workers"] == 0
        assert 1 <= types[name]["max_workers"] <= cfg["max_workers"], name
    assert cfg["idle_timeout_minutes"] > 0


def test_dashboard_and_mlflow_are_loopback_only(provider):
    cfg = prepared(load(provider))
    start = head_start_cmd(cfg)
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", start)
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in start and "KT_TRACKING_URI=http://127.0.0.1:5000" in start
    (mlflow,) = [c for c in cfg["head_start_ray_commands"] if "mlflow server" in c]
    assert re.search(r"--host[= ]127\.0\.0\.1\b", mlflow) and re.search(r"--port[= ]5000\b", mlflow)
    assert "nohup" in mlflow and mlflow.rstrip().endswith("&")
    assert "sqlite:////home/ray/kt_runs/mlflow.db" in mlflow  # absolute: 4 slashes
    every_cmd = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
                         + cfg["head_setup_commands"] + cfg["worker_setup_commands"])
    assert "0.0.0.0" not in every_cmd
    # the rest of Ray's default start commands is kept
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start and "--port=6379" in start
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])


def test_token_auth_on_every_node(provider):
    cfg = prepared(load(provider))
    assert "RAY_AUTH_MODE=token" in head_start_cmd(cfg)
    assert any("RAY_AUTH_MODE=token" in c and "ray start" in c for c in cfg["worker_start_ray_commands"])
    remote = [r for r, local in cfg["file_mounts"].items() if local == "~/.ray/kt_cluster"]
    assert remote, "the token directory is not mounted"
    assert any(f"{remote[0]}/auth_token ~/.ray/auth_token" in c for c in cfg["setup_commands"])


def test_no_ingress_but_ssh(provider):
    cfg = load(provider)

    def walk(node):
        if isinstance(node, dict):
            if "FromPort" in node or "ToPort" in node:
                yield node
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    for rule in walk(cfg):
        assert rule.get("FromPort") == 22 and rule.get("ToPort") == 22, rule
    for nt in cfg["available_node_types"].values():
        nc = nt["node_config"]
        assert "SecurityGroupIds" not in nc and "NetworkInterfaces" not in nc  # AWS: only Ray's SSH-only group
        assert not {"http-server", "https-server"} & set(nc.get("tags", {}).get("items", []))  # GCP tags
    if provider == "aws":
        for rule in cfg["provider"]["security_group"]["IpPermissions"]:
            assert rule["FromPort"] == rule["ToPort"] == 22


def test_project_install_and_image(provider):
    import ray

    cfg = load(provider)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert any(d.startswith("ray[") and d.endswith(f"=={ray.__version__}")
               for d in pyproject["project"]["dependencies"])
    assert cfg["file_mounts"]["~/kt"] == "."
    assert "pip install -q -e ~/kt" in cfg["setup_commands"]
    assert ".gitignore" in cfg["rsync_filter"]  # .venv/ and kt_runs/ are not uploaded
    image, tag = cfg["docker"]["image"].split(":")
    assert image == "rayproject/ray" and tag.endswith("-gpu")
    assert tag.startswith(f"{ray.__version__}-py"), "image's Ray must match the installed Ray"


@pytest.mark.parametrize("where", ["node_type", "top_level"])
def test_misspelt_key_is_rejected(provider, where):
    import jsonschema

    cfg = load(provider)
    if where == "node_type":
        nt = cfg["available_node_types"]["gpu_train"]
        nt["min_worker"] = nt.pop("min_workers")
    else:
        cfg["max_worker"] = cfg.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="min_worker|max_worker"):
        prepared(cfg)


def test_inconsistent_bounds_are_rejected(provider):
    cfg = load(provider)
    cfg["available_node_types"]["gpu_train"]["min_workers"] = cfg["max_workers"] + 1
    with pytest.raises(ValueError, match="smaller than the sum of `min_workers`"):
        prepared(cfg)
