"""Traffic counters of one worker, per frontend and server, in shared memory.

Each frontend and server has a block of counters per worker slot in the generation's
shared memory (lb.shared), plus one block the master alone writes: what was counted
before, carried over from older generations and takeovers (lb.tally). A worker adds to
its own block only, so counting takes no lock and never touches another worker's cache
lines; the master sums the blocks when an operator asks. Because the counts sit in the
segment and not in the worker, a worker that is killed loses none of them: its
replacement takes its slot and goes on adding to the same block.

The request path adds to a block through `Counters.w`, indexed by the constants below
(`counters.w[REQ_TOT] += 1`): in the compiled build that is a C array access.
"""

from __future__ import annotations

from typing import Any

# One word each, in this order, in every block. Keep in step with counters.pxd.
NAMES = (
    "stot",  # connections (frontend) or requests sent (server)
    "bin",  # bytes from clients
    "bout",  # bytes to clients
    "dreq",  # requests denied by rules
    "ereq",  # bad requests
    "econ",  # connect errors
    "eresp",  # bad or missing responses
    "wretr",  # retries
    "wredis",  # redispatches
    "lbtot",  # times chosen by balancing or persistence
    "req_tot",  # HTTP requests
    "cli_abrt",  # aborted by the client
    "srv_abrt",  # aborted by the server
    "hrsp_other", "hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx",  # answers
    "connect",  # connections opened to the server
    "reuse",  # ... and idle ones used again
    "dcon",  # connections refused by tcp-request connection rules
    "intercepted",  # requests pylb answered itself (rules, monitor-uri, stats pages)
    "dropped_logs",  # request log lines that could not be written
    "ssl_conns",  # client connections over TLS (frontend)
    "ssl_reused",  # ... of which resumed a session
    # HTTP requests answered by a server, and their times in ms added up (averages over
    # a period are the differences' ratio): waiting in a queue, connecting, waiting for
    # the answer's head, in all
    "timed", "qtime_sum", "ctime_sum", "rtime_sum", "ttime_sum",
    # the longest of each (ms), and when a request last went to the server (CLOCK_MONOTONIC
    # seconds): a block's highest, not its sum
    "qtime_max", "ctime_max", "rtime_max", "ttime_max", "lastsess",
)
(
    STOT, BIN, BOUT, DREQ, EREQ, ECON, ERESP, WRETR, WREDIS, LBTOT, REQ_TOT, CLI_ABRT,
    SRV_ABRT, HRSP_OTHER, HRSP_1XX, HRSP_2XX, HRSP_3XX, HRSP_4XX, HRSP_5XX, CONNECT, REUSE,
    DCON, INTERCEPTED, DROPPED_LOGS, SSL_CONNS, SSL_REUSED, TIMED, QTIME_SUM, CTIME_SUM,
    RTIME_SUM, TTIME_SUM, QTIME_MAX, CTIME_MAX, RTIME_MAX, TTIME_MAX, LASTSESS,
) = range(36)
WORDS = len(NAMES)  # words per block
HIGHEST = (QTIME_MAX, CTIME_MAX, RTIME_MAX, TTIME_MAX, LASTSESS)  # not summed: the max

# The columns of `show stat` these counters fill, by HAProxy's names (the others go to
# show info, or have names of their own: ssl_sess, ssl_reused_sess)
STAT_COLUMNS = NAMES[:DROPPED_LOGS]


class Counters:
    """One worker's block of counters for one frontend or server."""

    __slots__ = ("w",)

    def __init__(self, words: Any, base: int) -> None:
        self.w = words[base : base + WORDS]

    def response(self, status: int) -> None:
        """Count an answer sent to a client, by status class."""
        self.w[HRSP_OTHER + (status // 100 if 100 <= status < 600 else 0)] += 1
