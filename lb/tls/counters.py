"""Counts of a frontend's TLS connections in one worker, for `show info` and `show stat`."""

from __future__ import annotations

import time
from typing import Any


class TlsCounters:
    """The TLS connections of one frontend in this worker, for `show info` and `show stat`
    (lb.runtime.stats): those open, those made, how many of them resumed a session, and
    HAProxy's rates over the last second (its freq_ctr: the count of the current one-second
    period plus the previous period's, prorated) of connections and of new keys (full
    handshakes)."""

    __slots__ = ("open", "total", "reused", "tick", "conns", "keys", "prev_conns", "prev_keys")
    PERIOD = 1000  # ms

    def __init__(self) -> None:
        self.open: set[Any] = set()  # the sessions of the TLS connections open
        self.total = 0
        self.reused = 0
        self.tick = -2 * self.PERIOD  # ms of CLOCK_MONOTONIC: the current period's start
        self.conns = self.keys = 0  # in the current period
        self.prev_conns = self.prev_keys = 0  # in the previous one

    def opened(self, session: Any, resumed: bool) -> None:
        self.open.add(session)
        self.total += 1
        now = int(time.monotonic() * 1000)
        if now - self.tick >= self.PERIOD:  # a new period; the last one becomes previous
            self.prev_conns, self.prev_keys = self.conns, self.keys
            self.tick += self.PERIOD
            self.conns = self.keys = 0
            if now - self.tick >= self.PERIOD:  # two periods or more without a connection
                self.prev_conns = self.prev_keys = 0
                self.tick = now
        self.conns += 1
        if resumed:
            self.reused += 1
        else:
            self.keys += 1

    def _window(self, now: int, past: int, current: int) -> int:
        """Events over the last second, times PERIOD (HAProxy's freq_ctr_total, with its
        correction for very low rates)."""
        remain = self.tick + self.PERIOD - now
        if remain < 0:  # the current period is over: it is the previous one now
            remain += self.PERIOD
            past, current = (current if remain >= 0 else 0), 0
        if not current and past <= 1:
            return past * self.PERIOD
        return past * remain + current * self.PERIOD

    def snapshot(self) -> dict[str, int]:
        """What the worker answers for `show info` and `show stat`; the rates are events
        over the last second times 1000 (divide, after adding up the workers)."""
        now = int(time.monotonic() * 1000)
        return {
            "cur": len(self.open), "cum": self.total, "reused": self.reused,
            "rate": self._window(now, self.prev_conns, self.conns),
            "keys": self._window(now, self.prev_keys, self.keys),
        }
