"""Sweep results layer: Pareto fronts, best configuration per budget, trials CSV, PNG plot, rich report."""
from __future__ import annotations

import pandas as pd
import pytest
from rich.console import Console

from orchestrator.commands.report import print_sweep
from orchestrator.sweeps.pareto import (COSTS, best_per_budget, pareto_front, plot_pareto, trial_label,
                                       varying_params, write_trials_csv)

M = 1e6


def _row(n: int, status: str, val, flops, secs, test=None, error=None, **params) -> dict:
    return {"trial_id": f"trial_{n:05d}", "status": status, "val_top1": val, "test_top1": test,
            "student_flops": flops, "device_seconds": secs, "train_flops": None if secs is None else 1e9 * secs,
            "images_seen": 6000.0, "params": {"distill.constant_knob": 0, **params}, "error": error}


@pytest.fixture
def rows() -> list[dict]:
    """Hand-computed fronts (cost in MFLOPs / device-s, val top-1):

    flops front: 00001 (10, .80), 00003 + 00004 (20, .84: identical, both kept), 00002 (40, .86);
      00005 (20, .82) has the same cost and a lower objective, 00006 (50, .83) is dominated by 00002,
      00009 has no FLOPs, 00007 (5, .95) is only stopped, 00008 failed.
    seconds front: 00005 (100, .82), 00003 (200, .84), 00002 (300, .86), 00009 (500, .88);
      00001 (120, .80) is dominated by 00005, 00004 (250, .84) by 00003, 00006 (400, .83) by 00002.
    """
    return [
        _row(1, "completed", 0.80, 10 * M, 120.0, test=0.78, **{"distill.temperature": 2.0, "student.width": 8}),
        _row(2, "completed", 0.86, 40 * M, 300.0, test=0.85, **{"distill.temperature": 4.0, "student.width": 32}),
        _row(3, "completed", 0.84, 20 * M, 200.0, test=0.83, **{"distill.temperature": 4.0, "student.width": 16}),
        _row(4, "completed", 0.84, 20 * M, 250.0, test=0.82, **{"distill.temperature": 8.0, "student.width": 16}),
        _row(5, "completed", 0.82, 20 * M, 100.0, test=0.81, **{"distill.temperature": 1.0, "student.width": 16}),
        _row(6, "completed", 0.83, 50 * M, 400.0, test=0.80, **{"distill.temperature": 2.0, "student.width": 64}),
        _row(7, "stopped", 0.95, 5 * M, 10.0, **{"distill.temperature": 2.0, "student.width": 4}),
        _row(8, "error", None, None, None, error="CUDA out of memory [rank0] while distilling",
             **{"distill.temperature": 16.0, "student.width": 128, "optim.name": "sgd"}),
        {**_row(9, "completed", 0.88, None, 500.0, test=0.87, **{"distill.temperature": 4.0, "student.width": 48}),
         "iterations": 7},
    ]


def ids(rs) -> list[str]:
    return [r["trial_id"] for r in rs]


def test_pareto_front_flops(rows):
    assert ids(pareto_front(rows)) == ["trial_00001", "trial_00003", "trial_00004", "trial_00002"]


def test_pareto_front_seconds(rows):
    front = pareto_front(rows, cost="device_seconds")
    assert ids(front) == ["trial_00005", "trial_00003", "trial_00002", "trial_00009"]
    assert [r["device_seconds"] for r in front] == sorted(r["device_seconds"] for r in front)


def test_pareto_front_other_objective_and_empty(rows):
    # by test top-1 against FLOPs: 00003 (20, .83) now beats its twin 00004 (20, .82)
    assert ids(pareto_front(rows, objective="test_top1")) == ["trial_00001", "trial_00003", "trial_00002"]
    assert pareto_front([r for r in rows if r["status"] != "completed"]) == []
    assert pareto_front([]) == []


def test_best_per_budget_default_budgets_are_front_costs(rows):
    got = [(b, r["trial_id"]) for b, r in best_per_budget(rows)]
    assert got == [(10 * M, "trial_00001"), (20 * M, "trial_00003"), (40 * M, "trial_00002")]


