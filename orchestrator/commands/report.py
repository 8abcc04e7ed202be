"""Terminal output for runs (rich tables)."""
from __future__ import annotations


def print_run(result, experiment_id: str | None = None) -> None:
    """Print the result table of a RunResult and where to look in MLflow (the run's page, given the id of its
    experiment)."""
    from rich.console import Console
    from rich.table import Table

    import sys

    con = Console(width=None if sys.stdout.isatty() else 160)  # no wrapping when piped or logged
    t = Table(title=f"knowledge transfer: run {result.run_id}")
    for col in ("model", "role", "top-1", "MFLOPs/img", "params (M)"):
        t.add_column(col, justify="right" if col != "model" and col != "role" else "left")
    for r in result.table:
        t.add_row(r["model"], r["role"], f"{100 * r['top1']:.2f}%", f"{r['flops'] / 1e6:.1f}",
                  f"{r['params'] / 1e6:.2f}")
    con.print(t)
    m = result.metrics
    ft = result.stages.get("finetune", {})
    if "kept" in ft:
        con.print(finetune_line(ft))
    if "gain_over_supervised" in m:
        vs_teacher = (f"; student vs teacher: {100 * (m['student_top1'] - m['teacher_top1']):+.2f} points"
                      if "teacher_top1" in m else "")
        con.print(f"gain over supervised-only: {100 * m['gain_over_supervised']:+.2f} points{vs_teacher}")
        if m["gain_over_supervised"] < 0:
            con.print(f"[yellow]transfer did not beat the labels alone here ({100 * m['gain_over_supervised']:+.2f} "
                      "points on test): the supervised-only student is the better model for this task as run. Try "
                      "a longer distillation (distill.steps), another teacher or transfer set, or `kt compare` to "
                      "see every method on these labels[/]")
    con.print(f"transfer compute: {m['transfer_flops_total'] / 1e12:.3f} TFLOPs, "
              f"{m['transfer_device_seconds_total']:.0f} device-seconds, {int(m['transfer_images_total'])} images; "
              f"wall {m['wall_seconds_total']:.0f} s")
    con.print(f"run dir: {result.run_dir}")
    con.print(f"MLflow store: {result.tracking_uri}")
    for line in mlflow_ui_lines(result.tracking_uri, experiment_id, result.run_id):
        con.print(f"  {line}", highlight=False, soft_wrap=True)  # no line break inside a command or link


def env_command(name: str) -> str:
    """``name``'s executable in the running interpreter's environment (``<venv>/bin/kt``, ``.../mlflow``), as an
    absolute, shell-quoted path: a printed command line then works without the virtualenv activated. Else the
    one on PATH, else the bare name."""
    import os
    import shlex
    import shutil
    import sys

    exe = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), name)  # the venv's bin: no symlinks followed
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        exe = shutil.which(name) or name
    return shlex.quote(exe)


def serve_command(model_uri: str, tracking_uri: str, port: int = 5001) -> str:
    """The shell line that serves ``model_uri`` over REST (``mlflow models serve``, local environment, on
    127.0.0.1:``port``). That command starts ``uvicorn`` by name from PATH, so the line puts the environment's
    bin directory first on PATH; it works without the virtualenv activated."""
    import os
    import shlex

    mlflow = env_command("mlflow")
    bin_dir = os.path.dirname(shlex.split(mlflow)[0])
    path = f"PATH={shlex.quote(bin_dir)}:\"$PATH\" " if bin_dir else ""
    return (f"{path}MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)} {mlflow} models serve -m {shlex.quote(model_uri)} "
            f"--env-manager local -h 127.0.0.1 -p {port}")


def mlflow_ui_lines(tracking_uri: str, experiment_id: str | None, run_id: str | None = None) -> list[str]:
    """How to open an experiment's runs table (``#/experiments/<id>/runs``, or a run's page with ``run_id``) in
    the MLflow UI: for a local store the ``mlflow ui`` line, then the link; for a tracking server the link.
    (``#/experiments/<id>`` alone lands on MLflow 3's GenAI overview in a fresh browser.)"""
    import shlex

    local = tracking_uri.startswith(("sqlite:", "file:", "/"))
    server = "http://127.0.0.1:5000" if local else tracking_uri.rstrip("/")
    if not local and not tracking_uri.startswith(("http:", "https:")):
        return []  # databricks and other stores: their own UI
    link = server
    if experiment_id is not None:
        link = f"{server}/#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    if local:
        return [f"open it: {env_command('mlflow')} ui --backend-store-uri {shlex.quote(tracking_uri)}   then {link}"]
    return [f"open it: {link}"]


