"""What a tree of processes costs, read from /proc (Linux): CPU seconds, PSS, machine load.

The benchmark measures every process it starts, children included (a stage peer's forked DHT and averagers, the
p2p daemons), so CPU that moves out of the main process is still counted. Nothing here needs psutil.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcInfo:
    """One process as /proc shows it at one instant."""

    pid: int
    ppid: int
    comm: str
    start_ticks: int  # since boot: orders a parent's children by creation
    cpu_s: float  # user + system, this process only (its threads included, its children not)


def read_proc(pid: int) -> Optional[ProcInfo]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:  # gone
        return None
    # the name is in parentheses and may hold spaces: split after the last ')'
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state) of proc(5): ppid is 4, utime 14, stime 15, starttime 22
    return ProcInfo(
        pid=pid,
        ppid=int(fields[1]),
        comm=name,
        start_ticks=int(fields[19]),
        cpu_s=(int(fields[11]) + int(fields[12])) * TICK_S,
    )


def all_processes() -> Dict[int, ProcInfo]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = read_proc(int(entry))
            if info is not None:
                out[info.pid] = info
    return out


def descendants(root: int, table: Optional[Dict[int, ProcInfo]] = None) -> Dict[int, ProcInfo]:
    """``root``'s children, grandchildren... (not ``root`` itself), from one scan of /proc."""
    table = all_processes() if table is None else table
    children: Dict[int, List[int]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info.pid)
    out, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out[pid] = table[pid]
        todo.extend(children.get(pid, []))
    return out


def pss_bytes(pids: Iterable[int]) -> int:
    """Proportional set size summed over ``pids`` (shared pages split among the processes that map them)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def loadavg() -> Tuple[float, float, float]:
    with open("/proc/loadavg") as f:
        one, five, fifteen = f.read().split()[:3]
    return float(one), float(five), float(fifteen)


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (every state of /proc/stat's cpu line but idle
    and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; guest time is already in user
    return (sum(fields[:8]) - fields[3] - fields[4]) * TICK_S
