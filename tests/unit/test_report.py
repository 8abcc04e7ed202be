"""What `kt run` tells the user: the finetune decision, and a warning when transfer loses to the labels alone."""
from pathlib import Path

from rich.console import Console

from orchestrator.report import finetune_line, print_run
from orchestrator.run_context import RunResult


def _result(gain: float, finetune: dict) -> RunResult:
    table = [{"model": "timm/resnet10t", "role": "student (distilled + finetuned)", "top1": 0.8, "flops": 4.6e6,
              "params": 1.2e6}]
    metrics = {"student_top1": 0.8, "teacher_top1": 0.85, "gain_over_supervised": gain, "transfer_flops_total": 1e12,
               "transfer_device_seconds_total": 10.0, "transfer_images_total": 100.0, "wall_seconds_total": 5.0}
    return RunResult("r1", "sqlite:///x.db", Path("runs/x"), table, metrics, {"finetune": finetune})


def _printed(result, monkeypatch) -> str:
    con = Console(record=True, width=200)
    monkeypatch.setattr("rich.console.Console", lambda *a, **k: con)
    print_run(result)
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
