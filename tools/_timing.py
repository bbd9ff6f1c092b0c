"""Timing on a shared machine: each timed call also reports how much of the CPU other processes used meanwhile.

A call is *clean* when other processes used at most ``CONTENDED`` of the machine's CPU time during it (from
``/proc/stat`` minus this process's ``/proc/self/stat``; cpu_measurements.md's technique). Benchmarks report medians
of clean calls, or of every call (marked contended) when too few were clean.
"""

from __future__ import annotations

import time
from typing import Any, Callable

CONTENDED = 0.05


def _machine_jiffies() -> tuple[int, int]:
    """(busy jiffies of the whole machine, total jiffies)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])
    return total - idle, total


def _own_jiffies() -> int:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (children not included)


def measure(fn: Callable[[], Any], reps: int = 1) -> tuple[Any, float, float]:
    """Run ``fn`` ``reps`` times; return (last result, seconds per call, CPU share used by other processes)."""
    b0, t0 = _machine_jiffies()
    s0 = _own_jiffies()
    start = time.perf_counter()
    out = None
    for _ in range(reps):
        out = fn()
    elapsed = (time.perf_counter() - start) / reps
    b1, t1 = _machine_jiffies()
    s1 = _own_jiffies()
    other = max((b1 - b0) - (s1 - s0), 0) / max(t1 - t0, 1)
    return out, elapsed, other


def timed_call(fn: Callable[[], Any], reps: int = 1) -> tuple[float, float]:
    """(seconds per call, CPU share used by other processes)."""
    _, elapsed, other = measure(fn, reps)
    return elapsed, other
