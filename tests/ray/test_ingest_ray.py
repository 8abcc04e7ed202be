"""An ImageFolder checked in Ray Data tasks (``read_binary_files``) writes the same image shards as the check in
this process, and names every unreadable file in one error."""
import numpy as np
import pytest

from orchestrator.data import DataError
from orchestrator.data.ingest import list_image_folder, write_store
from orchestrator.data.shards import ShardedImages
from tests.pools import write_mixed_image_folder

pytestmark = pytest.mark.ray


def test_ray_data_ingest_equals_in_process_and_lists_every_bad_file(local_ray, tmp_path, fmnist, monkeypatch):
    from orchestrator.ray_adapters.ingest import ray_data_runner, use_ray_data

    root = tmp_path / "task"
    write_mixed_image_folder(root, fmnist.train.images[:60], fmnist.train.labels[:60] % 3, ["a", "b", "c"])
    listing = list_image_folder(root)
    info = write_store(listing, tmp_path / "ray", 3, 32, ray_data_runner, batch_size=16)
    write_store(listing, tmp_path / "local", 3, 32)
    assert info["images"] == len(listing.paths) == 60
    rows = np.arange(60)
    ray_view, local_view = (ShardedImages(str(tmp_path / d), rows, (32, 32), 3, True) for d in ("ray", "local"))
    np.testing.assert_array_equal(ray_view.materialize(), local_view.materialize())
    assert use_ray_data("auto", 20_000) and not use_ray_data("auto", 19_999) and use_ray_data("ray_data", 1)
    assert not use_ray_data("in_process", 10**6)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # alone on one machine: the in-process threads
    assert not use_ray_data("auto", 10**6)

    for p in (root / "train" / "a" / "bad1.png", root / "test" / "b" / "bad2.jpg"):
        p.write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError, match="2 image files under .* cannot be used") as e:
        write_store(list_image_folder(root), tmp_path / "bad", 3, 32, ray_data_runner, batch_size=16)
    assert "bad1.png" in str(e.value) and "bad2.jpg" in str(e.value)
