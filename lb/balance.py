"""Load-balancing algorithms (placeholder: roundrobin only; the full set follows)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lb.backend import Backend, Server
    from lb.h1 import RequestHead


class Context:
    """What an algorithm may look at to choose: the client and its request."""

    __slots__ = ("client_ip", "path", "head")

    def __init__(self, client_ip: bytes, path: bytes = b"", head: RequestHead | None = None):
        self.client_ip = client_ip
        self.path = path
        self.head = head


class RoundRobin:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.orders: tuple[list[Server], list[Server]] = ([], [])

    def rebuild(self) -> None:
        servers = self.backend.servers
        self.orders = (
            smooth_order([s for s in servers if not s.cfg.backup]),
            smooth_order([s for s in servers if s.cfg.backup]),
        )

    def pick(self, context: Context, exclude: Server | None) -> Server | None:
        for order in self.orders:
            count = len(order)
            if not count:
                continue
            start = self.backend.ticket()
            for step in range(count):
                server = order[(start + step) % count]
                if server is not exclude and server.selectable:
                    return server
        return None


def smooth_order(servers: list[Server]) -> list[Server]:
    weights = {s: s.weight for s in servers if s.weight > 0}
    total = sum(weights.values())
    current = dict.fromkeys(weights, 0)
    order: list[Server] = []
    for _ in range(total):
        for server, weight in weights.items():
            current[server] += weight
        best = max(current, key=current.__getitem__)
        current[best] -= total
        order.append(best)
    return order


def make(algorithm: str, arg: str | None, backend: Backend) -> RoundRobin:
    return RoundRobin(backend)
