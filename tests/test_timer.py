"""The coarse clock of timeouts (lb.timer): precise to a tick, also when the loop is late."""

from __future__ import annotations

import asyncio
import time

import uvloop

from lb.timer import TICK, Clock


class Conn:
    def __init__(self, clock: Clock, timeout: float) -> None:
        self.start = time.monotonic()
        self.deadline = clock.now + timeout
        self.fired = asyncio.get_running_loop().create_future()

    def on_timeout(self) -> None:
        if not self.fired.done():
            self.fired.set_result(time.monotonic() - self.start)


def test_a_deadline_set_after_the_loop_stalled_is_not_early() -> None:
    """The loop is blocked 0.25 s; a deadline set right after counts from the stale `now`
    of the sweep before: it must still not expire more than a tick early."""

    async def test() -> None:
        clock = Clock()
        clock.start()
        await asyncio.sleep(2 * TICK)
        time.sleep(0.25)  # a busy worker: no sweep meanwhile
        conn = Conn(clock, 0.3)
        clock.watched.add(conn)
        waited = await asyncio.wait_for(conn.fired, 5)
        clock.stop()
        assert 0.3 - TICK <= waited <= 0.3 + 3 * TICK, waited

    uvloop.run(test())


def test_the_clock_starts_at_the_time_it_is_started() -> None:
    """A clock made long before its loop runs (a worker forked from the template):
    deadlines set before the first sweep count from the start, not from its making."""

    async def test() -> None:
        clock = Clock()
        time.sleep(0.3)
        clock.start()
        conn = Conn(clock, 0.2)
        clock.watched.add(conn)
        waited = await asyncio.wait_for(conn.fired, 5)
        clock.stop()
        assert waited >= 0.2 - TICK, waited

    uvloop.run(test())