def test_best_per_budget_explicit(rows):
    got = best_per_budget(rows, budgets=[5 * M, 15 * M, 45 * M, 1e12])
    assert [(b, r and r["trial_id"]) for b, r in got] == [
        (5 * M, None), (15 * M, "trial_00001"), (45 * M, "trial_00002"), (1e12, "trial_00002")]
    secs = best_per_budget(rows, cost="device_seconds", budgets=[99, 100, 250, 1000])
    # at 250 s the twins 00003 (200 s) and 00004 (250 s) tie on val top-1: the cheaper wins
    assert [r and r["trial_id"] for _, r in secs] == [None, "trial_00005", "trial_00003", "trial_00009"]


def test_varying_params_and_label(rows):
    assert varying_params(rows) == ["distill.temperature", "student.width"]  # optim.name: only a failed trial
    assert trial_label(rows[0]) == "00001"
    assert set(COSTS) == {"student_flops", "device_seconds"}


def test_trials_csv_round_trip(rows, tmp_path):
    path = write_trials_csv(rows, tmp_path / "sweep" / "trials.csv")
    df = pd.read_csv(path)
    assert list(df["trial_id"]) == ids(rows)
    assert set(df["status"]) == {"completed", "stopped", "error"}
    assert list(df.columns[:2]) == ["trial_id", "status"] and df.columns[-1] == "error"
    assert {"val_top1", "test_top1", "student_flops", "device_seconds", "train_flops", "images_seen",
            "param.distill.constant_knob", "param.distill.temperature", "param.student.width",
            "param.optim.name", "iterations"} <= set(df.columns)
    by_id = df.set_index("trial_id")
    assert by_id.loc["trial_00008", "param.optim.name"] == "sgd"
    assert pd.isna(by_id.loc["trial_00001", "param.optim.name"])
    assert by_id.loc["trial_00002", "param.student.width"] == 32
    assert by_id.loc["trial_00003", "val_top1"] == pytest.approx(0.84)
    assert "CUDA out of memory" in by_id.loc["trial_00008", "error"]
    assert df["pareto_flops"].dtype == bool and df["pareto_seconds"].dtype == bool
    assert list(df.loc[df["pareto_flops"], "trial_id"]) == ["trial_00001", "trial_00002", "trial_00003",
                                                            "trial_00004"]
    assert set(df.loc[df["pareto_seconds"], "trial_id"]) == set(ids(pareto_front(rows, cost="device_seconds")))
    assert [p.name for p in path.parent.iterdir()] == ["trials.csv"]  # no temporary left behind


def test_plot_pareto_writes_png(rows, tmp_path):
    path = plot_pareto(rows, tmp_path / "pareto.png", title="fashion-mnist sweep")
    data = path.read_bytes()
    assert path == tmp_path / "pareto.png"
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000
    assert [p.name for p in tmp_path.iterdir()] == ["pareto.png"]


def test_plot_pareto_without_data(tmp_path):
    data = plot_pareto([_row(1, "error", None, None, None, error="boom")], tmp_path / "p.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_print_sweep(rows):
    con = Console(record=True, width=200)
    print_sweep(rows, title="fmnist", console=con)
    text = con.export_text()
    assert "9 trials: 7 completed, 1 stopped early, 1 failed" in text
    front = set(ids(pareto_front(rows))) | set(ids(pareto_front(rows, cost="device_seconds")))
    for r in rows:
        assert (trial_label(r) in text) == (r["trial_id"] in front | {"trial_00008"}), r["trial_id"]
    assert "CUDA out of memory [rank0] while distilling" in text  # brackets are not taken as markup
    assert "best configuration per compute budget" in text
    assert "temperature" in text and "width" in text and "constant_knob" not in text
    assert "86.00" in text and "40.0" in text  # val top-1 % and MFLOPs/img of 00002


def test_a_trial_that_reused_a_twin_is_not_a_second_point(rows):
    twin = {**rows[0], "trial_id": "trial_00099", "reused_from": rows[0]["trial_id"]}
    front = pareto_front(rows + [twin])
    assert twin["trial_id"] not in {r["trial_id"] for r in front}
    assert [r["trial_id"] for r in front] == [r["trial_id"] for r in pareto_front(rows)]
