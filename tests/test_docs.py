"""The README's quick start, executed: its shell blocks run as written, so it cannot drift.

The blocks of both "Quick start" sections are concatenated into one bash script and run
in a temporary folder that looks like a checkout (``.venv`` and ``complements``).  Only
two things change: the ports 17000/17001 become free ports, and a node started in the
background (``utesla-node ... &``) is waited for before the next line.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from helpers import REPO, free_port

README = REPO / "README.md"


def quick_start_blocks() -> list[str]:
    text = README.read_text()
    blocks = []
    for section in re.split(r"^## ", text, flags=re.M):
        if section.startswith("Quick start"):
            blocks += re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    return blocks


def build_script(blocks: list[str], p1: int, p2: int) -> str:
    lines = ["set -euo pipefail",
             "wait_port() { for i in $(seq 1 300); do "
             "(exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; "
             "echo \"port $1 never opened\" >&2; return 1; }"]
    for block in blocks:
        for line in block.splitlines():
            code = line.split("  #", 1)[0].rstrip() if "  #" in line else line
            code = code.replace("17000", str(p1)).replace("17001", str(p2))
            if code.startswith("utesla-node") and code.endswith("&"):
                if "--port" not in code:
                    code = code[:-1].rstrip() + f" --port {p1} &"
                port = p2 if f"--port {p2}" in code else p1
                lines.append(code[:-1].rstrip() + " > node.out 2> node.err &")
                lines.append("echo $! >> \"$PIDS\"")
                lines.append(f"wait_port {port}")
            else:
                lines.append(code)
    return "\n".join(lines) + "\n"


def test_readme_has_both_quick_starts():
    blocks = quick_start_blocks()
    text = "\n".join(blocks)
    assert len(blocks) >= 5
    for needle in ("generate_keys", "add -u alice", "generate_token", "add_network",
                   "show_services", "hello_friend"):
        assert needle in text, needle


def test_readme_quick_start_runs(tmp_path):
    root = tmp_path / "checkout"
    root.mkdir()
    (root / ".venv").symlink_to(Path(sys.prefix))     # the virtual environment we run in
    shutil.copytree(REPO / "complements", root / "complements")
    pids = tmp_path / "pids"
    pids.touch()
    script = build_script(quick_start_blocks(), free_port(), free_port())
    (tmp_path / "quickstart.sh").write_text(script)
    env = {**os.environ, "PIDS": str(pids), "PATH": f"{Path(sys.prefix) / 'bin'}:{os.environ['PATH']}"}
    try:
        proc = subprocess.run(["bash", str(tmp_path / "quickstart.sh")], cwd=root, env=env,
                              capture_output=True, text=True, timeout=180)
    finally:
        for pid in pids.read_text().split():
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass
    logs = "".join(p.read_text() for p in root.rglob("node.err"))
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}\nlogs:\n{logs}"
    assert "Hello World!" in proc.stdout
    assert "hello friend!" in proc.stdout
    assert "/hello_friend" in proc.stdout          # show_services lists the learned route
    # Tokens are secrets: no listing command printed one.
    listing = proc.stdout.split("hello friend!")[0]
    assert not re.search(r"ut1_[A-Za-z0-9_-]{20,}", listing.split("Hello World!")[-1])
