"""Backends and their servers as a worker sees them at run time, and server choice."""

from __future__ import annotations

from lb import config


class Server:
    """A server's runtime state in this worker."""

    __slots__ = ("name", "cfg", "backend", "host", "port", "weight", "current", "cur_conns", "total")

    def __init__(self, cfg: config.Server, backend: Backend) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.backend = backend
        self.host = cfg.address.host
        self.port = cfg.address.port
        self.weight = cfg.weight
        self.current = 0  # smooth weighted round-robin accumulator
        self.cur_conns = 0
        self.total = 0

    @property
    def usable(self) -> bool:
        return self.weight > 0

    def __repr__(self) -> str:
        return f"{self.backend.name}/{self.name}"


class Backend:
    __slots__ = ("name", "cfg", "servers", "active", "backups", "timeouts")

    def __init__(self, cfg: config.Backend) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.timeouts = cfg.timeouts
        self.servers = [Server(s, self) for s in cfg.servers]
        self.active = [s for s in self.servers if not s.cfg.backup]
        self.backups = [s for s in self.servers if s.cfg.backup]

    def pick(self, exclude: Server | None = None) -> Server | None:
        """The next server by smooth weighted round-robin, backups only if no active one."""
        for group in (self.active, self.backups):
            chosen = _smooth_weighted(group, exclude)
            if chosen is not None:
                return chosen
        return None


def _smooth_weighted(servers: list[Server], exclude: Server | None) -> Server | None:
    # Each usable server gains its weight; the richest is chosen and pays the total, which
    # interleaves servers in proportion to their weights (nginx's smooth round-robin).
    best: Server | None = None
    total = 0
    for server in servers:
        if not server.usable or server is exclude:
            continue
        server.current += server.weight
        total += server.weight
        if best is None or server.current > best.current:
            best = server
    if best is not None:
        best.current -= total
    return best
