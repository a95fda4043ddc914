"""Load-balancing algorithms: which server a new client goes to.

Every worker process runs its own balancer, yet together they must behave as one. So
nothing here keeps private state that decides a pick: round-robin positions come from the
backend's shared ticket, hashes are computed the same way in every process (never with
Python's per-process randomised hash()), and the tables derived from weights and states are
rebuilt from shared memory whenever the master says they changed (`Backend.refresh`).

The common rules, as in HAProxy:

- a candidate is a `selectable` server (up, ready, weight above 0) other than `exclude`;
- active servers are used while any of them is a candidate; backup servers only when none
  is, and then by the same algorithm;
- no candidate at all: `pick` returns None.

pick() runs on every request, so the work that only depends on weights and states (the
smooth round-robin order, the hash map, cumulative weights) is done in rebuild().
"""

from __future__ import annotations

import hashlib
import math
import random
from bisect import bisect_right
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from lb.backend import Backend, Server
    from lb.h1 import RequestHead

# Above this many steps (order length times distinct weights), building the exact smooth
# order would stall the worker for too long; a sorted spread is used instead (still exact
# proportions, nearly as smooth).
SMOOTH_BUDGET = 1 << 16


class Context:
    """What an algorithm may look at to choose: the client and its request. The path is
    cut from the request target only for an algorithm that asks for it."""

    __slots__ = ("client_ip", "_path", "head")

    def __init__(
        self, client_ip: bytes, path: bytes | None = None, head: RequestHead | None = None
    ) -> None:
        self.client_ip = client_ip
        self._path = path
        self.head = head

    @property
    def path(self) -> bytes:
        if self._path is None:
            self._path = self.head.target.split(b"?", 1)[0] if self.head is not None else b""
        return self._path


class Balancer(Protocol):
    def rebuild(self) -> None:
        """Weights or states changed: recompute the derived tables."""

    def pick(self, context: Context, exclude: Server | None) -> Server | None:
        """A server for a new client, or None if no server may take one."""


# -- orders -------------------------------------------------------------------------------


