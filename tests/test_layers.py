"""The layers stay apart: the edge SDK imports neither the verifier nor the lab nor the energy harness,
and an edge-only generation loads none of the heavy libraries the cloud and the lab need."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "fastapi", "uvicorn", "starlette", "onnxruntime", "scipy", "sklearn", "skopt",
         "matplotlib", "cloud_verifier", "energy", "pipesd_lab")


def imported_packages(package: str) -> dict[str, set[str]]:
    """Top-level packages each module of `package` imports (anywhere in the file, lazy imports included)."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("package, forbidden", [
    ("edge_sdk", {"cloud_verifier", "energy", "pipesd_lab", "torch", "transformers", "fastapi", "uvicorn", "scipy"}),
    ("cloud_verifier", {"edge_sdk", "pipesd_lab"}),
    ("privacy", {"edge_sdk", "cloud_verifier", "energy", "pipesd_lab", "torch", "llama_cpp"}),
    ("energy", {"edge_sdk", "cloud_verifier", "pipesd_lab"}),
])
def test_imports_run_one_way(package, forbidden):
    found = imported_packages(package)
    if package == "edge_sdk":   # the CLI hands `pipesd bench|energy|link` to the lab, importing it only then
        found["edge_sdk/cli.py"] -= {"pipesd_lab"}
        top = ast.parse((ROOT / "edge_sdk/cli.py").read_text()).body
        assert not any(isinstance(n, ast.ImportFrom) and (n.module or "").startswith("pipesd_lab") for n in top)
        # `pipesd serve` (edge_sdk/serve, the `serve` extra) runs FastAPI + uvicorn on the device; the CLI
        # imports its package for the arguments, so that package's top level stays stdlib-only.
        for module in [m for m in found if m.startswith("edge_sdk/serve/")]:
            found[module] -= {"fastapi", "uvicorn", "starlette"}
        top = ast.parse((ROOT / "edge_sdk/serve/__init__.py").read_text()).body
        assert not {a.name for n in top if isinstance(n, ast.Import) for a in n.names} & {"fastapi", "uvicorn"}
        assert not any(isinstance(n, ast.ImportFrom) and n.level == 1 for n in top)   # no .app at import time
    bad = {module: names & forbidden for module, names in found.items() if names & forbidden}
    assert not bad, f"{package} imports what it must not: {bad}"


@pytest.mark.integration
def test_an_edge_only_generation_loads_nothing_heavy():
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "from edge_sdk import EdgeClient\n"
        "imported = time.perf_counter() - t\n"
        "with EdgeClient(local_only=True, threads=1) as c:\n"
        "    r = c.generate('def f(x):\\n', max_new_tokens=8)\n"
        "assert len(r.tokens) == 8 and not any(e.verified for e in r.events)\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
        "print(f'import {imported:.3f}s', file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"an edge-only generation loaded {out.stdout.strip()}"
