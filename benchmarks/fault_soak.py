"""Fault-injection soak: SIGKILL a sweep, a run, a trial's process and a worker node at points spread over
their lives, resume, and check that nothing was lost or done twice.

Phases (each on the smoke profile, real Fashion-MNIST, the ImageNet EfficientNet-Lite0 teacher):

1. **Sweep** (`kt sweep`, 3 trials one at a time, on a local `ray start` cluster this script owns): the driver
   is SIGKILLed while the teacher is adapted (the prepare step), during teacher inference, mid-distillation of
   trial 1 (in process: the demo's one CPU worker runs in the trial's own process), during its finetune, the
   instant its commit (``final.json``) appears (its result half-recorded: the point that once made a resumed
   sweep train a finished trial again), between trials; and the last trial's own process is SIGKILLed
   mid-epoch (Tune retries the trial). Each kill is followed by ``kt sweep --resume``.
   Invariants: every trial finished exactly once (``attempts.log``: one ``finished``, no ``start`` after it), a
   trial killed mid-way resumed from its checkpoint, one MLflow child run per trial (all FINISHED), the parent
   FINISHED, CSV rows = trials, no cache entry without its ``_COMPLETE`` marker.
2. **Run** (`kt run`): killed during teacher adaptation, teacher inference, distillation (in process),
   finetune/baseline
   and export, re-run after each. Invariants: the last run finishes with its result and student, it resumed
   distillation from a checkpoint, the teacher's outputs were made once, no half-written cache entry.
3. **Worker node** (``ray.cluster_utils.Cluster``: a head and two worker nodes, each with its own local cache
   mirror over one ``file://`` storage URI): a 2-trial sweep whose trials (each on a Ray Train worker group of
   one, ``distill.execution: worker_group``) and teacher inference (2 Ray Data actors) run on both workers; one
   worker node is removed once both trials have checkpointed. Invariants: both
   trials finish exactly once, the lost one resumed from its checkpoint on the other node.

4. **Streaming ImageFolder** (`kt run` on a 7,500-file RGB ImageFolder that streams from its image shards):
   killed while the folder is being ingested and mid-epoch of the streaming distillation. Invariants: one
   image-shards entry holding every file exactly once, no whole-array copy of the images, the re-run resumed
   distillation from its checkpoint, no half-written cache entry.

A kill point that the process passed before the watcher saw it is reported as missed (and not counted as a
kill). The last line: ``N kills, M invariant violations``.

    python benchmarks/fault_soak.py            # about 5 minutes on a 2-core CPU machine (make soak)
    python benchmarks/fault_soak.py --phases sweep
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.session_procs import session_pids, stop_session  # noqa: E402
TASK = ROOT / "tasks" / "fashion_mnist.yaml"
PY = sys.executable
KILLS: list[str] = []  # the kill points that landed
VIOLATIONS: list[str] = []


def say(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def check(ok: bool, what: str) -> None:
    """Record invariant ``what``; a failure is a violation (printed, counted, the soak goes on)."""
    say(("ok: " if ok else "VIOLATION: ") + what)
    if not ok:
        VIOLATIONS.append(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCluster:
    """`ray start --head --block` on free ports in a session of its own; stopped by SIGTERM, then SIGKILL of
    its own process group (nothing else on the machine)."""

    def __init__(self, log: Path):
        self.gcs, dash = free_port(), free_port()
        ray = str(Path(PY).parent / "ray")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        subprocess.run([ray, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
        self.p = subprocess.Popen([ray, "start", "--head", "--block", "--num-cpus", "2", "--port", str(self.gcs),
                                   "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
                                   "--dashboard-port", str(dash), "--object-store-memory", str(2 * 1024**3),
                                   "--disable-usage-stats"], env=env, cwd=ROOT, stdout=open(log, "w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        self.address = f"127.0.0.1:{self.gcs}"
        deadline = time.time() + 120
        while subprocess.run([ray, "status", "--address", self.address], env=env, capture_output=True).returncode:
            if self.p.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start failed: {log.read_text()[-2000:]}")
            time.sleep(1)

    def pids(self, title: str) -> list[int]:
        """The processes of this cluster (its session) whose command line contains ``title``."""
        return session_pids(self.p.pid, title)

    def stop(self) -> None:
        stop_session(self.p)


def kt(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    """`kt ARGS` in a session of its own (killed with its process group), output appended to ``log``."""
    f = open(log, "a")
    f.write(f"\n==== kt {' '.join(args)}\n")
    f.flush()
    return subprocess.Popen([PY, "-m", "orchestrator.cli", *args], cwd=ROOT, env=env, stdout=f,
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_when(p: subprocess.Popen, point: str, ready, delay: float = 0.0, timeout: float = 900) -> bool:
    """SIGKILL ``p``'s process group once ``ready()`` holds (polled every 20 ms), ``delay`` seconds later.
    Returns whether the kill landed (False: ``p`` ended first or the point never came)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            time.sleep(delay)
            if p.poll() is not None:
                break
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            KILLS.append(point)
            say(f"killed at: {point}")
            return True
        if p.poll() is not None:
            break
        time.sleep(0.02)
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    say(f"missed kill point: {point} (the process ended first, rc={p.returncode})")
    return False


