"""The house's floors: no import circle in distcl/ (function-local imports included), the settings and the run
config on the ground floor, the core never importing the Ray shell."""

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distcl"


def import_graph() -> dict[str, set[str]]:
    """Module -> the distcl modules it imports anywhere in its body."""
    modules = {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names} & modules.keys()
        graph[name] = found - {name, "distcl"}
    return graph


def test_no_import_circle_and_the_configuration_on_the_ground_floor():
    graph = import_graph()
    assert len(graph) > 20 and graph["distcl.cli"]  # the whole package was read
    list(graphlib.TopologicalSorter(graph).static_order())  # CycleError names a circle
    assert graph["distcl.settings"] == set() and graph["distcl.config"] == {"distcl.settings"}
    core = [m for m in graph if not m.startswith("distcl.runtime") and m not in ("distcl.cli", "distcl.launch")]
    assert not any(d.startswith("distcl.runtime") for m in core for d in graph[m])


def test_the_core_never_imports_the_ray_shell():
    """distcl.runtime wraps the core; the backend is chosen at the face (distcl.launch): an inline run, a
    distillation in one process or a test of the algorithms imports no Ray."""
    code = (
        "import sys, distcl.continual, distcl.distill, distcl.evaluation, distcl.launch, distcl.sweep; "
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('distcl.runtime')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_code_agrees_with_its_formatter_and_linter():
    """pyproject.toml's one ruff configuration, with no file or line opting out of it."""
    root = PACKAGE.parent
    for command in (["format", "--check"], ["check"]):
        done = subprocess.run([sys.executable, "-m", "ruff", *command, "."], cwd=root, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    sources = [p for d in ("distcl", "tests", "benchmarks", "jobs") for p in (root / d).rglob("*.py")]
    assert len(sources) > 40
    assert not [p for p in sources if "fmt: " + "skip" in p.read_text() or "fmt: " + "off" in p.read_text()]
