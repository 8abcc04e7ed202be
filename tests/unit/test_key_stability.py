"""Moving code must not move a cache key: the smoke run's stage keys, computed now, equal the keys recorded in
tests/data/smoke_stage_keys.json by the code before the package layout changed (commit 7c38aef, before the
streaming data plane too), so every cached entry of an existing storage stays a hit."""
import json
from pathlib import Path

from orchestrator.config import load_config
from orchestrator.graph import stage_key
from orchestrator.methods.common import load_data
from orchestrator.transfer_sets.base import TRANSFER_SETS, TransferContext
from tests.conftest import TASK

RECORDED = Path(__file__).resolve().parents[1] / "data" / "smoke_stage_keys.json"


def smoke_stage_keys() -> dict[str, str]:
    cfg = load_config(TASK, smoke=True)
    task, split, _ = load_data(cfg)
    keys: dict[str, str] = {}
    keys["data"] = stage_key("data", cfg, keys, {"train": task.train.content_hash(), "split": split.key()})
    for s in ("teacher", "adapted_teacher"):
        keys[s] = stage_key(s, cfg, keys)
    ts = TRANSFER_SETS.get(cfg.transfer_set.source)(TransferContext(task, split), cfg.transfer_set)
    keys["transfer_set"] = stage_key("transfer_set", cfg, keys, {"images": ts.key})
    for s in ("teacher_outputs", "distill", "finetune", "baseline"):
        keys[s] = stage_key(s, cfg, keys)
    return keys


def test_the_smoke_runs_stage_keys_survive_the_moves():
    assert smoke_stage_keys() == json.loads(RECORDED.read_text())
