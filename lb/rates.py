"""Rates, their maxima and average request times, measured by the master from the sums of
the traffic counters (lb.tally), for `show info`, `show stat` and /metrics.

The master samples the sums of a few counters every SAMPLE_PERIOD; a rate is what was
counted over about the last second, per second (HAProxy's are over the last second
too). Request times are averaged over the requests answered in that second (HAProxy
averages its last 1024): the last averages measured stay while none are answered.
Sampling is only the counters it needs, and slows down when it costs more than
MAX_SHARE of the master's time (a configuration of many thousand servers).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from lb.counters import (
    BOUT,
    CTIME_SUM,
    QTIME_SUM,
    REQ_TOT,
    RTIME_SUM,
    SSL_CONNS,
    SSL_REUSED,
    STOT,
    TIMED,
    TTIME_SUM,
    WORDS,
)
from lb.shared import Shared
from lb.tally import Key, Tally

SAMPLE_PERIOD = 0.5  # seconds between two samples, at least
WINDOW = 1.0  # seconds a rate or an average is measured over
MAX_SHARE = 0.02  # of the master's time that sampling may take
RATED = (STOT, REQ_TOT, SSL_CONNS, SSL_REUSED, BOUT)
TIMES = (TIMED, QTIME_SUM, CTIME_SUM, RTIME_SUM, TTIME_SUM)
PROCESS: Key = ("process", "")  # pylb as a whole: its frontends' sums
NEW_KEYS: Key = ("process", "new keys")  # its full TLS handshakes (in SSL_CONNS)


class Rate:
    """Events per second over about the last WINDOW, and the highest seen."""

    __slots__ = ("points", "rate", "max")

    def __init__(self, now: float, value: int) -> None:
        self.points: deque[tuple[float, int]] = deque([(now, value)])
        self.rate = 0
        self.max = 0

    def update(self, now: float, value: int) -> None:
        points = self.points
        if value < points[-1][1]:  # counters cleared: measure from here
            points.clear()
        points.append((now, value))
        while len(points) > 2 and now - points[1][0] >= WINDOW:
            points.popleft()  # keep one sample at least WINDOW old, if there is one
        then, before = points[0]
        self.rate = round((value - before) / (now - then)) if now > then else 0
        self.max = max(self.max, self.rate)


NO_RATE = Rate(0.0, 0)


class Averages:
    """Average queue, connect, response and total times (ms) over about the last WINDOW;
    the last ones measured while no request is answered."""

    __slots__ = ("points", "ms")

    def __init__(self, now: float) -> None:
        # from 0: the first sample averages everything answered so far
        self.points: deque[tuple[float, list[int]]] = deque([(now, [0] * len(TIMES))])
        self.ms: list[int] | None = None  # None: no request measured yet

    def update(self, now: float, values: list[int]) -> None:
        points = self.points
        if values[0] < points[-1][1][0]:  # counters cleared
            points.clear()
        points.append((now, values))
        while len(points) > 2 and now - points[1][0] >= WINDOW:
            points.popleft()
        before = points[0][1]
        count = values[0] - before[0]
        if count > 0:
            self.ms = [round((a - b) / count) for a, b in zip(values[1:], before[1:],
                                                               strict=True)]


@dataclass
class Rates:
    rates: dict[tuple[Key, int], Rate] = field(default_factory=dict)
    averages: dict[Key, Averages] = field(default_factory=dict)
    sampled: float = 0.0  # monotonic time of the last sample; 0: none yet
    period: float = SAMPLE_PERIOD  # until the next one

    def sample(self, tally: Tally, current: Shared, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        totals = tally.totals(current, RATED + TIMES)
        process = tally.process(totals)
        for key, values in totals.items():
            if key[0] in ("be", "srv"):
                averages = self.averages.get(key)
                if averages is None:
                    averages = self.averages[key] = Averages(now)
                averages.update(now, [values[index] for index in TIMES])
        totals[PROCESS] = process
        totals[NEW_KEYS] = [0] * WORDS
        totals[NEW_KEYS][SSL_CONNS] = process[SSL_CONNS] - process[SSL_REUSED]
        since = self.sampled or now  # (a key new since: counted from 0 since then)
        for key, values in totals.items():
            for index in RATED:
                rate = self.rates.get((key, index))
                if rate is None:
                    rate = self.rates[(key, index)] = Rate(since, 0 if self.sampled else
                                                           values[index])
                rate.update(now, values[index])
        self.sampled = now
        cost = time.monotonic() - now
        self.period = max(SAMPLE_PERIOD, cost / MAX_SHARE)

    def rate(self, key: Key, index: int) -> Rate:
        return self.rates.get((key, index)) or NO_RATE

    def process_rate(self, index: int) -> Rate:
        """A rate of pylb as a whole (all frontends)."""
        return self.rate(PROCESS, index)

    def average_times(self, key: Key) -> list[int] | None:
        """[qtime, ctime, rtime, ttime] in ms, averaged over the last requests answered;
        None before the first."""
        averages = self.averages.get(key)
        return averages.ms if averages is not None else None

    def clear_max(self) -> None:
        for rate in self.rates.values():
            rate.max = 0
