"""`kt run` on a user's RGB ImageFolder of mixed sizes and modes at 128 px, streamed from its image shards with
a decode limit below the set's size: any stage that decodes the whole set into one array fails the run."""
import numpy as np
import pytest

from orchestrator.data.shards import DECODE_LIMIT_ENV
from tests.conftest import ROOT, run_kt
from tests.pools import write_mixed_image_folder

pytestmark = pytest.mark.e2e


def test_mixed_mode_image_folder_streams_through_kt_run(tmp_path, fmnist):
    idx = np.concatenate([np.flatnonzero(fmnist.train.labels == c)[:48] for c in range(3)])
    counts = write_mixed_image_folder(tmp_path / "task", fmnist.train.images[idx], fmnist.train.labels[idx],
                                      ["tshirt", "trouser", "pullover"])
    per_image = 128 * 128 * 3
    limit = 40 * per_image  # a third of the train split: batches (32) decode, the whole split cannot
    assert counts["train"] * per_image > 2.5 * limit
    sets = ["data.root=" + str(tmp_path / "task"), "data.channels=3", "data.image_size=128",
            "data.in_memory_max_mb=0", "teacher.inference_batch_size=32", "distill.batch_size=32",
            "teacher.finetune.batch_size=32"]
    r = run_kt("run", str(ROOT / "tasks" / "font_digits.yaml"), "--smoke", "--storage", str(tmp_path / "s"),
               *[a for s in sets for a in ("--set", s)], env={DECODE_LIMIT_ENV: str(limit)}, own_ray=True)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"skipped {counts['hidden']} hidden files" in r.stderr
    assert f"{counts['train']} images (" in r.stderr and "stream from their image shards" in r.stderr
    assert "student (distilled + finetuned)" in r.stdout
    assert list((tmp_path / "s" / "cache" / "image_shards").glob("*/shard-00000.tar"))
    assert not list((tmp_path / "s" / "cache").rglob("images.npy"))  # the transfer set is a manifest of rows
