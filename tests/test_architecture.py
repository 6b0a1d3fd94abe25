"""Where the module boundaries are, checked: the ingress loads no ML library."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import ttserve

HEAVY = ("torch", "peft", "faiss", "vllm", "transformers", "sentence_transformers")


def test_the_ingress_imports_no_ml_library():
    """The Ray ingress replica imports ttserve.serving.app and builds the API in its own process, on a fraction
    of a CPU: building a request and writing an answer must not pull in torch, PEFT, Faiss or vLLM."""
    program = (
        "import json, sys\n"
        "import ttserve.serving.app\n"
        "from ttserve.config import Settings\n"
        "from ttserve.serving.api import build_api\n"
        "from ttserve.serving.app import HandleBackend\n"
        "build_api(HandleBackend.__new__(HandleBackend), Settings())\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1]) == []


def _top_level_imports(module: str, path: Path, modules: set[str]) -> set[str]:
    """The ttserve modules that importing `module` runs: its top-level imports (not those inside functions
    or under TYPE_CHECKING), each with the package __init__s on its way. The module's own parent packages
    are left out: they always run first, so importing from them is not a cycle."""
    found: set[str] = set()
    for statement in ast.parse(path.read_text()).body:
        if isinstance(statement, ast.If) and "TYPE_CHECKING" in ast.unparse(statement.test):
            continue
        for node in ast.walk(statement):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ttserve"):
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names if alias.name.startswith("ttserve")]
            else:
                continue
            for name in names:
                parts = name.split(".")
                found.update(".".join(parts[: i + 1]) for i in range(1, len(parts)))
    parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    return (found & modules) - parents - {module}


def test_module_imports_have_no_cycles():
    """A cycle through a package __init__ breaks only for whoever imports its modules in the 'wrong' order
    (a benchmark, a user), not for the test suite: find cycles statically instead."""
    package = Path(ttserve.__file__).parent
    paths = {}
    for path in package.rglob("*.py"):
        parts = ("ttserve", *path.relative_to(package).with_suffix("").parts)
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {module: _top_level_imports(module, path, set(paths)) for module, path in paths.items()}
    cycles, state = [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for dependency in sorted(graph[module]):
            if state.get(dependency) == "open":
                cycles.append(" -> ".join([*stack[stack.index(dependency) :], dependency]))
            elif dependency not in state:
                visit(dependency, [*stack, dependency])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
    assert "ttserve.pipeline" in graph and graph["ttserve.shared_model"]  # the walk saw the package