def finetune_line(ft: dict) -> str:
    """One line on what the finetune after distillation did (its stage record: ``kept`` 1/0, ``checked``,
    ``val_top1_before``/``after`` in [0, 1])."""
    if not ft.get("checked"):
        return ("finetune: kept unchecked (no validation split: set labels.val_per_class to let keep_better "
                "choose between the distilled and the finetuned student)")
    before, after = 100 * ft["val_top1_before"], 100 * ft["val_top1_after"]
    if ft["kept"]:
        return f"finetune: kept (validation top-1 {before:.2f}% -> {after:.2f}%)"
    return (f"finetune: reverted to the distilled student (validation top-1 did not improve: {before:.2f}% -> "
            f"{after:.2f}%)")


def _fmt(v, scale: float = 1.0, spec: str = ".1f") -> str:
    """``v / scale`` formatted with ``spec``, or an em dash when missing."""
    return "—" if v is None else f"{v / scale:{spec}}"


def _param_str(v) -> str:
    """A params value, floats to 3 significant digits."""
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Dotted params keys shortened to their last part, or last two parts where the last is ambiguous."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else ".".join(k.split(".")[-2:])) for k, s in zip(keys, last)}


def _sweep_table(title: str, varying: list[str], first: tuple[str, ...] = ()):
    """A rich table of trials: (optional leading columns), trial, val/test top-1 %, MFLOPs/img, device-s,
    then the params that differ between trials (shortened names)."""
    from rich.table import Table

    t = Table(title=title)
    for col in (*first, "trial"):
        t.add_column(col)
    for col in ("val top-1 %", "test top-1 %", "MFLOPs/img", "device-s"):
        t.add_column(col, justify="right")
    for short in _short_keys(varying).values():
        t.add_column(short, justify="right")
    return t


def _trial_cells(r: dict | None, varying: list[str]) -> list:
    """The cells of one trial for :func:`_sweep_table` (dashes when ``r`` is None)."""
    from rich.text import Text

    if r is None:
        return ["—"] * (5 + len(varying))
    p = r.get("params") or {}
    return [Text(str(r["trial_id"])), _fmt(r.get("val_top1"), 0.01, ".2f"), _fmt(r.get("test_top1"), 0.01, ".2f"),
            _fmt(r.get("student_flops"), 1e6), _fmt(r.get("device_seconds")),
            *(Text(_param_str(p.get(k, "—"))) for k in varying)]


_BUDGET_UNITS = {"student_flops": ("MFLOPs/img", 1e6), "device_seconds": ("device-s", 1.0)}


def print_sweep(rows: list[dict], objective: str = "val_top1", title: str = "", console=None) -> None:
    """Print a sweep's results: a summary, the Pareto front against each cost in ``COSTS`` (top-1 in percent,
    student forward MFLOPs / image, training device-seconds, the params that differ), the best configuration
    per compute budget, and every failed trial with its error message."""
    import sys

    from rich.console import Console
    from rich.text import Text

    from orchestrator.sweeps.pareto import COSTS, best_per_budget, pareto_front, varying_params

    con = console or Console(width=None if sys.stdout.isatty() else 160)  # no wrapping when piped or logged
    count = {s: sum(r.get("status") == s for r in rows) for s in ("completed", "stopped", "error")}
    con.print(Text(f"sweep{' ' + title if title else ''}: {len(rows)} trials: {count['completed']} completed, "
                   f"{count['stopped']} stopped early, {count['error']} failed; objective {objective}"))
    varying = varying_params(rows)
    for cost, what in COSTS.items():
        t = _sweep_table(f"Pareto front: {objective} against {what}", varying)
        for r in pareto_front(rows, objective, cost):
            t.add_row(*_trial_cells(r, varying))
        con.print(t)
    for cost, what in COSTS.items():
        unit, scale = _BUDGET_UNITS.get(cost, (cost, 1.0))
        t = _sweep_table(f"best configuration per compute budget ({what})", varying, (f"budget ({unit})",))
        for b, r in best_per_budget(rows, objective, cost):
            t.add_row(f"<= {_fmt(b, scale)}", *_trial_cells(r, varying))
        con.print(t)
    _print_failures(con, rows)


def _print_failures(con, rows: list[dict]) -> None:
    """Print every failed (status ``error``) trial with its error message."""
    from rich.table import Table
    from rich.text import Text

    failed = [r for r in rows if r.get("status") == "error"]
    if not failed:
        return
    t = Table(title=f"failed trials ({len(failed)})")
    t.add_column("trial")
    t.add_column("error", overflow="fold")
    for r in failed:
        t.add_row(Text(str(r.get("trial_id"))), Text(str(r.get("error") or "(no message)")))
    con.print(t)


def _mlflow_hint(con, uri: str, experiment: str, parent_run_id: str, experiment_id: str | None) -> None:
    con.print(f"MLflow: experiment {experiment!r}, parent run {parent_run_id} (one child run per trial; "
              "artifacts pareto.png, trials.csv)")
    for line in mlflow_ui_lines(uri, experiment_id) or [uri]:
        con.print(f"  {line}", highlight=False, soft_wrap=True)  # no line break inside a command or link


