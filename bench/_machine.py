"""What every bench prints first: how busy the machine is, so a figure taken on shared cores is
never mistaken for a quiet-machine one, and the fp32 matmul peak measured in the same run (the
yardstick for GFLOP/s figures).

    from _machine import machine_report, matmul_peak
    print(machine_report())          # load average, other processes' CPU share, a loud warning
"""
from __future__ import annotations

import os
import time

BUSY_SHARE = 0.15   # other processes using more than this share of the cores = "busy"


def cores() -> int:
    """CPU cores this process may use (the affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat (None where there is no /proc)."""
    try:
        with open("/proc/stat") as fh:
            vals = [float(v) for v in fh.readline().split()[1:]]
    except OSError:
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0.0)
    return sum(vals) - idle, sum(vals)


def _own_jiffies() -> float:
    t = os.times()
    return (t.user + t.system + t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK")


def other_cpu_share(seconds: float = 1.0) -> float | None:
    """Share of all CPUs that OTHER processes kept busy over ``seconds`` (this one excluded)."""
    a, own_a = _cpu_times(), _own_jiffies()
    if a is None:
        return None
    time.sleep(seconds)
    b, own_b = _cpu_times(), _own_jiffies()
    total = b[1] - a[1]
    if total <= 0:
        return None
    return max(0.0, (b[0] - a[0]) - (own_b - own_a)) / total


def machine_report(sample_s: float = 1.0) -> str:
    """One or more lines: date, load average, cores, other processes' CPU share; a loud warning
    when the cores are busy (figures then measure the sharing, not irkit)."""
    n = cores()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    share = other_cpu_share(sample_s)
    share_txt = "unknown" if share is None else f"{100 * share:.0f}%"
    lines = [f"machine: {time.strftime('%Y-%m-%d %H:%M')}, {n} usable cores, load average "
             f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min), other processes' CPU share "
             f"{share_txt} over {sample_s:.0f} s"]
    # the other processes' CPU share is the measure when it can be read: the load average lags by
    # minutes and counts this benchmark's own threads (and its server's)
    busy = share > BUSY_SHARE if share is not None else load[0] > 0.5 * n
    if busy:
        lines.append("!" * 78)
        lines.append(f"!!! WARNING: the machine is BUSY (load {load[0]:.1f} on {n} cores, others use "
                     f"{share_txt} of the CPU).")
        lines.append("!!! Times below measure sharing the cores; ratios within this run are fairer, but "
                     "report them as 'loaded machine'.")
        lines.append("!" * 78)
    return "\n".join(lines)


def matmul_peak(threads: int | None = None, n: int = 2048, repeats: int = 5) -> float:
    """fp32 GFLOP/s of an n x n x n matmul (best of ``repeats``) with ``threads`` torch threads."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 2 * n ** 3 / best / 1e9
