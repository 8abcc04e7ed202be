"""The offline demo pool: webdataset shards mixing real Fashion-MNIST with other real domains."""
import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from orchestrator.demo.pool import DOMAINS, PoolError, allocate, build_demo_pool


@pytest.fixture(scope="module")
def pool(tmp_path_factory, fmnist):
    out = tmp_path_factory.mktemp("pools") / "demo"
    target = fmnist.train.images[:200]
    return out, target, build_demo_pool(out, target, shard_size=150, seed=3)


def read_shards(out):
    """{key: {ext: bytes}} over all shards, in order."""
    samples = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_shards_hold_png_json_txt_per_key(pool):
    out, target, info = pool
    samples = read_shards(out)
    assert len(samples) == info["total"] == 200 + sum(n for d, n in info["counts"].items() if d != "fashion_mnist")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["pool.json"] + info["shards"] + [s.replace(".tar", "_stats.json") for s in info["shards"]])
    for key, files in samples.items():
        domain, num = key.rsplit("-", 1)
        assert domain in DOMAINS and len(num) == 7 and num.isdigit()
        img_ext = "jpg" if domain == "photo" else "png"
        assert set(files) == {img_ext, "json", "txt"}, key
        meta = json.loads(files["json"])
        assert meta["key"] == key and meta["domain"] == domain and meta["source"]
        assert files["txt"].decode().strip()
        im = Image.open(io.BytesIO(files[img_ext]))
        im.load()  # every image decodes
        assert (im.width, im.height) == (meta["width"], meta["height"])


def test_domains_mixed_and_target_kept_exactly(pool):
    out, target, info = pool
    samples = read_shards(out)
    counts = Counter(k.rsplit("-", 1)[0] for k in samples)
    assert counts["fashion_mnist"] == 200 and sum(counts.values()) - 200 >= 200
    assert {d for d in counts if counts[d]} >= {"fashion_mnist", "glyph", "icon", "photo"}  # sources on this image
    assert dict(counts) == {d: n for d, n in info["counts"].items() if n}
    img = np.asarray(Image.open(io.BytesIO(samples["fashion_mnist-0000007"]["png"])))
    assert img.shape == (28, 28) and np.array_equal(img, target[7, :, :, 0])
    glyph = Image.open(io.BytesIO(next(v["png"] for k, v in samples.items() if k.startswith("glyph"))))
    assert glyph.size == (64, 64)  # other domains keep their own resolution
    first = Counter(k.rsplit("-", 1)[0] for k in list(samples)[:150])
    assert len(first) >= 3  # shuffled: the first shard mixes domains
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["count"] == stats["successes"] == 150


def test_rebuild_is_a_noop_and_nothing_temporary_left(pool, fmnist):
    out, target, info = pool
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    assert build_demo_pool(out, target, shard_size=150, seed=3) == info
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    leftovers = [p.name for p in out.parent.iterdir() if p.name != "demo"] + \
        [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert leftovers == []


def test_same_params_same_bytes_other_params_rebuild(tmp_path, fmnist):
    target = fmnist.train.images[:30]
    a = build_demo_pool(tmp_path / "a", target, shard_size=1000, seed=1)
    b = build_demo_pool(tmp_path / "b", target, shard_size=1000, seed=1)
    assert (tmp_path / "a/00000.tar").read_bytes() == (tmp_path / "b/00000.tar").read_bytes()
    assert a["counts"] == b["counts"]
    c = build_demo_pool(tmp_path / "a", target, other_per_target=2.0, shard_size=1000, seed=1)
    assert c["params"]["other_per_target"] == 2.0 and c["total"] == 30 + 60
    assert json.loads((tmp_path / "a/pool.json").read_text())["total"] == 90
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_clear_errors(tmp_path, fmnist):
    with pytest.raises(PoolError, match="other_per_target >= 1"):
        build_demo_pool(tmp_path / "p", fmnist.train.images[:10], other_per_target=0.5)
    (tmp_path / "notpool").mkdir()
    (tmp_path / "notpool" / "x.txt").write_text("mine")
    with pytest.raises(PoolError, match="not a pool"):
        build_demo_pool(tmp_path / "notpool", fmnist.train.images[:10])
    with pytest.raises(PoolError, match="only 40 other-domain images.*1000 needed"):
        allocate(1000, {"digit": 2})


def test_allocate_follows_weights_and_spills_over_capacity():
    q = allocate(1000, {"glyph": 1000, "icon": 1000, "photo": 3, "digit": 1000})
    assert sum(q.values()) == 1000 and q == {"glyph": 350, "icon": 250, "photo": 250, "digit": 150}
    q = allocate(1000, {"glyph": 1000, "icon": 5, "digit": 1000})  # icon capped at 5 * 20, no photos
    assert sum(q.values()) == 1000 and q["icon"] == 100 and "photo" not in q and q["glyph"] > q["digit"]


def test_kt_make_demo_pool_max_target_caps_the_target_images(tmp_path):
    """`kt make-demo-pool --max-target N` (what `make demo` runs, with 20,000): the first N unlabeled images only,
    as many other-domain images, in ``<storage>/pools/<task>_demo_<N>``."""
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from tests.conftest import TASK

    r = CliRunner().invoke(app, ["make-demo-pool", str(TASK), "--max-target", "60", "--storage", str(tmp_path),
                                 "--set", "data.limit_train=400"])
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "pools" / "fashion_mnist_demo_60" / "pool.json").read_text())
    assert info["counts"]["fashion_mnist"] == 60 and info["total"] == 120
