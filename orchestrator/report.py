"""Terminal output for runs (rich tables)."""
from __future__ import annotations


def print_run(result) -> None:
    """Print the result table of a RunResult and where to look in MLflow."""
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
    if "gain_over_supervised" in m:
        con.print(f"gain over supervised-only: {100 * m['gain_over_supervised']:+.2f} points; "
                  f"student vs teacher: {100 * (m['student_top1'] - m['teacher_top1']):+.2f} points")
    con.print(f"transfer compute: {m['transfer_flops_total'] / 1e12:.3f} TFLOPs, "
              f"{m['transfer_device_seconds_total']:.0f} device-seconds, {int(m['transfer_images_total'])} images; "
              f"wall {m['wall_seconds_total']:.0f} s")
    con.print(f"run dir: {result.run_dir}")
    con.print(f"MLflow store: {result.tracking_uri}")
    if result.tracking_uri.startswith("sqlite:"):
        con.print(f"  view it: mlflow ui --backend-store-uri {result.tracking_uri}")