def smooth_order(servers: list[Server], weights: list[int]) -> list[Server]:
    """One cycle of smooth weighted round-robin: each server appears weight/gcd times, and
    heavy servers' turns are interleaved with the light ones' (5,1,1 gives a a b a c a a),
    so a short burst of clients is spread like a long run.

    Every step adds each server's weight to its credit and picks the server with the most
    credit (the first one on a tie), which then pays back the total weight. A server's
    credit at step k is k*weight - picks*total, and servers of equal weight are picked in
    turn, so only one candidate per distinct weight has to be compared at each step.
    """
    live = [(index, server, weight) for index, (server, weight)
            in enumerate(zip(servers, weights, strict=True)) if weight > 0]
    if not live:
        return []
    divisor = math.gcd(*(weight for _, _, weight in live))
    groups: dict[int, list[tuple[int, Server]]] = {}
    for index, server, weight in live:
        groups.setdefault(weight // divisor, []).append((index, server))
    total = sum(weight for _, _, weight in live) // divisor
    if len(groups) == 1:
        return [server for _, server in next(iter(groups.values()))]
    if total * len(groups) > SMOOTH_BUDGET:
        return spread_order(live, divisor)
    group_weights = list(groups)
    members = list(groups.values())
    sizes = [len(m) for m in members]
    picked = [0] * len(members)
    order: list[Server] = []
    for step in range(1, total + 1):
        best = -1
        best_credit = 0
        best_index = 0
        for group, weight in enumerate(group_weights):
            count = picked[group]
            size = sizes[group]
            credit = step * weight - (count // size) * total
            index = members[group][count % size][0]
            if (best < 0 or credit > best_credit
                    or (credit == best_credit and index < best_index)):
                best, best_credit, best_index = group, credit, index
        count = picked[best]
        order.append(members[best][count % sizes[best]][1])
        picked[best] = count + 1
    return order


def spread_order(live: list[tuple[int, Server, int]], divisor: int) -> list[Server]:
    """A weighted cycle for big heterogeneous backends: a server of weight w takes its
    j-th turn at (j + 1/2) / w of the cycle; sorting those instants interleaves everyone
    in O(n log n)."""
    turns = []
    for index, server, weight in live:
        weight //= divisor
        for j in range(weight):
            turns.append(((2 * j + 1) / weight, index, server))
    turns.sort(key=lambda turn: (turn[0], turn[1]))
    return [server for _, _, server in turns]


def first_candidate(order: list[Server], start: int, exclude: Server | None) -> Server | None:
    """The first candidate at or after `start` in a cyclic order. Orders hold only servers
    that were selectable at the last rebuild, so the walk is one step unless `exclude` or a
    change not yet rebuilt is in the way."""
    count = len(order)
    for step in range(count):
        server = order[(start + step) % count]
        if server is not exclude and server.selectable:
            return server
    return None


def tiers(backend: Backend) -> tuple[list[Server], list[Server]]:
    """The selectable servers, active ones then backup ones, in configuration order."""
    servers = [s for s in backend.servers if s.selectable]
    return [s for s in servers if not s.cfg.backup], [s for s in servers if s.cfg.backup]


def key_hash(key: bytes) -> int:
    """A 64-bit hash that is the same in every process and well mixed in its low bits
    (structured keys such as consecutive IP addresses must still spread)."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


# -- algorithms ---------------------------------------------------------------------------


class RoundRobin:
    """roundrobin and static-rr: a smooth weighted order walked by the shared ticket, so
    all workers together follow one sequence. The order holds only the servers selectable
    at the last rebuild, so a server that is down does not hand its turns to a neighbour.
    static-rr builds it from the configured weights, ignoring runtime weight changes."""

    def __init__(self, backend: Backend, static: bool = False) -> None:
        self.backend = backend
        self.static = static
        self.orders: tuple[list[Server], list[Server]] = ([], [])

    def rebuild(self) -> None:
        active, backup = tiers(self.backend)
        self.orders = (self.order(active), self.order(backup))

    def order(self, servers: list[Server]) -> list[Server]:
        if self.static:
            return smooth_order(servers, [s.cfg.weight for s in servers])
        return smooth_order(servers, [s.weight for s in servers])

    def pick(self, context: Context, exclude: Server | None) -> Server | None:
        position = self.backend.ticket()
        order = self.orders[0]
        if order:  # the common case, inline: the next active server is usable
            server = order[position % len(order)]
            if server is not exclude and server.selectable:
                return server
        return self.pick_at(position, exclude)

    def pick_at(self, position: int, exclude: Server | None) -> Server | None:
        for order in self.orders:
            if order:
                server = order[position % len(order)]
                if server is not exclude and server.selectable:
                    return server
                server = first_candidate(order, position, exclude)
                if server is not None:
                    return server
        return None


class Hash(RoundRobin):
    """source, uri, hdr(NAME): the key's hash indexes a map where each selectable server
    appears in proportion to its runtime weight (HAProxy's map-based hashing), so a key
    keeps its server while the set of servers is unchanged. No key (no header, an empty
    value, no client address): round-robin, as HAProxy does."""

    def __init__(self, backend: Backend, key: Callable[[Context], bytes | None]) -> None:
        super().__init__(backend)
        self.key = key

    def pick(self, context: Context, exclude: Server | None) -> Server | None:
        key = self.key(context)
        if not key:
            return self.pick_at(self.backend.ticket(), exclude)
        return self.pick_at(key_hash(key), exclude)


class LeastConn:
    """leastconn: the candidate with the fewest connections (from all workers) for its
    weight; equally loaded candidates take turns by the shared ticket, so an idle backend
    is still spread evenly."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.tiers: tuple[list[Server], list[Server]] = ([], [])

    def rebuild(self) -> None:
        self.tiers = tiers(self.backend)

    def pick(self, context: Context, exclude: Server | None) -> Server | None:
        for tier in self.tiers:
            tied: list[Server] = []
            best_conns = 0
            best_weight = 1
            for server in tier:
                if server is exclude or not server.selectable:
                    continue
                weight = server.weight
                if weight <= 0:  # changed since `selectable` read it
                    continue
                conns = server.conns
                # conns/weight < best_conns/best_weight, without division
                if not tied or conns * best_weight < best_conns * weight:
                    tied = [server]
                    best_conns = conns
                    best_weight = weight
                elif conns * best_weight == best_conns * weight:
                    tied.append(server)
            if len(tied) == 1:
                return tied[0]
            if tied:
                return tied[self.backend.ticket() % len(tied)]
        return None


class Random:
    """random: the power of two choices. Two different servers are drawn at random in
    proportion to their runtime weights and the less loaded (connections for its weight)
    wins: nearly as even as leastconn, without every worker piling onto the same server
    between two counter updates."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.random: Callable[[], float] = random.random  # reseeded in each forked worker
        # per tier: servers and their cumulative weights (ends of their ranges)
        self.tables: list[tuple[list[Server], list[int]]] = []

    def rebuild(self) -> None:
        self.tables = []
        for tier in tiers(self.backend):
            servers = [s for s in tier if s.weight > 0]
            ends: list[int] = []
            total = 0
            for server in servers:
                total += server.weight
                ends.append(total)
            self.tables.append((servers, ends))

    def pick(self, context: Context, exclude: Server | None) -> Server | None:
        for servers, ends in self.tables:
            if not servers:
                continue
            last = len(servers) - 1
            total = ends[-1]
            first = min(bisect_right(ends, self.random() * total), last)
            a: Server | None = servers[first]
            b: Server | None = None
            if last:
                # the second draw skips the first server's range
                low = ends[first - 1] if first else 0
                width = ends[first] - low
                point = self.random() * (total - width)
                if point >= low:
                    point += width
                b = servers[min(bisect_right(ends, point), last)]
            if a is exclude or not a.selectable:
                a = None
            if b is not None and (b is exclude or not b.selectable):
                b = None
            if a is not None and b is not None:
                # b.conns / b.weight < a.conns / a.weight, without division; a wins ties
                return b if b.conns * a.weight < a.conns * b.weight else a
            if a is not None:
                return a
            if b is not None:
                return b
            # Both draws unusable (excluded, or changed since the rebuild): any candidate.
            for server in servers:
                if server is not exclude and server.selectable:
                    return server
        return None


def _source(context: Context) -> bytes | None:
    return context.client_ip


def _uri(context: Context) -> bytes | None:
    return context.path


def _header(name: str) -> Callable[[Context], bytes | None]:
    wanted = name.lower().encode("ascii")

    def key(context: Context) -> bytes | None:
        head = context.head
        return None if head is None else head.header(wanted)

    return key


def make(algorithm: str, arg: str | None, backend: Backend) -> Balancer:
    """The balancer for a backend's `balance` setting (arg: the header name of hdr)."""
    if algorithm == "roundrobin":
        return RoundRobin(backend)
    if algorithm == "static-rr":
        return RoundRobin(backend, static=True)
    if algorithm == "leastconn":
        return LeastConn(backend)
    if algorithm == "source":
        return Hash(backend, _source)
    if algorithm == "uri":
        return Hash(backend, _uri)
    if algorithm == "hdr":
        if not arg:
            raise ValueError("balance hdr needs a header name")
        return Hash(backend, _header(arg))
    if algorithm == "random":
        return Random(backend)
    raise ValueError(f"unknown balance algorithm {algorithm!r}")
