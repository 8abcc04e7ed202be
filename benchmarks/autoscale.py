"""The autoscaler reads cluster.yaml: a sweep submitted with `kt submit` to a local cluster whose worker nodes are
added and removed by Ray's autoscaler, as `ray up cluster.yaml` would, with the node types of ``cluster.yaml``.

Ray ships a fake multi-node provider (``ray/autoscaler/_private/fake_multi_node``): with ``RAY_FAKE_CLUSTER=1 ray
start --head --autoscaling-config=FILE``, the head's autoscaler "launches" a worker node by starting a raylet of
that node type's resources and labels as local processes (and terminates it the same way). This script

1. derives that provider's config from ``cluster.yaml`` (:func:`fake_config`): the same node types, labels,
   ``min_workers``/``max_workers``, global ``max_workers`` and ``upscaling_speed``; the provider swapped for
   ``fake_multinode`` (as its subclass in ``benchmarks/fake_provider``, which gives each fake node a runtime-env
   directory of its own); every node's CPUs scaled by one factor so that the largest worker type fits this machine
   (on AWS a type's CPUs and GPUs come from its ``InstanceType``, :data:`AWS_SHAPES`; GPUs stay as declared, as
   logical resources that nothing here asks for); the head pinned to 1 CPU; ``idle_timeout_minutes`` replaced
   by ``--idle-minutes`` (cluster.yaml's 10 minutes would make the run 10 minutes longer: the override is
   printed);
2. starts that head (1 CPU, its own session, temp dir and free ports; token auth and the Jobs API on, as the
   cluster's head; cluster.yaml's head labels), and submits ``kt submit --follow sweep`` of a 2-trial space whose
   trials each need a Ray Train worker group of 2 x 1 CPU plus their driver: more than the head has, so the Train
   workers can only run on nodes the autoscaler adds;
3. checks, from the State API (polled every second), the autoscaler's log and the storage: worker nodes of the
   types cluster.yaml declares were added; every Ray Train worker ran on one of them (none on the head); the job
   SUCCEEDED with every trial completed; each trial's training state, written by rank 0 of its worker group on a
   worker node, and Tune's per-trial results are on the ``file://`` storage URI, and its ``final.json`` and student
   bundle in the sweep directory (the driver's mirror of that URI); after the sweep, the autoscaler terminated
   every worker node it had added, as idle, no sooner than the idle timeout after its last Ray Train worker ended;
4. stops exactly the cluster it started (SIGTERM to its `ray start --block`, then SIGKILL to whatever of its
   session is left: the fake worker nodes are processes of the head's session too).

    python benchmarks/autoscale.py                    # about 2 minutes on 2 CPU cores (make autoscale)
    python benchmarks/autoscale.py --config cluster-gcp.yaml --keep --json summary.json

The last line is ``autoscale: PASS`` or ``autoscale: FAIL (N checks failed)``; the exit status is 0 only on PASS.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.session_procs import stop_session  # noqa: E402
PY = sys.executable
TASK = ROOT / "tasks" / "fashion_mnist.yaml"
HEAD_TYPE = "ray.head.default"  # the fake provider tags its head with this type name
HEAD_CPUS = 1
OBJECT_STORE_BYTES = 300 * 1024**2  # per fake worker node (a real one sizes it from its memory)
PROVIDER_DIR = ROOT / "benchmarks" / "fake_provider"
PROVIDER = "kt_fake_provider.KtFakeMultiNodeProvider"

#: vCPUs and GPUs of the AWS instance types cluster.yaml uses (AWS fills a type's resources from its InstanceType
#: when the config leaves them out; offline, they come from here). A type missing here is an error that says so.
AWS_SHAPES = {
    "m6i.xlarge": (4, 0), "m6i.2xlarge": (8, 0), "m6i.4xlarge": (16, 0),
    "g5.xlarge": (4, 1), "g5.2xlarge": (8, 1), "g5.4xlarge": (16, 1), "g5.8xlarge": (32, 1),
    "g6.xlarge": (4, 1), "g6.2xlarge": (8, 1), "g4dn.xlarge": (4, 1), "g4dn.2xlarge": (8, 1),
}

#: The sweep: 2 trials side by side, each a Ray Train distillation on 2 workers of 1 CPU (a worker group, not
#: the in-process single worker) plus a 0.1-CPU trial driver; tiny student, 1 epoch on 200 transfer images,
#: teacher inference in the driver (no Ray Data actor pool to wait for).
TINY = {"id": "timm/resnet10t", "model_kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8}}
SPACE = {"name": "autoscale", "search": {"num_trials": 2, "max_concurrent_trials": 2, "seed": 0},
         "resources": {"workers_per_trial": 2, "cpus_per_worker": 1.0, "trial_driver_cpus": 0.1, "max_failures": 1},
         "validation_per_class": 5,
         "fixed": {"distill.epochs": 1, "distill.batch_size": 64, "finetune.epochs": 1,
                   "transfer_set.source": "target_unlabeled", "transfer_set.max_images": 200,
                   "teacher.inference": "in_process", "student": TINY},
         "space": {"distill.ce_weight": {"uniform": [0.0, 1.0]}}}


def say(msg: str) -> None:
    print(f"[autoscale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- the config


def node_shape(provider: str, name: str, nt: dict) -> tuple[int, int]:
    """(CPUs, GPUs) of node type ``nt`` on the real cloud: declared ``resources`` win (GCP must declare them), else
    AWS's InstanceType (:data:`AWS_SHAPES`)."""
    res = nt.get("resources") or {}
    cpus, gpus = res.get("CPU"), res.get("GPU")
    if (cpus is None or gpus is None) and provider == "aws":
        itype = (nt.get("node_config") or {}).get("InstanceType")
        if itype not in AWS_SHAPES:
            raise SystemExit(f"node type {name}: InstanceType {itype!r} is not in AWS_SHAPES "
                             f"({__file__}); add its vCPUs and GPUs there")
        a_cpus, a_gpus = AWS_SHAPES[itype]
        cpus = a_cpus if cpus is None else cpus
        gpus = a_gpus if gpus is None else gpus
    if cpus is None:
        raise SystemExit(f"node type {name} declares no CPU resource and its provider ({provider}) is not AWS")
    return int(cpus), int(gpus or 0)