def segment(log: Path) -> str:
    """The output of the last `kt` started with :func:`kt` on ``log``."""
    return log.read_text(errors="replace").rsplit("\n==== kt ", 1)[-1]


def globbed(root: Path, pattern: str, n: int = 1):
    return lambda: len(list(root.glob(pattern))) >= n


def incomplete_entries(storage: Path) -> list[str]:
    """Cache entry directories without their ``_COMPLETE`` marker (temporary ``.tmp-*`` siblings of killed
    writers are not entries: nothing reads them). Incremental kinds publish parts before completing."""
    cache = storage / "cache"
    bad = []
    for kind in cache.iterdir() if cache.is_dir() else []:
        if kind.name.startswith(".") or kind.name in ("embeddings",):
            continue
        bad += [f"{kind.name}/{e.name}" for e in kind.iterdir() if not e.name.startswith(".")
                and e.is_dir() and not (e / "_COMPLETE").is_file()]
    return bad


def wait(p: subprocess.Popen, what: str, timeout: float = 1200) -> int:
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        rc = p.wait()
    check(rc == 0, f"{what} ended with rc 0 (rc={rc})")
    return rc


def sweep_space(name: str, trials: int, concurrent: int, epochs: int, **fixed) -> dict:
    tiny = {"id": "timm/resnet10t", "model_kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8}}
    return {"name": name, "search": {"num_trials": trials, "max_concurrent_trials": concurrent, "seed": 0},
            "resources": {"cpus_per_worker": 0.9, "trial_driver_cpus": 0.1, "max_failures": 2},
            "validation_per_class": 5,
            "fixed": {"distill.epochs": epochs, "distill.batch_size": 64, "finetune.epochs": 1,
                      "transfer_set.source": "target_unlabeled", "transfer_set.max_images": 400, **fixed},
            "space": {"distill.ce_weight": {"uniform": [0.0, 1.0]},
                      "student": {"choice": {"r10t_w8": tiny, "mnv3": {"id": "timm/mobilenetv3_small_050"}}}}}


def sweep_invariants(storage: Path, name: str, trials: int, killed_mid_distill: set[str]) -> None:
    import mlflow

    sdir = storage / "sweeps" / name
    tdirs = sorted(d for d in (sdir / "trials").iterdir() if d.is_dir())
    check(len(tdirs) == trials, f"{trials} trial directories ({len(tdirs)})")
    for d in tdirs:
        log = (d / "attempts.log").read_text().split("\n") if (d / "attempts.log").is_file() else []
        fin = [i for i, line in enumerate(log) if line.endswith(" finished")]
        again = [line for line in log[fin[0] + 1:] if line.endswith(" start")] if fin else []
        check(len(fin) == 1 and not again, f"trial {d.name} finished exactly once, not started after ({log})")
        check((d / "final.json").is_file() and (d / "row.json").is_file(), f"trial {d.name} committed and in the ledger")
    rows = [json.loads((d / "row.json").read_text()) for d in tdirs if (d / "row.json").is_file()]
    check([r["status"] for r in rows] == ["completed"] * trials, f"every row completed ({[r['status'] for r in rows]})")
    for r in rows:
        if r["trial_id"] in killed_mid_distill:
            check((r.get("distill_restarts") or 0) >= 1, f"trial {r['trial_id']} resumed distillation from its "
                                                         f"checkpoint (restarts {r.get('distill_restarts')})")
    with open(sdir / "trials.csv") as f:
        n_csv = len(list(csv.DictReader(f)))
    check(n_csv == trials, f"CSV has one row per trial ({n_csv})")
    state = json.loads((sdir / "sweep.json").read_text())
    client = mlflow.MlflowClient(state["tracking_uri"])
    parent = client.get_run(state["parent_run_id"])
    check(parent.info.status == "FINISHED", f"parent run FINISHED ({parent.info.status})")
    kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    ids = sorted(k.data.tags.get("kt.trial_id") for k in kids)
    check(ids == [d.name for d in tdirs], f"one MLflow child run per trial ({ids})")
    check(all(k.info.status == "FINISHED" for k in kids), "every child run FINISHED")
    bad = incomplete_entries(storage)
    check(not bad, f"no half-written cache entry ({bad})")


def phase_sweep(work: Path, cluster: RayCluster) -> None:
    say("phase 1: sweep killed at 6 points, and an in-process trial's own process killed mid-epoch")
    storage, name, log = work / "sweep", "soak", work / "sweep.log"
    space = work / "space.yaml"
    import yaml

    space.write_text(yaml.safe_dump(sweep_space(name, 3, 1, 3)))
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONUNBUFFERED": "1"}
    args = ["sweep", str(space), "--task", str(TASK), "--smoke", "--storage", str(storage), "--name", name]
    cache, trials = storage / "cache", storage / "sweeps" / name / "trials"
    train = storage / "sweeps" / name / "train"

    def running() -> list[Path]:  # trial directories without a row: started, not ended
        return [d for d in trials.iterdir() if d.is_dir() and not (d / "row.json").is_file()] if trials.is_dir() else []

    points = [
        ("sweep: prepare, adapting the teacher", globbed(cache, "adapted_teacher/.tmp-*"), 0.5),
        ("sweep: prepare, teacher inference", globbed(cache, "teacher_outputs/.tmp-*"), 0.0),
        ("sweep: trial 1 mid-distillation (in the trial's process)", globbed(train, "*/kt_state.pt"), 0.0),
        ("sweep: trial 1 finetune (in the trial's process, after its last epoch)",
         lambda: "distill epoch 3/3" in segment(log), 2.5),
        ("sweep: trial 1 recording its result (final.json, no row)", globbed(trials, "*/final.json"), 0.0),
        ("sweep: between trials (trial 2's row written)", globbed(trials, "*/row.json", 2), 0.0),
    ]
    mid = set()
    resume = False
    for point, ready, delay in points:
        p = kt(args + (["--resume"] if resume else []), log, env)
        if kill_when(p, point, ready, delay) and "mid-distillation" in point:
            mid.update(d.name for d in running())
        resume = resume or (storage / "sweeps" / name / "sweep.json").is_file()
    p = kt(args + ["--resume"], log, env)  # the last trial: its own process dies mid-epoch (Tune retries it)
    def third() -> bool:  # the last trial running its third epoch: epoch 2's state is persisted
        return len(list(trials.glob("*/row.json"))) == 2 and len(running()) == 1 and "distill epoch 2/3" in segment(log)

    deadline = time.time() + 900
    while time.time() < deadline and p.poll() is None and not third():
        time.sleep(0.05)
    actors = cluster.pids("ImplicitFunc") or cluster.pids("trial_trainable")  # Tune's function-trial actor
    if actors and p.poll() is None:
        os.kill(actors[0], signal.SIGKILL)
        KILLS.append("sweep: an in-process trial's own process mid-epoch (trial 3)")
        mid.update(d.name for d in running())
        say(f"killed trial process {actors[0]} of trial {running()[0].name}")
    else:
        say("missed kill point: trial process (none found)")
    wait(p, "the resumed sweep")
    sweep_invariants(storage, name, 3, mid)


def phase_run(work: Path, cluster: RayCluster) -> None:
    say("phase 2: kt run killed at 5 points")
    storage, log = work / "run", work / "run.log"
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONUNBUFFERED": "1"}
    args = ["run", str(TASK), "--smoke", "--storage", str(storage), "--set", "distill.epochs=4"]
    cache, results = storage / "cache", storage / "ray_results"
    points = [
        ("run: adapting the teacher", globbed(cache, "adapted_teacher/.tmp-*"), 0.5),
        ("run: teacher inference", globbed(cache, "teacher_outputs/.tmp-*"), 0.0),
        ("run: mid-distillation (in process)", globbed(results, "distill-*/kt_state.pt"), 0.0),
        ("run: finetune / supervised baseline", lambda: "distill epoch 4/4" in segment(log), 4.0),
        ("run: exporting the student", globbed(storage, "runs/*/student"), 0.0),  # no run got this far before
    ]
    for point, ready, delay in points:
        kill_when(kt(args, log, env), point, ready, delay)
    p = kt(args, log, env)
    wait(p, "the last kt run")
    runs = sorted((storage / "runs").glob("*/result.json"))
    check(len(runs) >= 1, f"a finished run directory ({len(runs)})")
    if runs:
        res = json.loads(runs[-1].read_text())
        check("student.onnx" in res["student"]["files"], "its deployable student exported")
    text = log.read_text()
    check("resumed distillation from its checkpoint" in text, "a re-run resumed distillation from a checkpoint")
    outs = [d for d in (cache / "teacher_outputs").iterdir() if not d.name.startswith(".")]
    check(len(outs) == 1, f"one teacher-outputs entry ({len(outs)})")
    bad = incomplete_entries(storage)
    check(not bad, f"no half-written cache entry ({bad})")


def write_folder(root: Path, n: int, px: int = 96) -> int:
    """An RGB ImageFolder of ``n`` train JPEGs (real Fashion-MNIST, upscaled and tinted) and n/4 test ones."""
    import numpy as np
    from PIL import Image

    from orchestrator.config import DatasetConfig
    from orchestrator.data import load_task_data

    src = load_task_data(DatasetConfig()).train
    rng = np.random.default_rng(0)
    total = n + n // 4
    for i in range(total):
        d = root / ("test" if i >= n else "train") / f"c{int(src.labels[i])}"
        d.mkdir(parents=True, exist_ok=True)
        g = np.asarray(Image.fromarray(src.images[i, ..., 0]).resize((px, px), Image.BILINEAR), np.float32)
        Image.fromarray((g[..., None] * rng.uniform(0.4, 1, 3)).astype(np.uint8)).save(d / f"{i:06d}.jpg")
    return total


def phase_stream(work: Path, cluster: RayCluster) -> None:
    """`kt run` on an ImageFolder that streams from its image shards (``data.in_memory_max_mb=0``): killed while
    the folder is being ingested and mid-epoch of the streaming distillation."""
    say("phase 4: a streaming ImageFolder run killed during ingest and mid-epoch")
    from orchestrator.data.shards import ImageStore

    storage, log = work / "stream", work / "stream.log"
    files = write_folder(work / "folder", 6000)
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONUNBUFFERED": "1"}
    args = ["run", str(ROOT / "tasks" / "font_digits.yaml"), "--smoke", "--storage", str(storage), "--set",
            f"data.root={work / 'folder'}", "--set", "data.channels=3", "--set", "data.in_memory_max_mb=0",
            "--set", "distill.epochs=4", "--set", "baseline.enabled=false"]
    cache, results = storage / "cache", storage / "ray_results"
    points = [
        ("stream: ingesting the ImageFolder", globbed(cache, "image_shards/.tmp-*/shard-00000.tar"), 0.3),
        ("stream: mid-epoch of a streaming distillation", globbed(results, "distill-*/kt_state.pt"), 1.0),
    ]
    for point, ready, delay in points:
        kill_when(kt(args, log, env), point, ready, delay)
    wait(kt(args, log, env), "the last streaming kt run")
    text = log.read_text()
    check("stream from their image shards" in text, "the transfer set streamed from image shards")
    check("resumed distillation from its checkpoint" in text, "a re-run resumed distillation from a checkpoint")
    stores = [d for d in (cache / "image_shards").iterdir() if not d.name.startswith(".")]
    check(len(stores) == 1, f"one image-shards entry ({len(stores)})")
    if stores:
        idx = ImageStore(stores[0])
        check(len(idx) == files, f"every file ingested exactly once ({len(idx)} rows, {files} files)")
    check(not list(cache.rglob("images.npy")), "no whole-array copy of the images in the cache")
    bad = incomplete_entries(storage)
    check(not bad, f"no half-written cache entry ({bad})")


def phase_node(work: Path) -> None:
    """A worker node removed mid-sweep (see the module doc)."""
    say("phase 3: a worker node removed mid-sweep")
    import ray
    from ray.cluster_utils import Cluster

    remote = work / "remote"
    mirrors = [work / f"node{i}" for i in range(3)]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 512 * 1024**2,
                                                            "env_vars": {"KT_MIRROR": str(mirrors[0])}})
    # 2 CPUs a node and 1.4 a Train worker: one trial a node, and after the loss the node left holds a trial
    # plus the retried one's driver (Tune reserves only a trial's driver; Ray Train reserves its workers when it
    # starts them, so the trials that fit at once must fit what is left after a loss: README, Faults)
    nodes = [cluster.add_node(num_cpus=2, object_store_memory=512 * 1024**2, env_vars={"KT_MIRROR": str(m)})
             for m in mirrors[1:]]
    os.environ.update(RAY_ADDRESS=cluster.address, KT_MIRROR=str(mirrors[0]))
    import orchestrator

    name, out = "soak_node", {}
    space = sweep_space(name, 2, 2, 10)  # both trials the same student: they run side by side, in step
    space["fixed"]["student"] = space["space"].pop("student")["choice"]["r10t_w8"]
    space["resources"]["cpus_per_worker"] = 1.4
    space["fixed"]["distill.execution"] = "worker_group"  # a node's loss takes Ray Train workers with it

    def run():
        try:
            out["result"] = orchestrator.sweep(space, TASK, [f"storage={remote.as_uri()}", "teacher.inference=ray_data",
                                                             "teacher.inference_actors=2"], smoke=True, name=name)
        except BaseException as e:  # noqa: BLE001 (reported as a violation below)
            out["error"] = e

    th = threading.Thread(target=run)
    th.start()
    train = remote / "sweeps" / name / "train"
    deadline = time.time() + 900
    def both() -> bool:  # each trial (one per worker node) past its second epoch's checkpoint
        import torch

        states = list(train.glob("*/kt_state.pt")) if train.is_dir() else []
        try:
            return len(states) == 2 and all(torch.load(f, weights_only=False)["epoch"] >= 1 for f in states)
        except (OSError, RuntimeError, EOFError):  # replaced while read
            return False

    while time.time() < deadline and th.is_alive() and not both():
        time.sleep(0.1)
    landed = th.is_alive() and both()
    if landed:
        cluster.remove_node(nodes[1], allow_graceful=False)
        KILLS.append("node: a worker node removed mid-sweep")
        say("removed worker node 2 (its trial, Train workers and Ray Data actors with it)")
    else:
        say("missed kill point: worker node (the trials did not both checkpoint in time)")
    th.join(1800)
    check("error" not in out, f"the sweep survived the node loss ({out.get('error')!r})")
    if "result" in out:
        res = out["result"]
        rows = res.rows
        check([r["status"] for r in rows] == ["completed"] * 2, f"both trials completed ({[r['status'] for r in rows]})")
        if landed:
            check(sum((r.get("distill_restarts") or 0) >= 1 for r in rows) >= 1, "the lost trial resumed from its "
                  f"checkpoint ({[r.get('distill_restarts') for r in rows]})")
        for d in sorted((res.sweep_dir / "trials").iterdir()):
            check((d / "attempts.log").read_text().count("finished") == 1, f"trial {d.name} finished once")
    ray.shutdown()
    cluster.shutdown()
    os.environ.pop("RAY_ADDRESS", None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phases", default="sweep,run,node,stream", help="comma-separated: sweep, run, node, stream")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (printed)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    work = Path(tempfile.mkdtemp(prefix="kt_soak_"))
    say(f"work directory {work}")
    t0 = time.time()
    phases = args.phases.split(",")
    try:
        if {"sweep", "run", "stream"} & set(phases):
            cluster = RayCluster(work / "ray_start.log")
            try:
                if "sweep" in phases:
                    phase_sweep(work, cluster)
                if "run" in phases:
                    phase_run(work, cluster)
                if "stream" in phases:
                    phase_stream(work, cluster)
            finally:
                cluster.stop()
        if "node" in phases:
            phase_node(work)
    finally:
        if not args.keep and not VIOLATIONS:
            shutil.rmtree(work, ignore_errors=True)
    say(f"{len(KILLS)} kill points in {time.time() - t0:.0f} s: " + "; ".join(KILLS))
    print(f"{len(KILLS)} kills, {len(VIOLATIONS)} invariant violations")


if __name__ == "__main__":
    main()
