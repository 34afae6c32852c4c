"""The packages' import order (docs/design.md): each imports only those below it, and no two
modules import each other, directly or round a longer loop."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Lowest first; packages on one rank are siblings and import neither the other.
ORDER: tuple[tuple[str, ...], ...] = (
    ("store",),
    ("serving",),
    ("monitor",),
    ("registry",),
    ("retrain", "rollout"),
    ("controller",),
    ("tunewatch",),
    ("bench", "dashboards"),  # tools: benchmarks, the boards and rules as code
)
RANK = {package: rank for rank, packages in enumerate(ORDER) for package in packages}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    module_name(path): path for package in RANK for path in sorted((ROOT / package).rglob("*.py"))
}


def imports(module: str) -> set[str]:
    """The project modules `module` imports, anywhere in its body (a lazy import counts)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        found.update(name for name in names if name in MODULES and name != module)
    return found


GRAPH = {module: imports(module) for module in MODULES}


def test_every_package_is_placed_in_the_order() -> None:
    top_level = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()} - {"tests"}
    assert top_level <= RANK.keys()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_only_its_own_package_and_those_below(module: str) -> None:
    package = module.split(".")[0]
    upward = sorted(
        target
        for target in GRAPH[module]
        if target.split(".")[0] != package and RANK[target.split(".")[0]] >= RANK[package]
    )
    assert not upward, f"{module} imports {upward}: against the order {ORDER}"


def test_no_modules_import_each_other_round_a_loop() -> None:
    cycles, done, path = [], set(), []

    def visit(module: str) -> None:
        if module in path:
            cycles.append(path[path.index(module) :] + [module])
            return
        if module in done:
            return
        path.append(module)
        for target in sorted(GRAPH[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(GRAPH):
        visit(module)
    assert not cycles, " ; ".join(" -> ".join(cycle) for cycle in cycles)


# The gateway's app built as `tunewatch serve` builds it, every rollout route asked once.
GATEWAY_PROBE = """
import sys, tempfile
from pathlib import Path
from fastapi.testclient import TestClient
import tunewatch.cli
from serving.adapters import AdapterSet
from serving.engine import EngineClient
from serving.gateway import Gateway, GatewayConfig
from store import Store
from tunewatch.stack import gateway_app

state = tempfile.mkdtemp()
store = Store(f"sqlite:///{state}/t.db")
engine = EngineClient("http://127.0.0.1:9")
config = GatewayConfig("m", "token", spill_file=Path(state) / "spill.jsonl")
gateway = Gateway(config, store, engine, AdapterSet(store, engine, "base"))
client = TestClient(gateway_app(gateway, hooks=[]))
auth = {"authorization": "Bearer token"}
for path in ("", "/current", "/1", "/commands/1"):
    assert client.get(f"/admin/rollouts{path}", headers=auth).status_code in (200, 404), path
for path, body in (("", {"adapter": "a"}), ("/current/pause", None)):
    assert client.post(f"/admin/rollouts{path}", json=body, headers=auth).status_code == 409
print(sorted({"scipy", "torch"} & {m.split(".")[0] for m in sys.modules}))
"""


def test_the_gateway_process_imports_neither_scipy_nor_torch() -> None:
    """`tunewatch serve` runs the CLI, the gateway and the rollouts' admin API in one process:
    the API needs the guards' types, never their statistics."""
    done = subprocess.run(
        [sys.executable, "-c", GATEWAY_PROBE], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
