"""What `kt run`, `kt report` and `kt register` tell the user: the finetune decision, a warning when transfer
loses to the labels alone, MLflow links to the runs table, and command lines that work as printed."""
import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from orchestrator.commands.report import finetune_line, print_run, print_sweep_dir, serve_command
from orchestrator.run_context import RunResult


def _result(gain: float, finetune: dict) -> RunResult:
    table = [{"model": "timm/resnet10t", "role": "student (distilled + finetuned)", "top1": 0.8, "flops": 4.6e6,
              "params": 1.2e6}]
    metrics = {"student_top1": 0.8, "teacher_top1": 0.85, "gain_over_supervised": gain, "transfer_flops_total": 1e12,
               "transfer_device_seconds_total": 10.0, "transfer_images_total": 100.0, "wall_seconds_total": 5.0}
    return RunResult("r1", "sqlite:///x.db", Path("runs/x"), table, metrics, {"finetune": finetune})


def _printed(result, monkeypatch, experiment_id=None) -> str:
    con = Console(record=True, width=200)
    monkeypatch.setattr("rich.console.Console", lambda *a, **k: con)
    print_run(result, experiment_id)
    return con.export_text()


def test_finetune_decision_lines():
    assert "reverted to the distilled student" in finetune_line(
        {"kept": 0.0, "checked": 1.0, "val_top1_before": 0.9, "val_top1_after": 0.8})
    assert "kept (validation top-1 80.00% -> 90.00%)" in finetune_line(
        {"kept": 1.0, "checked": 1.0, "val_top1_before": 0.8, "val_top1_after": 0.9})
    assert "set labels.val_per_class" in finetune_line({"kept": 1.0, "checked": 0.0})


def test_run_summary_warns_only_when_transfer_loses(monkeypatch):
    lost = _printed(_result(-0.03, {"kept": 0.0, "checked": 1.0, "val_top1_before": 0.9, "val_top1_after": 0.8}),
                    monkeypatch)
    assert "gain over supervised-only: -3.00 points" in lost and "did not beat the labels alone" in lost
    assert "finetune: reverted" in lost
    won = _printed(_result(0.02, {"kept": 1.0, "checked": 0.0}), monkeypatch)
    assert "+2.00 points" in won and "did not beat" not in won and "kept unchecked" in won


MLFLOW = str(Path(sys.executable).absolute().parent / "mlflow")  # the running environment's, not activated


def test_run_summary_links_the_runs_page_with_a_command_that_works_as_printed(monkeypatch):
    out = _printed(_result(0.02, {"kept": 1.0, "checked": 0.0}), monkeypatch, experiment_id="7")
    link = "http://127.0.0.1:5000/#/experiments/7/runs/r1"  # the run's page
    assert f"open it: {MLFLOW} ui --backend-store-uri sqlite:///x.db   then {link}" in out


def test_sweep_report_links_the_experiments_runs_table(tmp_path):
    """MLflow 3 opens `#/experiments/<id>` on its GenAI overview in a fresh browser: the link is the runs table.
    A sweep started before its experiment id was recorded in sweep.json gets the bare server (its store here does
    not exist, and is not created by the look-up)."""
    state = {"name": "s", "parent_run_id": "p1", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "e",
             "status": "finished"}
    (tmp_path / "sweep.json").write_text(json.dumps({**state, "experiment_id": "3"}))
    out = _sweep_printed(tmp_path)
    assert f"open it: {MLFLOW} ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db   then " \
           "http://127.0.0.1:5000/#/experiments/3/runs\n" in out
    kt = Path(sys.executable).absolute().parent / "kt"
    assert f"deploy a trial's student: {kt} register s [--trial ID | --budget MFLOPS]; {kt} export s" in out
    (tmp_path / "sweep.json").write_text(json.dumps(state))
    assert "then http://127.0.0.1:5000\n" in _sweep_printed(tmp_path) and not (tmp_path / "mlflow.db").exists()
    server = {"tracking_uri": "http://mlflow:5000/", "experiment_id": "4"}
    (tmp_path / "sweep.json").write_text(json.dumps({**state, **server}))
    assert "open it: http://mlflow:5000/#/experiments/4/runs\n" in _sweep_printed(tmp_path)


def _sweep_printed(sweep_dir) -> str:
    con = Console(record=True, width=100)  # narrower than the lines: commands and links must not wrap
    print_sweep_dir(sweep_dir, con)
    return con.export_text()


def test_the_printed_serve_line_finds_mlflow_and_uvicorn_without_the_venv(tmp_path):
    """`mlflow models serve` starts `uvicorn` by name from PATH: the printed line runs the environment's mlflow by
    its path and puts the environment's bin first on PATH, so a shell without the virtualenv finds both."""
    line = serve_command("models:/m/1", f"sqlite:///{tmp_path}/mlflow.db")
    bin_dir = Path(sys.executable).absolute().parent
    assert line == (f'PATH={bin_dir}:"$PATH" MLFLOW_TRACKING_URI=sqlite:///{tmp_path}/mlflow.db '
                    f"{bin_dir}/mlflow models serve -m models:/m/1 --env-manager local -h 127.0.0.1 -p 5001")
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    assert subprocess.run(["bash", "-c", "command -v uvicorn || command -v mlflow"], env=bare).returncode != 0
    prefix, _ = line.split(" models serve ")  # as printed, up to the subcommand
    r = subprocess.run(["bash", "-c", f"{prefix} --version"], env=bare, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "version" in r.stdout, r.stderr[-2000:]
    probe = prefix.replace(f"{bin_dir}/mlflow", "sh -c 'command -v uvicorn'")  # what mlflow's child process sees
    r = subprocess.run(["bash", "-c", probe], env=bare, capture_output=True, text=True)
    assert r.stdout.strip() == f"{bin_dir}/uvicorn"
