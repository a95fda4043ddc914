"""When a failed request may be tried again: HAProxy's `retries`, `retry-on` and
`option redispatch`, as one small policy per backend.

A retry replays the request on a new server connection. The HTTP session decides whether
it still can (it kept every byte it sent, and no byte of the answer reached the client);
this module says whether the backend wants it to, and where to. With `redispatch`, a
request that nothing binds to its server goes at once to one that has not failed it yet;
one that persistence (or a hashing algorithm) binds stays, unless the interval says
otherwise or its server is no longer usable. A retry that goes back to a server that
failed the request waits a turnaround first, which gives health checks the time to mark a
dead server down.
"""

from __future__ import annotations

from lb import config

# Failure kinds, in retry-on's words
CONN_FAILURE = "conn-failure"  # the connection could not be opened (refused, timed out)
EMPTY_RESPONSE = "empty-response"  # closed or reset before a byte of answer
JUNK_RESPONSE = "junk-response"  # an answer that is not HTTP
RESPONSE_TIMEOUT = "response-timeout"  # `timeout server` before a byte of answer

TURNAROUND_MAX = 1.0  # seconds before a retry on the same server (HAProxy's, for connects)

# Balancing algorithms that bind a request to one server, as persistence does: a retry
# stays on that server unless redispatched
PINNING_ALGORITHMS = frozenset(("source", "uri", "hdr"))

# Safe to send twice (RFC 9110 9.2.2): the only ones replayed once wholly sent, by default
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"))


class RetryPolicy:
    __slots__ = ("retries", "redispatch", "on", "statuses", "buffer", "non_idempotent",
                 "turnaround", "pinning")

    def __init__(self, cfg: config.Backend) -> None:
        self.retries = cfg.retries
        self.redispatch = cfg.redispatch
        self.on = frozenset(cfg.retry_on)  # failure kinds and statuses to retry on
        self.statuses = frozenset(w for w in cfg.retry_on if isinstance(w, int))
        self.buffer = cfg.retry_buffer
        self.non_idempotent = cfg.retry_non_idempotent
        self.turnaround = min(cfg.timeouts.connect, TURNAROUND_MAX)
        self.pinning = cfg.balance in PINNING_ALGORITHMS

    def replays(self, method: bytes, wholly_sent: bool) -> bool:
        """May a request that reached the server be sent again? Not a non-idempotent one
        the server received whole (it may have acted on it), unless the backend says so."""
        return not wholly_sent or method in IDEMPOTENT or self.non_idempotent

    def moves(self, left: int) -> bool:
        """Does the retry that leaves `left` retries go to another server?"""
        return redispatch_now(self.redispatch, self.retries, left)


def redispatch_now(interval: int, retries: int, left: int) -> bool:
    """HAProxy's redispatch interval for the retry that leaves `left` of `retries`:
    N > 0 every Nth retry; N < 0 every (retries + 1 + N)th, so -1 is the last retry;
    0 never."""
    done = retries - left  # this retry's number, from 1
    if interval == 0:
        return False
    period = interval if interval > 0 else max(1, retries + 1 + interval)
    return done % period == 0
