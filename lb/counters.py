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
    "hrsp_1xx",
    "hrsp_2xx",
    "hrsp_3xx",
    "hrsp_4xx",
    "hrsp_5xx",
    "hrsp_other",
)
_STATUS_FIELD = {1: "hrsp_1xx", 2: "hrsp_2xx", 3: "hrsp_3xx", 4: "hrsp_4xx", 5: "hrsp_5xx"}


class Counters:
    __slots__ = FIELDS

    def __init__(self) -> None:
        for name in FIELDS:
            setattr(self, name, 0)

    def response(self, status: int) -> None:
        """Count an answer sent to a client, by status class."""
        name = _STATUS_FIELD.get(status // 100, "hrsp_other")
        setattr(self, name, getattr(self, name) + 1)

    def as_list(self) -> list[int]:
        return [getattr(self, name) for name in FIELDS]


def add(total: dict[str, int], values: list[int]) -> None:
    """Add one worker's counters (as sent) into a running total."""
    for name, value in zip(FIELDS, values, strict=True):
        total[name] = total.get(name, 0) + value


def zero() -> dict[str, int]:
    return dict.fromkeys(FIELDS, 0)
