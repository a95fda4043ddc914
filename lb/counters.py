"""Traffic counters of one worker, per frontend, backend and server.

Each worker counts what it does in plain integers; the master asks every worker for them
when an operator runs `show stat` or `show info`, and adds them up. Counting stays off the
shared memory so the request path never touches another process's cache lines.
"""

from __future__ import annotations

FIELDS = (
    "stot",  # connections (frontend) or requests sent (backend, server)
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
)
HRSP = ("hrsp_other", "hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx")
ALL = FIELDS + HRSP


class Counters:
    __slots__ = (*FIELDS, "hrsp")

    def __init__(self) -> None:
        for name in FIELDS:
            setattr(self, name, 0)
        self.hrsp = [0] * 6  # answers by status class: [other, 1xx, 2xx, 3xx, 4xx, 5xx]

    def response(self, status: int) -> None:
        """Count an answer sent to a client, by status class."""
        self.hrsp[status // 100 if 100 <= status < 600 else 0] += 1

    def as_list(self) -> list[int]:
        return [*(getattr(self, name) for name in FIELDS), *self.hrsp]


def add(total: dict[str, int], values: list[int]) -> None:
    """Add one worker's counters (as sent) into a running total."""
    for name, value in zip(ALL, values, strict=True):
        total[name] = total.get(name, 0) + value


def zero() -> dict[str, int]:
    return dict.fromkeys(ALL, 0)
