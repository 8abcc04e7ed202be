"""Storage URIs and the cache on shared remote storage: two "nodes" are two Cache instances with different
local mirrors (KT_MIRROR) over one fsspec in-memory filesystem (process-global) or one file:// directory."""
import pickle
import time
from pathlib import Path

import fsspec
import pyarrow.fs as pafs
import pytest

from orchestrator import storage as st
from orchestrator.cache import Cache

URI = "memory://bucket/runs"


@pytest.fixture(autouse=True)
def clean_memory_fs():
    mem = fsspec.filesystem("memory")
    mem.store.clear()
    mem.pseudo_dirs.clear()
    mem.pseudo_dirs.append("")
    yield
    mem.store.clear()
    mem.pseudo_dirs.clear()
    mem.pseudo_dirs.append("")


def node(monkeypatch, tmp_path: Path, name: str, uri: str = URI) -> Cache:
    """A Cache as seen from node ``name`` (its own local mirror)."""
    monkeypatch.setenv("KT_MIRROR", str(tmp_path / f"mirror-{name}"))
    return Cache(uri)


def remote_files(uri: str) -> dict[str, bytes]:
    fs, path = fsspec.core.url_to_fs(uri)
    return {p[len(path) + 1:]: fs.cat_file(p) for p in fs.find(path)}


def local_tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("s, expected", [
    ("s3://bucket/prefix", True), ("gs://b/p", True), ("memory://x", True), ("file:///tmp/x", True),
    ("hdfs://nn:8020/p", True), ("/abs/path", False), ("rel/path", False), ("C:\\data\\x", False),
    ("C:/data/x", False), ("", False), (Path("/x"), False)])
def test_is_uri(s, expected):
    assert st.is_uri(s) is expected


def test_filesystem_resolution_and_errors(tmp_path):
    fs, path = st.filesystem(f"file://{tmp_path}/store/")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/store"
    fs, path = st.filesystem(URI)
    assert isinstance(fs, pafs.PyFileSystem) and path == "/bucket/runs"
    with pytest.raises(st.StorageError, match="nosuch://x") as e:
        st.filesystem("nosuch://x")
    assert isinstance(e.value, ValueError)
    with pytest.raises(st.StorageError, match="not a storage URI"):
        st.filesystem("/plain/path")


def test_mirror_root(monkeypatch, tmp_path):
    monkeypatch.delenv("KT_MIRROR", raising=False)
    a, b = st.mirror_root("s3://a/p"), st.mirror_root("s3://b/p")
    assert a.parent == Path.home() / ".cache" / "kt" / "mirror" and len(a.name) == 12 and a != b
    monkeypatch.setenv("KT_MIRROR", str(tmp_path))
    assert st.mirror_root("s3://a/p") == tmp_path


