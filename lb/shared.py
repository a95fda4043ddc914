"""Memory shared by the master and every worker: the state that makes them one balancer.

The master creates it (a memfd) and hands it to each worker with the listening sockets.
It is an array of 64-bit integers; `Layout` gives every frontend, backend and server its
fixed place, derived from the configuration, so every process finds the same entry for the
same name without asking anyone.

Ownership keeps it free of locks: the master alone writes a server's state, weight and
limits (health checks, runtime commands); each worker writes only its own column of the
connection counts and its own block of traffic counters (its *slot*, given by the master;
lb.counters), and readers sum the columns.
Round-robin tickets are the one shared read-modify-write: two workers drawing at the same
instant may both get the same ticket, which costs one repeated server, never a request.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import time
from collections.abc import Iterator

from lb import config
from lb.counters import WORDS as COUNTER_WORDS

# Server states
DOWN, UP = 0, 1
READY, DRAIN, MAINT = 0, 1, 2

# Field offsets inside each kind of entry; each entry ends with one counter per worker slot.
GLOBAL_MAXCONN = 0
GLOBAL_FIELDS = 1

FE_MAXCONN, FE_DISABLED = 0, 1
FE_SMAX = 2  # the most connections open at once (workers write it under the limits lock)
FE_FIELDS = 3  # then a connection count per slot, then a TLS connection count per slot

BE_TICKET, BE_VERSION = 0, 1  # round-robin position; bumped when weights or states change
BE_HOLD = 2  # hold-when-down, as configured or set at run time (1: on)
BE_FIELDS = 3

(
    SRV_OP, SRV_ADMIN, SRV_WEIGHT, SRV_MAXCONN, SRV_LASTCHG, SRV_CHKFAIL, SRV_CHKDOWN,
    SRV_CHECK_STATUS, SRV_CHECK_CODE, SRV_CHECK_MS, SRV_BACKEND, SRV_SMAX,
    SRV_DOWNTIME, SRV_DOWNSINCE,  # seconds DOWN before the last time up; when it went down
) = range(14)
SRV_FIELDS = 14

# Check status codes kept in SRV_CHECK_STATUS (names as in HAProxy's show stat)
CHECK_STATUSES = ("", "INI", "L4OK", "L4CON", "L4TOUT", "L7OK", "L7STS", "L7RSP", "L7TOUT",
                  # checks over TLS (lb.check); appended, so earlier codes keep their value
                  "L6OK", "L6RSP", "L6TOUT")


class Layout:
    """Where each entry lives, in 64-bit words. Each generation of workers has its own
    segment, so a worker slot (a counter column) is needed per configured worker: a
    replacement takes the slot of the worker it replaces.

    After the entries come the traffic counters (lb.counters): per frontend and server a
    block per slot and one more, the last, that the master writes (what was counted
    before: lb.tally); per backend that one block only, since its requests are counted
    on its servers."""

    def __init__(self, cfg: config.Config) -> None:
        self.slots = slots = cfg.global_.workers
        size = GLOBAL_FIELDS + slots
        self.global_ = 0
        self.frontends: dict[str, int] = {}
        for name in cfg.frontends:
            self.frontends[name] = size
            size += FE_FIELDS + 2 * slots
        self.backends: dict[str, int] = {}
        self.servers: dict[tuple[str, str], int] = {}
        for name, backend in cfg.backends.items():
            self.backends[name] = size
            size += BE_FIELDS
            for server in backend.servers:
                self.servers[(name, server.name)] = size
                size += SRV_FIELDS + slots
        self.entries = size  # the words before the counter blocks: the runtime state
        # the counter blocks: where each one's first block (slot 0) starts
        self.frontend_counters: dict[str, int] = {}
        for name in self.frontends:
            self.frontend_counters[name] = size
            size += (slots + 1) * COUNTER_WORDS
        self.server_counters: dict[tuple[str, str], int] = {}
        for key in self.servers:
            self.server_counters[key] = size
            size += (slots + 1) * COUNTER_WORDS
        self.backend_counters: dict[str, int] = {}
        for name in self.backends:
            self.backend_counters[name] = size
            size += COUNTER_WORDS
        self.words = size

    def block(self, first: int, slot: int) -> int:
        """Where a slot's block of counters starts (slot == slots: the master's)."""
        return first + slot * COUNTER_WORDS


class Shared:
    def __init__(self, fd: int, cfg: config.Config) -> None:
        self.fd = fd
        self.layout = Layout(cfg)
        self._memory = mmap.mmap(fd, self.layout.words * 8)
        self.words = memoryview(self._memory).cast("q")

    @classmethod
    def create(cls, cfg: config.Config) -> Shared:
        """A new segment with the configuration's starting values (master only)."""
        fd = os.memfd_create("pylb-shared", 0)
        os.ftruncate(fd, Layout(cfg).words * 8)
        shared = cls(fd, cfg)
        words = shared.words
        layout = shared.layout
        words[GLOBAL_MAXCONN] = cfg.global_.maxconn
        for name, frontend in cfg.frontends.items():
            words[layout.frontends[name] + FE_MAXCONN] = frontend.maxconn
        now = int(time.time())
        for name, backend in cfg.backends.items():
            words[layout.backends[name] + BE_HOLD] = backend.hold_when_down
            for server in backend.servers:
                base = layout.servers[(name, server.name)]
                words[base + SRV_OP] = UP  # servers start up, as in HAProxy
                words[base + SRV_WEIGHT] = server.weight
                words[base + SRV_MAXCONN] = server.maxconn
                words[base + SRV_LASTCHG] = now
                words[base + SRV_CHECK_STATUS] = 1 if server.check else 0
                words[base + SRV_BACKEND] = layout.backends[name]
        return shared

    def changed(self, server_base: int) -> None:
        """Tell workers a server's state or weight changed (master only)."""
        words = self.words
        backend = words[server_base + SRV_BACKEND]
        words[backend + BE_VERSION] += 1
        words[server_base + SRV_LASTCHG] = int(time.time())

    @contextlib.contextmanager
    def limits_lock(self) -> Iterator[None]:
        """Held by a worker between checking a connection limit and counting a connection
        in, so that two workers admitting at the same instant cannot both take the last
        place. A lock on the segment's first byte: two system calls per new connection."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)

    def close(self) -> None:
        """The master lets go of an old generation's segment (its workers keep theirs)."""
        self.words.release()
        self._memory.close()
        os.close(self.fd)

    def total(self, first_counter: int) -> int:
        """The sum of an entry's per-slot counters: its value for pylb as a whole."""
        return sum(self.words[first_counter : first_counter + self.layout.slots])

    def clear_slot(self, slot: int) -> None:
        """Forget a departed worker's counters (master only)."""
        words = self.words
        layout = self.layout
        if not 0 <= slot < layout.slots:
            return
        words[GLOBAL_FIELDS + slot] = 0
        for base in layout.frontends.values():
            words[base + FE_FIELDS + slot] = 0
            words[base + FE_FIELDS + layout.slots + slot] = 0  # its TLS connections
        for base in layout.servers.values():
            words[base + SRV_FIELDS + slot] = 0