def fake_config(cluster: dict, cpus: int, idle_minutes: float, gcs_address: str) -> tuple[dict, dict]:
    """The fake_multinode autoscaling config of ``cluster`` (a parsed cluster.yaml) for a machine of ``cpus`` CPUs,
    and what was changed (for the report): see the module doc. The file is read by the autoscaler as is (no
    ``prepare_config``), so every field the autoscaler reads is filled in here."""
    provider = cluster["provider"]["type"]
    head_name = cluster["head_node_type"]
    types = cluster["available_node_types"]
    shapes = {n: node_shape(provider, n, nt) for n, nt in types.items()}
    largest = max(c for n, (c, _) in shapes.items() if n != head_name)
    scale = min(1.0, cpus / largest)
    out_types, scaled = {}, {}
    for name, nt in types.items():
        c, g = shapes[name]
        if name == head_name:
            out_types[HEAD_TYPE] = {"resources": {"CPU": HEAD_CPUS, "GPU": g},
                                    "labels": dict(nt.get("labels") or {}), "node_config": {},
                                    "min_workers": 0, "max_workers": 0}
            scaled[name] = {"as": HEAD_TYPE, "cpus": (c, HEAD_CPUS), "gpus": g}
            continue
        fc = max(1, int(math.floor(c * scale)))
        out_types[name] = {"resources": {"CPU": fc, "GPU": g, "object_store_memory": OBJECT_STORE_BYTES},
                           "labels": dict(nt.get("labels") or {}), "node_config": {},
                           "min_workers": int(nt.get("min_workers", 0)),
                           "max_workers": int(nt.get("max_workers", cluster.get("max_workers", 2)))}
        scaled[name] = {"as": name, "cpus": (c, fc), "gpus": g, "min_workers": out_types[name]["min_workers"],
                        "max_workers": out_types[name]["max_workers"]}
    cfg = {
        "cluster_name": cluster.get("cluster_name", "kt"),
        "max_workers": int(cluster.get("max_workers", 2)),
        "upscaling_speed": float(cluster.get("upscaling_speed", 1.0)),
        "idle_timeout_minutes": float(idle_minutes),
        # Ray's fake_multinode provider, as the external KtFakeMultiNodeProvider (benchmarks/fake_provider): each
        # fake node keeps its runtime environments apart (see there why)
        "provider": {"type": "external", "module": PROVIDER, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": gcs_address},
        "available_node_types": out_types,
        "head_node_type": HEAD_TYPE,
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }
    changes = {"provider": f"{provider} -> fake_multinode", "cpu_scale": scale, "types": scaled,
               "idle_timeout_minutes": (cluster.get("idle_timeout_minutes"), idle_minutes),
               "max_workers": cfg["max_workers"], "upscaling_speed": cfg["upscaling_speed"]}
    return cfg, changes


def validate_fake(cfg: dict) -> None:
    """Ray's own schema check of the derived config (what the autoscaler runs on every config read)."""
    from ray.autoscaler._private.util import validate_config

    validate_config(cfg)


# --------------------------------------------------------------------------------------------- the cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeCluster:
    """`RAY_FAKE_CLUSTER=1 ray start --head --block --autoscaling-config=...` in a session of its own, its own temp
    dir and free ports. The autoscaler (the head's monitor process) starts worker nodes as processes of that same
    session; :meth:`stop` ends exactly that session's processes."""

    def __init__(self, work: Path, config_path: Path, gcs: int, labels: dict):
        self.gcs, self.dash = gcs, free_port()
        self.temp = Path(tempfile.mkdtemp(prefix="ktas_", dir="/tmp"))  # unix socket paths must stay short
        ray = str(Path(PY).parent / "ray")
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        self.env.update(PATH=f"{Path(PY).parent}:{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token",
                        RAY_FAKE_CLUSTER="1", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5",
                        PYTHONPATH=os.pathsep.join(filter(None, [str(PROVIDER_DIR), os.environ.get("PYTHONPATH")])))
        subprocess.run([ray, "get-auth-token", "--generate"], env=self.env, check=True, capture_output=True)
        self.log = work / "ray_start.log"
        cmd = [ray, "start", "--head", "--block", "--num-cpus", str(HEAD_CPUS), "--num-gpus", "0",
               "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(self.dash), "--object-store-memory", str(1024**3),
               # every port of its own (another Ray on this machine may hold Ray's defaults: 10001, 52365, ...)
               "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
               "--dashboard-agent-grpc-port", str(free_port()), "--metrics-export-port", str(free_port()),
               "--runtime-env-agent-port", str(free_port()),
               "--temp-dir", str(self.temp), f"--autoscaling-config={config_path}", "--disable-usage-stats"]
        if labels:  # as the cluster launcher gives the head its node type's labels
            cmd += ["--labels", ",".join(f"{k}={v}" for k, v in labels.items())]
        self.p = subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        self.address = f"http://127.0.0.1:{self.dash}"
        deadline = time.time() + 180
        while True:
            if self.p.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start failed: {self.log.read_text()[-3000:]}")
            try:
                from ray.util.state import list_nodes

                from orchestrator.ray_adapters.jobs import client

                if list_nodes(address=self.address, raise_on_missing_output=False):
                    client(self.address).list_jobs()
                    break
            except Exception:
                pass
            time.sleep(1)

    @property
    def monitor_log(self) -> Path:
        return self.temp / "session_latest" / "logs" / "monitor.log"

    def stop(self) -> None:
        stop_session(self.p)
        shutil.rmtree(self.temp, ignore_errors=True)


class Watcher(threading.Thread):
    """Polls the State API every ``period`` seconds: every node seen (id, head?, labels, resources, state, first
    seen alive, seen dead) and the nodes where Ray Train workers (``RayTrainWorker`` actors) were alive."""

    def __init__(self, address: str, period: float = 1.0):
        super().__init__(daemon=True)
        self.address, self.period = address, period
        self.nodes: dict[str, dict] = {}
        self.train_workers: dict[str, dict] = {}  # actor id -> {node_id, first, last}
        self.errors = 0
        self._halt = threading.Event()

    def poll(self) -> None:
        from ray.util.state import list_actors, list_nodes

        now = time.time()
        for n in list_nodes(address=self.address, limit=1000, raise_on_missing_output=False):
            rec = self.nodes.setdefault(n.node_id, {"head": n.is_head_node, "labels": dict(n.labels or {}),
                                                    "resources": dict(n.resources_total or {}), "alive": None,
                                                    "dead": None})
            if n.state == "ALIVE" and rec["alive"] is None:
                rec["alive"] = now
            if n.state == "DEAD" and rec["dead"] is None:
                rec["dead"] = now
        for a in list_actors(address=self.address, limit=10000, raise_on_missing_output=False,
                             filters=[("class_name", "=", "RayTrainWorker")]):
            if a.state != "ALIVE" or not a.node_id:
                continue
            rec = self.train_workers.setdefault(a.actor_id, {"node_id": a.node_id, "first": now, "last": now})
            rec["last"] = now

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.poll()
            except Exception:
                self.errors += 1
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def node_type_of(rec: dict, cfg: dict) -> str | None:
    """The fake config's node type a node was started as: the one whose labels and CPU/GPU it has."""
    if rec["head"]:
        return HEAD_TYPE
    r = rec["resources"]
    for name, nt in cfg["available_node_types"].items():
        if name == HEAD_TYPE:
            continue
        want = nt["resources"]
        if all(rec["labels"].get(k) == v for k, v in nt["labels"].items()) and \
                r.get("CPU", 0) == want["CPU"] and r.get("GPU", 0) == want["GPU"]:
            return name
    return None


def autoscaler_log(log: Path) -> tuple[list[tuple[str, int, str, str]], dict[str, str]]:
    """From the autoscaler's log: its summary lines (time, count, node type, "add" or "remove (reason)"), and the
    nodes it terminated ({node id: reason}; the fake provider's node ids are the Ray node ids)."""
    events, terminated = [], {}
    if not log.is_file():
        return events, terminated
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"(\S+ \S+),\d+\s.*:event_summary:Adding (\d+) node\(s\) of type (\S+)\.", line)
        if m:
            events.append((m.group(1), int(m.group(2)), m.group(3), "add"))
        m = re.match(r"(\S+ \S+),\d+\s.*:event_summary:Removing (\d+) nodes of type (\S+) \((.*)\)\.", line)
        if m:
            events.append((m.group(1), int(m.group(2)), m.group(3), f"remove ({m.group(4)})"))
        m = re.search(r"Terminating the node with id (\S+) and ip \S+\. \((.*)\)", line)
        if m:
            terminated[m.group(1)] = m.group(2)
    return events, terminated


