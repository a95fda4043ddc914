"""Backends and servers as a worker sees them: configuration plus shared runtime state.

A server's state, weight and limits are read from shared memory on every use, so what the
master (health checks, runtime commands) decides reaches every worker at once.
"""

from __future__ import annotations

from lb import balance, config
from lb.counters import Counters
from lb.retry import RetryPolicy
from lb.shared import (
    BE_HOLD,
    BE_TICKET,
    BE_VERSION,
    MAINT,
    READY,
    SRV_ADMIN,
    SRV_FIELDS,
    SRV_MAXCONN,
    SRV_OP,
    SRV_SMAX,
    SRV_WEIGHT,
    UP,
    Shared,
)
from lb.sticktable import StickTable
from lb.tls import client as tls_client


class Server:
    """A server: its configuration, and accessors to its shared runtime state."""

    __slots__ = (
        "name", "cfg", "backend", "host", "port", "cookie", "counters", "_words",
        "_base", "_mine", "_first", "_slots", "tls", "sni",
    )

    def __init__(self, cfg: config.Server, backend: Backend, shared: Shared, slot: int) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.backend = backend
        self.host = cfg.address.host
        self.port = cfg.address.port
        self.cookie = cfg.cookie
        layout = shared.layout
        key = (backend.name, cfg.name)
        self.counters = Counters(shared.words, layout.block(layout.server_counters[key], slot))
        self._words = shared.words
        self._base = layout.servers[key]
        self._first = self._base + SRV_FIELDS
        self._mine = self._first + slot
        self._slots = shared.layout.slots
        # TLS (ssl: true): the context, built once per worker, and the server_hostname to
        # connect with (lb.tls.client); None for plain TCP
        self.tls = tls_client.context(cfg, backend.cfg.mode)
        self.sni = tls_client.server_hostname(cfg) if self.tls is not None else None

    @property
    def up(self) -> bool:
        return self._words[self._base + SRV_OP] == UP

    @property
    def admin(self) -> int:
        return self._words[self._base + SRV_ADMIN]

    @property
    def weight(self) -> int:
        return self._words[self._base + SRV_WEIGHT]

    @property
    def maxconn(self) -> int:
        return self._words[self._base + SRV_MAXCONN]

    @property
    def selectable(self) -> bool:
        """May load balancing send it a new client? (up, ready, weight above 0)"""
        words = self._words
        base = self._base
        return (
            words[base + SRV_OP] == UP
            and words[base + SRV_ADMIN] == READY
            and words[base + SRV_WEIGHT] > 0
        )

    @property
    def persistable(self) -> bool:
        """May a client that persistence sends to it be served? (up, not in maintenance:
        a draining server keeps its clients)"""
        words = self._words
        return words[self._base + SRV_OP] == UP and words[self._base + SRV_ADMIN] != MAINT

    @property
    def conns(self) -> int:
        """Connections open to it from all of pylb."""
        first = self._first
        return sum(self._words[first : first + self._slots])

    def opened(self) -> None:
        words = self._words
        words[self._mine] += 1
        # the most connections at once (smax): two workers writing at the same instant
        # may keep the lower of their two counts, for a moment
        conns = 0
        for at in range(self._first, self._first + self._slots):
            conns += words[at]
        if conns > words[self._base + SRV_SMAX]:
            words[self._base + SRV_SMAX] = conns

    def closed(self) -> None:
        self._words[self._mine] -= 1

    def __repr__(self) -> str:
        return f"{self.backend.name}/{self.name}"


class Backend:
    __slots__ = (
        "name", "cfg", "servers", "timeouts", "by_cookie", "by_name", "_shared", "_base",
        "_version", "balancer", "stick", "retry", "_words",
    )

    def __init__(self, cfg: config.Backend, shared: Shared, slot: int) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.timeouts = cfg.timeouts
        self._shared = shared
        self._words = shared.words
        self._base = shared.layout.backends[cfg.name]
        self.servers = [Server(s, self, shared, slot) for s in cfg.servers]
        self.by_cookie = {s.cookie: s for s in self.servers if s.cookie}
        self.by_name = {s.name: s for s in self.servers}
        self.stick: StickTable | None = None  # the worker attaches the stick-on table
        self.retry = RetryPolicy(cfg)
        self._version = -1
        self.balancer = balance.make(cfg.balance, cfg.balance_arg, self)

    def ticket(self) -> int:
        """The next round-robin position, shared by every worker (see lb.shared: two
        workers drawing at once may draw the same)."""
        words = self._words
        value = words[self._base + BE_TICKET]
        words[self._base + BE_TICKET] = (value + 1) & 0x7FFFFFFFFFFFFFFF
        return value

    def refresh(self) -> None:
        """Let the balancer rebuild what it derives from weights and states, if they
        changed since it last looked."""
        version = self._words[self._base + BE_VERSION]
        if version != self._version:
            self._version = version
            self.balancer.rebuild()

    @property
    def holds(self) -> bool:
        """hold-when-down: do requests wait for a server while none is usable?"""
        return self._words[self._base + BE_HOLD] != 0

    def conns(self) -> int:
        """Connections open to its servers from all of pylb."""
        return sum(server.conns for server in self.servers)

    def stuck(self, key: bytes | None) -> Server | None:
        """The server the stick table names for `key`, if it may still serve it."""
        if key is None or self.stick is None:
            return None
        server = self.by_name.get(self.stick.lookup(key) or "")
        return server if server is not None and server.persistable else None

    def pick(self, context: balance.Context, exclude: Server | None = None) -> Server | None:
        """A server for a new client, by the backend's algorithm; None if none is usable."""
        if self._words[self._base + BE_VERSION] != self._version:  # refresh(), inline
            self.refresh()
        return self.balancer.pick(context, exclude)
