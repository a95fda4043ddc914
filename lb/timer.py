"""Connection timeouts on a coarse clock.

A timer handle per request costs more than the request's parsing does, so connections
carry a plain `deadline` (seconds on `clock.now`) and one sweep per tick expires the late
ones. Timeouts are precise to one tick (TICK) either way, plenty for limits given in
seconds, also when the loop runs late (see `_sweep`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

TICK = 0.05
LAG_MEMORY = 60.0  # seconds a late sweep keeps delaying expiries (see `_sweep`)


class Expiring(Protocol):
    deadline: float

    def on_timeout(self) -> None: ...


class Clock:
    """The time, refreshed once per tick; the sweeper expires late connections."""

    def __init__(self) -> None:
        self.now = time.monotonic()
        self.watched: set[Expiring] = set()
        self.on_tick: list[Callable[[], None]] = []  # periodic chores, run after the sweep
        self._task: asyncio.Task[None] | None = None
        self._lags: deque[tuple[float, float]] = deque()  # (when, how late) of late sweeps

    def start(self) -> None:
        # The clock may have been made long before (a worker forked from the template
        # imported this module then): deadlines set before the first sweep count from now.
        self.now = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._sweep())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            # A deadline counts from `now` as the last sweep set it: up to a tick old, and
            # more when the loop ran late (a busy machine). Expire deadlines that much
            # later, for as long as one set while the loop was late may still be waiting.
            lag = now - self.now - TICK
            self.now = now
            lags = self._lags
            if lag > 0.001:
                lags.append((now, lag))
            while lags and lags[0][0] < now - LAG_MEMORY:
                lags.popleft()
            slack = max(behind for _, behind in lags) if lags else 0.0
            late = [conn for conn in self.watched if conn.deadline + slack <= now]
            for conn in late:
                conn.on_timeout()
            for chore in self.on_tick:
                chore()


clock = Clock()
