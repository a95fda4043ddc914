"""How busy the workers are, measured by the master once a second for `show info`.

A worker's event loop is idle while it waits in epoll and busy while it runs, so the CPU
time a worker used over a second is its loop's busy time: `Idle_pct` is 100 minus the
workers' average CPU share (HAProxy averages its threads' idle time the same way).
`Run_queue` counts the workers the kernel has running or waiting for a CPU at the
sample (state R), the nearest measure of work waiting to run that a process can see
from outside.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import psutil


@dataclass
class ProcessLoad:
    idle_pct: int | str = ""  # "" until the first sample
    run_queue: int | str = ""
    rss_bytes: int = 0  # the workers' resident memory, summed
    _cpu: dict[int, float] = field(default_factory=dict)  # pid: CPU seconds at the last sample
    _procs: dict[int, psutil.Process] = field(default_factory=dict)
    _sampled: float = 0.0  # monotonic time of the last sample; 0: none yet

    @property
    def sampled(self) -> bool:
        return self._sampled > 0

    def sample(self, pids: list[int], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        seconds, self._sampled = now - self._sampled, now
        shares: list[float] = []  # each worker's CPU share over the period
        running = rss = 0
        cpu: dict[int, float] = {}
        for pid in pids:
            try:
                proc = self._procs.get(pid) or self._procs.setdefault(pid, psutil.Process(pid))
                with proc.oneshot():
                    times = proc.cpu_times()
                    status = proc.status()
                    rss += proc.memory_info().rss
                    born = proc.create_time()
            except (psutil.Error, OSError):  # exited meanwhile (or /proc hides it)
                continue
            cpu[pid] = used = times.user + times.system
            running += status == psutil.STATUS_RUNNING
            if pid in self._cpu and seconds > 0:
                shares.append((used - self._cpu[pid]) / seconds)
            else:  # new since the last sample: over its life so far
                shares.append(used / max(time.time() - born, 0.01))
        self._procs = {pid: proc for pid, proc in self._procs.items() if pid in cpu}
        self._cpu = cpu
        self.rss_bytes = rss
        self.run_queue = running
        if shares:
            share = sum(shares) / len(shares)
            self.idle_pct = max(0, min(100, round(100 * (1 - share))))


def memory_limit_mb() -> int:
    """The memory limit of pylb's processes, in MB (HAProxy's Memmax_MB, set there by
    -m): their address space limit; 0 when there is none."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    return 0 if soft == resource.RLIM_INFINITY else soft // (1 << 20)
