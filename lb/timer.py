"""Connection timeouts on a coarse clock.

A timer handle per request costs more than the request's parsing does, so connections
carry a plain `deadline` (seconds on `clock.now`) and one sweep per tick expires the late
ones. Timeouts are precise to one tick (TICK), plenty for limits given in seconds, and
never fire early.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

TICK = 0.05


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

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._sweep())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            # Deadlines set since the last sweep counted from a `now` up to this much too
            # old: when the loop ran late (a busy machine), expire them that much later,
            # never early.
            lag = max(now - self.now - TICK, 0.0)
            self.now = now
            late = [conn for conn in self.watched if conn.deadline + lag <= now]
            for conn in late:
                conn.on_timeout()
            for chore in self.on_tick:
                chore()


clock = Clock()
