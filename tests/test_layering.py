"""The shape of the code (docs/architecture.md): layers, no import circles, one module
that drives the protocol, no reading of another module's private names.

Imports are read from the source (every ``import``, in functions and under
``TYPE_CHECKING`` too), so a circle cannot hide behind a late import.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Lowest first.  A module may import its own layer or lower ones, never higher.
LAYERS: list[set[str]] = [
    {"protocol"},                                                     # sans-IO
    {"utesla_node.errors", "utesla_node.rules", "utesla_node.logs", "utesla_node.metrics",
     "utesla_node.graph", "utesla_node.ratelimit", "utesla_node.version", "utesla_node.timers",
     "utesla_node.eager", "utesla_node.proxy", "utesla_node.workers", "utesla_node.loopwatch"},
    {"utesla_node.config", "utesla_node.keys", "utesla_node.storage", "utesla_node.status"},
    {"utesla_node.auth", "utesla_node.services", "utesla_node.transport"},
    {"utesla_node.gate", "utesla_node.response", "utesla_node.client", "utesla_node.admin",
     "utesla_node.revocation"},
    {"utesla_node.network"},                                          # links, gossip, router
    {"utesla_node.builtins"},
    {"utesla_node.dispatch", "utesla_node.metrics_http"},
    {"utesla_node.server"},                                           # the composition root
    {"utesla_node.cli", "utesla_node.__main__", "utesla_node"},        # faces
]


def _unit(module: str) -> str:
    """The layer unit a module belongs to: the longest listed prefix."""
    best = ""
    for layer in LAYERS:
        for name in layer:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best = name
    return best


def _layer(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"{unit!r} is in no layer of tests/test_layering.py")


def _modules() -> dict[str, Path]:
    found = {}
    for top in ("protocol", "utesla_node"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # ``from pkg import sub`` imports the submodule; ``from pkg import Name``, pkg.
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix
                     for a in node.names]
        else:
            continue
        for name in names:
            # The most specific module of ours the name refers to.
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_circle():
    assert _cycles(GRAPH) == []


def test_no_module_imports_a_higher_layer():
    wrong = []
    for src, targets in GRAPH.items():
        s = _layer(_unit(src))
        for dst in targets:
            if src.startswith(_unit(dst)) and _unit(dst) == _unit(src):
                continue
            if _layer(_unit(dst)) > s:
                wrong.append(f"{src} -> {dst}")
    assert wrong == []


def test_only_the_faces_import_the_node():
    users = sorted(src for src, targets in GRAPH.items() if "utesla_node.server" in targets)
    assert all(u == "utesla_node" or u.startswith(("utesla_node.cli", "utesla_node.__main__"))
               for u in users), users


def test_the_protocol_imports_nothing_of_the_runtime():
    assert not [(s, d) for s, ts in GRAPH.items() if s.startswith("protocol")
                for d in ts if d.startswith("utesla_node")]


def test_a_cycle_is_seen():
    """The checker itself: a circle it must find."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("utesla_node")))
def test_only_the_transport_drives_the_protocol_connection(module):
    """No module but transport.py builds a ``Connection`` or calls a session's ``conn``."""
    if module == "utesla_node.transport":
        return
    tree = ast.parse(MODULES[module].read_text())
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "conn" and not (
                isinstance(node.value, ast.Name) and node.value.id == "self"):
            bad.append(f"line {node.lineno}: .conn")
        if isinstance(node, ast.Name) and node.id == "Connection":
            bad.append(f"line {node.lineno}: Connection")
    assert bad == []


def _private_names_defined(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)                       # __slots__ entries
    return {n for n in names if n.startswith("_") and not n.startswith("__")} | NAMEDTUPLE_API


#: Public API of namedtuples, whatever its spelling.
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}
#: asyncio's task protocol, which eager.py replays on Python 3.10/3.11 (what a Task does
#: with the future a coroutine yields, and the registry current_task() reads).
ASYNCIO_TASK_PROTOCOL = {"utesla_node.eager": {"_asyncio_future_blocking", "_current_tasks"}}
#: Standard-library functions documented as public despite the underscore
#: (``sys._current_frames``: the loop watchdog's view of the loop's stack).
DOCUMENTED_UNDERSCORE_API = {"_current_frames"}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("utesla_node")))
def test_no_module_reads_another_modules_private_names(module):
    """``obj._name`` only where ``_name`` belongs to the module itself."""
    tree = ast.parse(MODULES[module].read_text())
    own = (_private_names_defined(tree) | ASYNCIO_TASK_PROTOCOL.get(module, set())
           | DOCUMENTED_UNDERSCORE_API)
    bad = sorted({f"line {n.lineno}: .{n.attr}" for n in ast.walk(tree)
                  if isinstance(n, ast.Attribute) and n.attr.startswith("_")
                  and not n.attr.startswith("__") and n.attr not in own})
    assert bad == []
