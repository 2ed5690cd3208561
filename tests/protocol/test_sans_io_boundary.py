"""``protocol/`` is sans-IO (DESIGN.md §3): no asyncio, sockets, clocks, database or CLI."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROTOCOL = Path(__file__).resolve().parents[2] / "protocol"
FORBIDDEN = {"asyncio", "socket", "selectors", "ssl", "time", "datetime", "threading",
             "subprocess", "sqlite3", "aiomysql", "click", "uvloop", "utesla_node", "os"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(PROTOCOL.glob("*.py")), ids=lambda p: p.name)
def test_protocol_module_imports_no_io(path):
    assert not _imports(path) & FORBIDDEN


def test_the_clock_is_an_argument():
    """Timers take ``now``; nothing in protocol/ reads a clock."""
    source = "\n".join(p.read_text() for p in PROTOCOL.glob("*.py"))
    for call in ("time.time(", "time.monotonic(", "datetime.now(", "loop.time("):
        assert call not in source
