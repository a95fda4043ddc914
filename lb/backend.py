"""Backends and their servers as a worker sees them at run time, and server choice."""

from __future__ import annotations

from collections.abc import Callable

from lb import config


class Server:
    """A server's runtime state in this worker."""

    __slots__ = ("name", "cfg", "backend", "host", "port", "weight", "cur_conns", "total")

    def __init__(self, cfg: config.Server, backend: Backend) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.backend = backend
        self.host = cfg.address.host
        self.port = cfg.address.port
        self.weight = cfg.weight
        self.cur_conns = 0
        self.total = 0

    @property
    def usable(self) -> bool:
        return self.weight > 0

    def __repr__(self) -> str:
        return f"{self.backend.name}/{self.name}"


class Backend:
    __slots__ = ("name", "cfg", "servers", "timeouts", "_ticket", "_orders")

    def __init__(self, cfg: config.Backend, ticket: Callable[[], int]) -> None:
        """`ticket` draws the next round-robin position, shared by every worker."""
        self.name = cfg.name
        self.cfg = cfg
        self.timeouts = cfg.timeouts
        self.servers = [Server(s, self) for s in cfg.servers]
        self._ticket = ticket
        self._orders: tuple[list[Server], list[Server]] = ([], [])
        self.weights_changed()

    def weights_changed(self) -> None:
        active = [s for s in self.servers if not s.cfg.backup]
        backups = [s for s in self.servers if s.cfg.backup]
        self._orders = (smooth_order(active), smooth_order(backups))

    def pick(self, exclude: Server | None = None) -> Server | None:
        """The next server in weighted round-robin order; backups only if no active one."""
        for order in self._orders:
            count = len(order)
            if not count:
                continue
            start = self._ticket()
            for step in range(count):
                server = order[(start + step) % count]
                if server.usable and server is not exclude:
                    return server
        return None


def smooth_order(servers: list[Server]) -> list[Server]:
    """One period of smooth weighted round-robin: each server appears `weight` times,
    spread out (weights 5,1,1 give a a b a c a a, not a a a a a b c)."""
    usable = [s for s in servers if s.weight > 0]
    total = sum(s.weight for s in usable)
    current = {s: 0 for s in usable}
    order: list[Server] = []
    for _ in range(total):
        for server in usable:
            current[server] += server.weight
        best = max(usable, key=lambda s: current[s])
        current[best] -= total
        order.append(best)
    return order
