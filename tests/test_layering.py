"""The layout's rules, checked on the import graph built from the AST (imports inside functions included):
no import cycles between modules, every package-to-package edge in the allowed table (Ray only in
ray_adapters/, MLflow only in tracking.py, stages below everything that composes them, adapters never above
the application), and heavy imports lazy so `kt --help` is instant."""
import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "orchestrator"

# group (a subpackage or top-level module of orchestrator) -> the groups it may import. The layers, bottom up:
# foundation (registry, ids, storage, cache, config) -> data -> models -> stages -> {ray_adapters, tracking,
# run_context, graph, similarity, zoo} -> {transfer_sets} -> methods -> sweeps -> commands -> cli; demo/ beside
# commands, imported only by the entry points (cli, the package's __init__): the core never imports it.
FOUNDATION = {"registry", "ids", "storage", "cache", "config"}
ALLOWED = {
    "registry": set(), "ids": set(), "storage": set(), "cache": {"storage"}, "progress": set(),
    "config": {"storage"},
    "data": {"config", "registry", "storage", "cache"},  # image shards live in the cache, on a URI or a path
    "models": {"data", "ids", "registry", "config"},
    "stages": FOUNDATION | {"data", "models"},
    "similarity": {"registry"},
    "tracking": {"models"},
    "ray_adapters": FOUNDATION | {"data", "models", "stages", "tracking"},
    "run_context": FOUNDATION | {"data", "stages"},
    "graph": FOUNDATION | {"run_context", "stages", "progress"},
    "zoo": FOUNDATION | {"data", "models", "stages"},
    "transfer_sets": FOUNDATION | {"data", "models", "stages", "ray_adapters"},
    "methods": FOUNDATION | {"data", "models", "stages", "ray_adapters", "graph", "run_context", "transfer_sets",
                             "similarity", "zoo"},
    "sweeps": FOUNDATION | {"models", "stages", "methods", "ray_adapters", "run_context", "tracking"},
    "commands": FOUNDATION | {"data", "models", "methods", "run_context", "similarity", "sweeps", "tracking", "zoo"},
    "demo": FOUNDATION | {"data", "models", "stages", "zoo"},  # offline demo material (found via entry points)
}
TOP = {"cli", "__init__"}  # the entry points may import anything


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (``from pkg import sub`` counts as
    ``pkg.sub`` when ``sub`` is a module)."""
    pkg = root.name
    modules = {module_name(f, root): f for f in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, f in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == pkg}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] == pkg:
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                deps |= subs or {node.module}
        graph[mod] = {d for d in deps if d in modules and d != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def group(mod: str) -> str:
    parts = mod.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_no_import_cycles():
    found = cycles(import_graph(PKG))
    assert not found, f"import cycles between modules: {found}"


def against_layering(graph: dict[str, set[str]]) -> list[str]:
    """The edges of ``graph`` that the layering table forbids, as ``"a -> b"``."""
    bad = []
    for mod, deps in graph.items():
        g = group(mod)
        if g in TOP:
            continue
        assert g in ALLOWED, f"{mod}: package {g!r} is not in the layering table of tests/test_layering.py"
        bad += [f"{mod} -> {d}" for d in deps if group(d) != g and group(d) not in ALLOWED[g]]
    return bad


def test_every_package_edge_is_allowed():
    bad = against_layering(import_graph(PKG))
    assert not bad, "imports against the layering (an adapter or stage reaching above itself?):\n" + "\n".join(bad)


def test_the_core_never_imports_demo():
    graph = import_graph(PKG)
    assert any(group(m) == "demo" for m in graph), "orchestrator/demo/ holds the offline demo material"
    users = sorted(m for m, deps in graph.items() if group(m) not in TOP | {"demo"}
                   and any(group(d) == "demo" for d in deps))
    assert not users, f"the core imports orchestrator.demo (find it through an entry point instead): {users}"


def test_the_checks_fail_on_a_planted_cycle_and_planted_violations(tmp_path):
    pkg = tmp_path / "orchestrator"
    for sub in ("stages", "commands", "methods", "demo"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "stages" / "a.py").write_text("def f():\n    from orchestrator.commands.run import g\n")
    (pkg / "commands" / "run.py").write_text("from orchestrator.stages import a\n")
    (pkg / "demo" / "standin.py").write_text("")
    (pkg / "methods" / "common.py").write_text("def f():\n    from orchestrator.demo.standin import x\n")
    graph = import_graph(pkg)
    assert cycles(graph) == [["orchestrator.commands.run", "orchestrator.stages.a"]]
    bad = against_layering(graph)
    assert "orchestrator.stages.a -> orchestrator.commands.run" in bad  # a stage reaching up
    assert "orchestrator.methods.common -> orchestrator.demo.standin" in bad  # the core importing the demo


def _third_party(path: Path) -> set[str]:
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
        mods = _third_party(f)
        if not rel.startswith("ray_adapters/"):
            assert "ray" not in mods, f"{rel} imports ray; only orchestrator/ray_adapters/ may"
        if rel != "tracking.py":
            assert "mlflow" not in mods, f"{rel} imports mlflow; only orchestrator/tracking.py may"


def test_cli_import_is_light():
    code = ("import sys, orchestrator.cli, orchestrator; "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'timm', 'open_clip', 'faiss') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
