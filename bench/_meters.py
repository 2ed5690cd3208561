"""What the benchmark scripts read from /proc: a process's CPU time and memory, the
machine's busy time, and a wait for a quiet machine (shared by bench_node and bench_bulk)."""
from __future__ import annotations

import os
import time

CLK = os.sysconf("SC_CLK_TCK")


def proc_field(pid: int, field: str) -> int:
    """``VmRSS``, ``VmHWM``, ... of /proc/PID/status, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def machine_busy() -> float:
    """CPU seconds all cores spent busy since boot (user+nice+system+irq+softirq+steal)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / CLK


def busy_pct(dt: float = 0.5) -> float:
    """Percent of one core the whole machine used over the next ``dt`` seconds."""
    b = machine_busy()
    time.sleep(dt)
    return 100 * (machine_busy() - b) / dt


def wait_quiet(limit: float, thresh: float = 20.0) -> float:
    """Wait (up to ``limit`` s) until the machine is nearly idle; the last load seen (%)."""
    end = time.monotonic() + limit
    while (b := busy_pct()) > thresh and time.monotonic() < end:
        pass
    return round(b, 1)