def test_transfer_helpers(tmp_path):
    fs, base = st.filesystem(URI)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"\x00\x01" * 1000)
    (src / "sub" / "b.txt").write_text("b")
    (src / "_COMPLETE").write_text("")
    (src / ".a.bin.tmp-1234").write_text("in flight")  # temporaries are never uploaded
    assert st.upload_dir(src, fs, base + "/d", last="_COMPLETE") == ["a.bin", "sub/b.txt", "_COMPLETE"]
    assert st.list_files(fs, base + "/d") == {"a.bin": 2000, "sub/b.txt": 1, "_COMPLETE": 0}
    assert st.exists(fs, base + "/d/a.bin") and not st.exists(fs, base + "/d/nope")
    out = st.download_dir(fs, base + "/d", tmp_path / "dst", last="_COMPLETE")
    assert local_tree(out) == {k: v for k, v in local_tree(src).items() if not k.startswith(".")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no temporaries left
    assert st.list_files(fs, base + "/missing") == {}


def test_entry_written_on_one_node_is_a_hit_on_another(monkeypatch, tmp_path):
    a = node(monkeypatch, tmp_path, "a")
    assert a.root == tmp_path / "mirror-a" / "cache" and a.remote == URI + "/cache"
    assert a.describe() == f"{URI}/cache (mirror {a.root})"
    assert a.lookup("k", "abc") is None
    with a.write("k", "abc", {"a": 1}) as d:
        (d / "x.bin").write_bytes(b"payload")
        (d / "sub").mkdir()
        (d / "sub" / "y.txt").write_text("y")
    assert set(remote_files(URI + "/cache/k/abc")) == {"x.bin", "sub/y.txt", "_meta.json", "_COMPLETE"}
    assert (a.lookup("k", "abc") / "x.bin").read_bytes() == b"payload"

    b = node(monkeypatch, tmp_path, "b")
    assert not b.path("k", "abc").exists()
    hit = b.lookup("k", "abc")
    assert hit == tmp_path / "mirror-b" / "cache" / "k" / "abc"
    assert local_tree(hit) == local_tree(a.path("k", "abc"))
    assert [p.name for p in hit.parent.iterdir()] == ["abc"]  # no download temporaries left
    assert b.lookup("k", "abc") == hit  # now a local hit
    assert a.counters() == {"cache_hits_k": 1, "cache_misses_k": 1}
    assert b.counters() == {"cache_hits_k": 2}
    assert pickle.loads(pickle.dumps(b)).lookup("k", "abc") == hit  # picklable for Ray workers


def test_interrupted_upload_is_a_miss(monkeypatch, tmp_path):
    mem = fsspec.filesystem("memory")
    mem.pipe("/bucket/runs/cache/k/abc/x.bin", b"half")  # files uploaded, no _COMPLETE
    mem.pipe("/bucket/runs/cache/k/abc/_meta.json", b"{}")
    b = node(monkeypatch, tmp_path, "b")
    assert b.lookup("k", "abc") is None and not b.path("k", "abc").exists()


def test_upload_failure_publishes_nothing(monkeypatch, tmp_path):
    a = node(monkeypatch, tmp_path, "a")
    real = st.upload_file

    def failing(local, fs, path):
        if path.endswith("_COMPLETE"):
            raise OSError("network down")
        real(local, fs, path)

    monkeypatch.setattr(st, "upload_file", failing)
    with pytest.raises(OSError, match="network down"):
        with a.write("k", "abc") as d:
            (d / "x.bin").write_bytes(b"payload")
    assert list((a.root / "k").iterdir()) == []  # nothing published locally
    assert "_COMPLETE" not in remote_files(URI + "/cache/k/abc")
    monkeypatch.setattr(st, "upload_file", real)
    assert node(monkeypatch, tmp_path, "b").lookup("k", "abc") is None


def test_failure_inside_write_publishes_nothing(monkeypatch, tmp_path):
    a = node(monkeypatch, tmp_path, "a")
    with pytest.raises(RuntimeError):
        with a.write("k", "abc") as d:
            (d / "x.txt").write_text("partial")
            raise RuntimeError("stage crashed")
    assert list((a.root / "k").iterdir()) == []
    assert remote_files(URI + "/cache") == {}
    assert a.lookup("k", "abc") is None


def test_concurrent_remote_winner_is_kept(monkeypatch, tmp_path):
    a = node(monkeypatch, tmp_path, "a")
    b = node(monkeypatch, tmp_path, "b")
    assert b.lookup("k", "abc") is None  # B starts computing before A publishes
    with a.write("k", "abc", {"by": "a"}) as d:
        (d / "x.txt").write_text("from a")
    with b.write("k", "abc", {"by": "b"}) as d:
        (d / "x.txt").write_text("from b")
    assert remote_files(URI + "/cache/k/abc")["x.txt"] == b"from a"
    assert (b.path("k", "abc") / "x.txt").read_text() == "from a"  # B's mirror holds the winner
    assert '"a"' in (b.path("k", "abc") / "_meta.json").read_text()
    assert [p.name for p in (b.root / "k").iterdir()] == ["abc"]


def test_incremental_parts_are_shared_across_nodes(monkeypatch, tmp_path):
    a = node(monkeypatch, tmp_path, "a")
    da = a.incremental("emb", "e1")
    assert da == a.path("emb", "e1") and da.is_dir()
    (da / "000000.parquet").write_bytes(b"shard0")
    (da / "000000.json").write_text('{"index": 0}')
    assert a.publish_part("emb", "e1", "000000.parquet", "000000.json") == [
        f"{URI}/cache/emb/e1/000000.parquet", f"{URI}/cache/emb/e1/000000.json"]
    (da / "000001.parquet").write_bytes(b"shard1, never published")  # A dies before publishing its marker
    with pytest.raises(ValueError, match="_COMPLETE"):
        a.publish_part("emb", "e1", "_COMPLETE")

    b = node(monkeypatch, tmp_path, "b")
    assert b.lookup("emb", "e1") is None  # parts alone are not an entry
    db = b.incremental("emb", "e1")  # resumed on node B: A's published shard is already there
    assert (db / "000000.json").is_file() and (db / "000000.parquet").read_bytes() == b"shard0"
    assert not (db / "000001.parquet").exists()
    (db / "000001.parquet").write_bytes(b"shard1")
    (db / "000001.json").write_text('{"index": 1}')
    (db / "000002.parquet").write_bytes(b"shard2")  # written but not published: complete() uploads it
    b.publish_part("emb", "e1", "000001.parquet", "000001.json")
    assert b.complete("emb", "e1", {"images": 3}) == db
    assert b.lookup("emb", "e1") == db
    assert set(remote_files(URI + "/cache/emb/e1")) == {
        "000000.parquet", "000000.json", "000001.parquet", "000001.json", "000002.parquet", "_meta.json",
        "_COMPLETE"}

    c = node(monkeypatch, tmp_path, "c")
    assert local_tree(c.lookup("emb", "e1")) == local_tree(db)
    # A's mirror had an unfinished copy (with a stale, different part): lookup replaces it by the remote entry
    assert local_tree(a.lookup("emb", "e1")) == local_tree(db)


def test_complete_after_another_node_completed_keeps_its_copy(monkeypatch, tmp_path):
    a = node(monkeypatch, tmp_path, "a")
    b = node(monkeypatch, tmp_path, "b")
    (a.incremental("emb", "e1") / "000000.parquet").write_bytes(b"s0")
    (b.incremental("emb", "e1") / "000000.parquet").write_bytes(b"s0")
    a.complete("emb", "e1", {"by": "a"})
    b.complete("emb", "e1", {"by": "b"})
    assert '"a"' in (b.path("emb", "e1") / "_meta.json").read_text()
    meta_a = (a.path("emb", "e1") / "_meta.json").read_bytes()
    assert remote_files(URI + "/cache/emb/e1")["_meta.json"] == meta_a
    assert (b.path("emb", "e1") / "_COMPLETE").is_file()


def test_file_uri_round_trip(monkeypatch, tmp_path):
    uri = f"file://{tmp_path}/shared"
    a = node(monkeypatch, tmp_path, "a", uri)
    assert isinstance(a.fs, pafs.LocalFileSystem)
    with a.write("k", "abc", {"a": 1}) as d:
        (d / "x.bin").write_bytes(b"\x00" * 4096)
    assert (tmp_path / "shared" / "cache" / "k" / "abc" / "_COMPLETE").is_file()
    assert not [p for p in (tmp_path / "shared").rglob(".*")]  # upload temporaries renamed away
    b = node(monkeypatch, tmp_path, "b", uri)
    hit = b.lookup("k", "abc")
    assert hit == tmp_path / "mirror-b" / "cache" / "k" / "abc"
    assert local_tree(hit) == local_tree(a.path("k", "abc"))


def test_local_path_cache_is_unchanged(monkeypatch, tmp_path):
    monkeypatch.setenv("KT_MIRROR", str(tmp_path / "unused"))
    for storage in (tmp_path / "s1", str(tmp_path / "s2")):
        cache = Cache(storage)
        assert cache.root == Path(storage) / "cache" and cache.remote is None and cache.uri is None
        assert cache.describe() == str(cache.root)
        assert cache.lookup("k", "abc") is None
        with cache.write("k", "abc", {"a": 1}) as d:
            (d / "x.txt").write_text("ok")
        assert (cache.lookup("k", "abc") / "x.txt").read_text() == "ok"
        d = cache.incremental("emb", "e")
        (d / "p.bin").write_bytes(b"p")
        assert cache.publish_part("emb", "e", "p.bin") == []
        assert cache.lookup("emb", "e") is None
        cache.complete("emb", "e", {"n": 1})
        assert cache.lookup("emb", "e") == d
        assert cache.counters() == {"cache_hits_k": 1, "cache_hits_emb": 1, "cache_misses_k": 1,
                                    "cache_misses_emb": 1}
    assert not (tmp_path / "unused").exists()


def _claim_and_build(root: str, name: str, started, log) -> None:
    """In a child process: claim entry ("k", "abc"); build it slowly when the claim yields nothing."""
    import time

    from orchestrator.cache import Cache

    cache = Cache(Path(root))
    started.set()
    with cache.claim("k", "abc") as hit:
        if hit is None:
            with cache.write("k", "abc") as tmp:
                (tmp / "who.txt").write_text(name)
                time.sleep(1.5)
            log.put((name, "built"))
        else:
            log.put((name, "reused " + (hit / "who.txt").read_text()))


def test_two_processes_claiming_one_entry_build_it_once(tmp_path):
    """Two processes need the same missing entry at once: one builds it, the other waits on the node's lock and
    reuses it (counted as a hit); a lock left by a killed holder does not block (the kernel releases flock)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    log = ctx.Queue()
    events = [ctx.Event(), ctx.Event()]
    procs = [ctx.Process(target=_claim_and_build, args=(str(tmp_path), n, e, log)) for n, e in zip("ab", events)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    got = dict(log.get(timeout=5) for _ in procs)
    builder = next(n for n, v in got.items() if v == "built")
    assert sorted(got.values()) == ["built", f"reused {builder}"]
    assert len([d for d in (tmp_path / "cache" / "k").iterdir() if not d.name.startswith(".")]) == 1

    killer = ctx.Process(target=_hold_lock_forever, args=(str(tmp_path),))
    killer.start()
    time.sleep(2.0)
    killer.kill()  # SIGKILL while holding the lock of ("k", "other")
    killer.join()
    cache = Cache(tmp_path)
    with cache.claim("k", "other") as hit:
        assert hit is None  # not blocked: the dead holder's lock went with it
    with cache.claim("k", "abc") as hit:
        assert hit is not None and cache.hits["k"] == 1


def _hold_lock_forever(root: str) -> None:
    import time

    from orchestrator.cache import Cache

    with Cache(Path(root)).claim("k", "other"):
        time.sleep(600)


def test_runs_started_in_the_same_second_get_directories_of_their_own(tmp_path):
    from orchestrator.commands.run import new_dir

    made = [new_dir(tmp_path / "runs", "task-20261201-120000") for _ in range(3)]
    assert [d.name for d in made] == ["task-20261201-120000", "task-20261201-120000-2", "task-20261201-120000-3"]
    assert all(d.is_dir() for d in made)
