"""CPU accounting from ``/proc`` shared by the benchmarks (Linux; ``None`` / empty elsewhere).

Import it as ``bench.procstat`` with the repository root on ``sys.path``.
"""

from __future__ import annotations

import os

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_s() -> float | None:
    """CPU seconds all processes of the machine have used since boot (``/proc/stat``), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait
    return (sum(v[:8]) - v[3] - v[4]) / TICK


def tree_cpu(root: int, names: dict[tuple[int, int], str] | None = None) -> dict[tuple[int, int], float]:
    """(pid, start time) -> CPU seconds (user + system) of ``root`` and all its descendants.

    ``names``, when given, gets each one's command line (first words, 50 characters); a Ray
    worker's ``ray::...`` title replaces the name it had before it took up a task."""
    stats: dict[int, tuple[int, int, float]] = {}  # pid -> (ppid, start, cpu_s)
    try:
        entries = os.listdir("/proc")
    except OSError:
        return {}
    for d in entries:
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                raw = f.read().decode("latin-1")
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()  # after "pid (comm) "
        stats[int(d)] = (int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / TICK)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            key = (pid, stats[pid][1])
            out[key] = stats[pid][2]
            if names is not None:
                cmd = _command(pid)
                if key not in names or (cmd.startswith("ray::") and cmd != "ray::IDLE"):
                    names[key] = cmd
        todo += children.get(pid, [])
    return out


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode("latin-1").strip()
    except OSError:
        return "?"
    return " ".join(os.path.basename(w) if "/" in w else w for w in cmd.split()[:3])[:50]
