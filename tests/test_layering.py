"""The layout's rules: Ray only in ray_adapters/, MLflow only in tracking.py, stages Ray- and MLflow-free,
and heavy imports lazy so `kt --help` is instant."""
import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "orchestrator"


def imported_modules(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module.split(".")[0])
    return mods


def test_ray_and_mlflow_stay_in_their_adapters():
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG).as_posix()
        mods = imported_modules(f)
        if not rel.startswith("ray_adapters/"):
            assert "ray" not in mods, f"{rel} imports ray; only orchestrator/ray_adapters/ may"
        if rel != "tracking.py":
            assert "mlflow" not in mods, f"{rel} imports mlflow; only orchestrator/tracking.py may"


def test_stages_do_not_import_pipeline_or_adapters():
    for f in (PKG / "stages").glob("*.py"):
        text = f.read_text()
        for banned in ("orchestrator.pipeline", "orchestrator.ray_adapters", "orchestrator.tracking",
                       "orchestrator.cli"):
            assert banned not in text, f"stages/{f.name} imports {banned}"


def test_cli_import_is_light():
    code = ("import sys, orchestrator.cli, orchestrator; "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'timm', 'open_clip', 'faiss') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