def print_sweep_dir(sweep_dir, console=None) -> None:
    """`kt report`: the Pareto tables of a sweep directory (its ``trials/*/row.json``) and where it is in MLflow."""
    import sys
    from pathlib import Path

    from rich.console import Console

    from orchestrator.sweeps.driver import load_rows, sweep_state

    d = Path(sweep_dir)
    state = sweep_state(d)
    con = console or Console(width=None if sys.stdout.isatty() else 160)
    print_sweep(load_rows(d), title=f"{state['name']} ({state.get('status', '?')})", console=con)
    con.print(f"sweep dir: {d}  (trials.csv, pareto.png)")
    _mlflow_hint(con, state["tracking_uri"], state["experiment"], state["parent_run_id"], state.get("experiment_id"))
    kt = env_command("kt")
    con.print(f"deploy a trial's student: {kt} register {state['name']} [--trial ID | --budget MFLOPS]; "
              f"{kt} export {state['name']} --trial ID --format onnx", highlight=False, soft_wrap=True)


def print_sweep_result(result, console=None) -> None:
    """`kt sweep`'s summary: :func:`print_sweep_dir` for the finished sweep."""
    print_sweep_dir(result.sweep_dir, console)


def print_compare(result, console=None) -> None:
    """The `kt compare` table: per method, test top-1 mean +- std over seeds, gain over supervised-only
    (points), student MFLOPs/image, transfer TFLOPs and device-seconds; then where the CSV and plots are."""
    from rich.console import Console
    from rich.table import Table

    import sys

    con = console or Console(width=None if sys.stdout.isatty() else 160)
    seeds = max(s["seeds"] for s in result.summary)
    t = Table(title=f"methods compared ({seeds} seeds; same labels, student, transfer set)")
    for col in ("method", "student", "top-1 (mean ± std)", "gain vs supervised", "MFLOPs/img", "transfer TFLOPs",
                "transfer device-s"):
        t.add_column(col, justify="left" if col in ("method", "student") else "right")
    for s in sorted(result.summary, key=lambda s: -s["top1_mean"]):
        t.add_row(s["method"], s.get("student", ""), f"{100 * s['top1_mean']:.2f} ± {100 * s['top1_std']:.2f}",
                  "" if s["method"] == "supervised" else f"{s['gain_points']:+.2f}", f"{s['student_mflops']:.1f}",
                  f"{s['transfer_tflops']:.3f}", f"{s['transfer_device_seconds']:.0f}")
    con.print(t)
    con.print(f"rows (compare.csv), plots (compare_top1.png, compare_compute.png): {result.out_dir}")
    con.print(f"MLflow: parent run {result.parent_run_id}, one child run per method x seed; {result.tracking_uri}")


def print_rank_sources(result, console=None) -> None:
    """`kt rank-sources`: per source, every metric's score and rank, feature dim, MFLOPs/image, scoring seconds
    (and with --evaluate the actual transfer top-1); then per metric and static ranking Kendall tau, Spearman
    rho and top-1 regret against the actual accuracy."""
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    metrics = list(dict.fromkeys(r["metric"] for r in result.rows))
    cell = {(r["metric"], r["source"]): r for r in result.rows}
    t = Table(title=f"zoo sources for {result.task}: score (rank) per similarity metric")
    for col in ["source", "trained on", "dim", "MFLOPs/img"] + metrics + (["actual top-1"] if result.actual else []):
        t.add_column(col, justify="left" if col in ("source", "trained on") else "right")
    for s in sorted(result.sources, key=lambda s: -s.get("actual_top1", 0)):
        cells = [f"{cell[(m, s['source'])]['score']:.3g} ({cell[(m, s['source'])]['rank']})" for m in metrics]
        t.add_row(s["source"], s["trained_on"], str(s["feature_dim"]), f"{s['mflops']:.1f}", *cells,
                  *([f"{100 * s['actual_top1']:.2f}"] if result.actual else []))
    con.print(t)
    secs = {m: sum(cell[(m, s["source"])]["seconds"] for s in result.sources) for m in metrics}
    con.print("scoring seconds (all sources): " + ", ".join(f"{m} {v:.2f}" for m, v in secs.items()))
    for m, why in result.skipped.items():
        con.print(f"[yellow]skipped {m}[/]: {why}")
    if result.correlations:
        c = Table(title=f"how well each ranking predicts the actual transfer accuracy ({result.actual})")
        for col in ("ranking", "kind", "Kendall tau", "Spearman rho", "top-1 regret (points)", "top pick", "best"):
            c.add_column(col, justify="left" if col in ("ranking", "kind", "top pick", "best") else "right")
        for r in result.correlations:
            c.add_row(r["ranking"], r["kind"], f"{r['kendall_tau']:+.3f}", f"{r['spearman_rho']:+.3f}",
                      f"{r['top1_regret_points']:.2f}", r["top_pick"], r["best_source"])
        con.print(c)
    con.print(f"CSVs: {result.out_dir}; MLflow run {result.run_id} ({result.tracking_uri})")