# --------------------------------------------------------------------------------------------- the run


class Checks:
    def __init__(self):
        self.results: list[tuple[bool, str]] = []

    def __call__(self, ok: bool, what: str) -> bool:
        self.results.append((bool(ok), what))
        say(("ok: " if ok else "FAILED: ") + what)
        return bool(ok)

    @property
    def failed(self) -> list[str]:
        return [w for ok, w in self.results if not ok]


def trial_demand(space: dict) -> float:
    r = space["resources"]
    return r["trial_driver_cpus"] + r["workers_per_trial"] * r["cpus_per_worker"]


def run(args) -> dict:
    t0 = time.time()
    check = Checks()
    work = Path(tempfile.mkdtemp(prefix="kt_autoscale_"))
    say(f"work directory {work}")
    cluster_yaml = yaml.safe_load(Path(args.config).read_text())
    gcs = free_port()
    cfg, changes = fake_config(cluster_yaml, args.cpus, args.idle_minutes, f"127.0.0.1:{gcs}")
    validate_fake(cfg)
    cfg_path = work / "fake_cluster.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    say(f"fake cluster config from {args.config}: provider {changes['provider']}, CPUs x{changes['cpu_scale']:g}, "
        f"max_workers {changes['max_workers']}, upscaling_speed {changes['upscaling_speed']}")
    for name, t in changes["types"].items():
        bounds = "" if t["as"] == HEAD_TYPE else f", min/max workers {t['min_workers']}/{t['max_workers']}"
        say(f"  {name} -> {t['as']}: {t['cpus'][0]} -> {t['cpus'][1]} CPU, {t['gpus']} GPU (logical){bounds}")
    was, now = changes["idle_timeout_minutes"]
    say(f"  idle_timeout_minutes: {was} in {Path(args.config).name}, {now} here (overridden: --idle-minutes)")
    space = json.loads(json.dumps(SPACE))
    space_path = work / "space.yaml"
    space_path.write_text(yaml.safe_dump(space, sort_keys=False))
    demand, res = trial_demand(space), space["resources"]
    check(demand > HEAD_CPUS and res["cpus_per_worker"] > HEAD_CPUS - res["trial_driver_cpus"],
          f"a trial needs {demand:g} CPUs (driver {res['trial_driver_cpus']:g} + {res['workers_per_trial']} Train workers "
          f"x {res['cpus_per_worker']:g}); the head has {HEAD_CPUS}, so no Train worker fits on it")
    fits = [n for n, nt in cfg["available_node_types"].items()
            if n != HEAD_TYPE and nt["resources"]["CPU"] >= res["cpus_per_worker"]]
    check(fits, f"worker types that can hold a Train worker: {fits}")

    storage = work / "store"
    storage_uri = storage.as_uri()
    summary: dict = {"work": str(work), "config": str(args.config), "changes": changes, "storage": storage_uri}
    cluster = FakeCluster(work, cfg_path, gcs, cfg["available_node_types"][HEAD_TYPE]["labels"])
    watcher = Watcher(cluster.address)
    try:
        say(f"head up in {time.time() - t0:.0f} s (1 CPU, Jobs API {cluster.address}, GCS 127.0.0.1:{gcs})")
        watcher.poll()
        heads = [n for n, r in watcher.nodes.items() if r["head"]]
        check(len(watcher.nodes) == 1 and len(heads) == 1 and
              watcher.nodes[heads[0]]["resources"].get("CPU") == HEAD_CPUS, "the cluster starts as its head alone")
        watcher.start()
        env = {k: v for k, v in cluster.env.items() if k != "RAY_FAKE_CLUSTER"}
        cmd = [PY, "-m", "orchestrator.cli", "submit", "--address", cluster.address, "--working-dir", str(ROOT),
               "--env", f"KT_MIRROR={work / 'mirror'}", "--follow",
               "sweep", str(space_path), "--task", str(TASK), "--smoke", "--storage", storage_uri,
               "--name", space["name"]]
        say("kt " + " ".join(cmd[3:]))
        t_submit = time.time()
        for attempt in range(3):  # a head whose job agent has not registered yet refuses the job: try again
            with open(work / "kt_submit.log", "w") as out:
                sub = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     timeout=args.timeout)
            text = (work / "kt_submit.log").read_text(errors="replace")
            if sub.returncode == 0 or "No available agent to submit job" not in text:
                break
            say("the head's job agent is not up yet: submitting again in 5 s")
            time.sleep(5)
        t_end = time.time()
        summary["sweep_s"] = round(t_end - t_submit, 1)
        ok = check(sub.returncode == 0 and "SUCCEEDED" in text,
                   f"`kt submit --follow sweep` SUCCEEDED in {t_end - t_submit:.0f} s (rc {sub.returncode})")
        if not ok:
            print(text[-5000:])

        # where the Ray Train workers ran, and which nodes the autoscaler added
        watcher.poll()
        workers = [(n, r) for n, r in watcher.nodes.items() if not r["head"]]
        types = {n: node_type_of(r, cfg) for n, r in workers}
        declared = set(cluster_yaml["available_node_types"]) - {cluster_yaml["head_node_type"]}
        summary["worker_nodes"] = {n[-5:]: types[n] for n, _ in workers}
        check(workers and all(t in declared for t in types.values()),
              f"the autoscaler added {len(workers)} worker node(s), each of a type {Path(args.config).name} "
              "declares: " + ", ".join(f"{n[-5:]}={t}" for n, t in types.items()))
        tw = watcher.train_workers
        on = {}
        for a in tw.values():
            on.setdefault(a["node_id"], 0)
            on[a["node_id"]] += 1
        summary["train_workers_per_node"] = {n[-5:]: c for n, c in on.items()}
        check(len(tw) >= space["resources"]["workers_per_trial"] and all(n in types for n in on),
              f"{len(tw)} Ray Train workers seen, all on added worker nodes, none on the head: "
              + ", ".join(f"{n[-5:]} ({types.get(n) or 'head'}): {c}" for n, c in on.items()))

        # the results on the storage URI
        sweep_local = work / "mirror" / "sweeps" / space["name"]
        trials = sorted(d for d in (sweep_local / "trials").iterdir() if d.is_dir()) \
            if (sweep_local / "trials").is_dir() else []
        rows = [json.loads((d / "row.json").read_text()) for d in trials if (d / "row.json").is_file()]
        check(len(trials) == space["search"]["num_trials"] and all(r.get("status") == "completed" for r in rows)
              and len(rows) == len(trials),
              f"{len(trials)} trial(s), statuses {[r.get('status') for r in rows]}")
        finals = [d for d in trials if (d / "final.json").is_file()]
        check(len(finals) == len(trials) and trials, "every trial committed final.json in the sweep dir (the "
              f"driver's mirror of the storage URI): {len(finals)}/{len(trials)}")
        # rank 0 of each trial's worker group (on a worker node) writes the loop's state after each epoch to
        # <uri>/sweeps/<name>/train/<trial>/ (kt_state.pt; Ray Train checkpoint_* dirs in older trees); Tune
        # writes each trial's results under <uri>/sweeps/<name>/tune/
        remote = storage / "sweeps" / space["name"]
        runs = [d for d in (remote / "train").iterdir() if d.is_dir()] if (remote / "train").is_dir() else []
        states = {d.name: sorted(p.name for p in d.iterdir()
                                 if p.name == "kt_state.pt" or p.name.startswith("checkpoint_")) for d in runs}
        summary["remote_train_state"] = states
        check(trials and all(states.get(d.name) for d in trials),
              f"each trial's Train workers left its training state on the storage URI ({storage_uri}/sweeps/"
              f"{space['name']}/train/<trial>/): " + ", ".join(f"{k}: {v}" for k, v in states.items()))
        results = [p for p in (remote / "tune").glob("*/result.json")] if (remote / "tune").is_dir() else []
        check(len(results) == len(trials) and all(p.stat().st_size for p in results),
              f"Tune's per-trial results are on the storage URI: {len(results)} result.json under "
              f"{storage_uri}/sweeps/{space['name']}/tune/")
        bundles = [p for d in trials for p in d.rglob("*") if p.is_file() and ("student" in p.name)]
        summary["student_files"] = [str(p.relative_to(work)) for p in bundles]
        check(all(any(p.is_relative_to(d) for p in bundles) for d in trials) and trials,
              f"every trial left its student: {', '.join(str(p.relative_to(sweep_local)) for p in bundles[:4])}")
        summary["storage_listing"] = sorted(str(p.relative_to(storage)) for p in storage.rglob("*") if p.is_file()
                                            and "checkpoint_" not in str(p))[:60]

        # idle nodes are removed after idle_timeout_minutes
        idle_s = args.idle_minutes * 60
        deadline = time.time() + idle_s + args.removal_slack
        alive = lambda: [n for n, r in watcher.nodes.items() if not r["head"] and r["dead"] is None]  # noqa: E731
        while alive() and time.time() < deadline:
            time.sleep(1)
        t_gone = time.time()
        left = alive()
        idle_for, early = {}, []
        for n, r in workers:
            last_use = max([a["last"] for a in tw.values() if a["node_id"] == n] or [r["alive"] or t_submit])
            if r["dead"] is not None:
                idle_for[n[-5:]] = round(r["dead"] - last_use)
                if r["dead"] - last_use < idle_s - 5:  # 5 s: the watcher's polling
                    early.append(n[-5:])
        summary["idle_s_before_removal"] = idle_for
        check(not left and workers, f"every worker node was removed, the last {t_gone - t_end:.0f} s after the job "
              f"ended (still up: {[n[-5:] for n in left]})")
        check(not early, f"no worker node was removed before the idle timeout ({idle_s:.0f} s) after its last Ray "
              "Train worker ended; seconds from then to its removal: "
              + ", ".join(f"{n}: {v}" for n, v in idle_for.items()) + (f" (too early: {early})" if early else ""))
        shutil.copy(cluster.monitor_log, work / "monitor.log")
        events, terminated = autoscaler_log(work / "monitor.log")
        summary["autoscaler_events"] = events
        summary["terminated"] = {n[-5:]: why for n, why in terminated.items()}
        ids = {n for n, _ in workers}
        check(workers and set(terminated) == ids and set(terminated.values()) == {"idle"},
              f"the autoscaler's log: it terminated {len(terminated)} node(s), all as idle, the same nodes it had "
              f"added ({', '.join(f'{n[-5:]}: {w}' for n, w in terminated.items())}); its summary: "
              + "; ".join(f"{t[11:]} {what} {c} x {ty}" for t, c, ty, what in events))
    finally:
        watcher.stop()
        cluster.stop()
        if not args.keep and not check.failed:
            shutil.rmtree(work, ignore_errors=True)
    summary["wall_s"] = round(time.time() - t0, 1)
    summary["checks"] = [{"ok": ok, "what": w} for ok, w in check.results]
    summary["failed"] = check.failed
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "cluster.yaml"), help="cluster launcher config [cluster.yaml]")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2,
                    help="CPUs the largest worker type is scaled to [this machine's]")
    ap.add_argument("--idle-minutes", type=float, default=0.25,
                    help="idle_timeout_minutes of the fake cluster (cluster.yaml's would make the run that long)")
    ap.add_argument("--removal-slack", type=float, default=60,
                    help="seconds past the idle timeout allowed for the removal of idle nodes")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed for the sweep")
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (kept anyway on failure)")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    summary = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    n = len(summary["failed"])
    say(f"wall time {summary['wall_s']:.0f} s (sweep {summary.get('sweep_s', float('nan')):.0f} s)")
    if n:
        say(f"work directory kept: {summary['work']}")
    print("autoscale: PASS" if not n else f"autoscale: FAIL ({n} checks failed)")
    return 0 if not n else 1


if __name__ == "__main__":
    sys.exit(main())
