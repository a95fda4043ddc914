"""The validated configuration, as the rest of pylb sees it: frozen dataclasses."""

from __future__ import annotations

import socket
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP endpoint. ``host`` is ``0.0.0.0`` for ``*``, and IPv6 without brackets."""

    host: str
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        """AF_INET6 for IPv6 literals, AF_INET otherwise (also for host names)."""
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """All in seconds."""

    connect: float
    client: float
    server: float
    queue: float
    http_request: float
    http_keep_alive: float
    check: float
    tunnel: float


@dataclass(frozen=True, slots=True)
class StatsSocket:
    path: str
    mode: int
    user: str | None
    group: str | None
    level: str
    expose_fd: bool
    timeout: float


@dataclass(frozen=True, slots=True)
class Global:
    workers: int
    maxconn: int
    pidfile: str | None
    daemon: bool
    hard_stop_after: float | None
    log: str
    max_header_size: int
    stats: StatsSocket | None


@dataclass(frozen=True, slots=True)
class Frontend:
    name: str
    binds: tuple[Address, ...]
    mode: str
    maxconn: int
    backlog: int
    default_backend: str | None
    timeouts: Timeouts
    forwardfor: bool
    log: str | None
    line: int


@dataclass(frozen=True, slots=True)
class HttpCheck:
    method: str
    path: str
    expect: tuple[int, int]
    host: str | None


@dataclass(frozen=True, slots=True)
class Cookie:
    name: str
    mode: str
    indirect: bool
    nocache: bool


@dataclass(frozen=True, slots=True)
class StickTable:
    """``type`` is "ip" or "string"; ``size`` is a number of entries; ``expire`` in
    seconds, None when entries only leave to make room for new ones."""

    type: str
    size: int
    expire: float | None


@dataclass(frozen=True, slots=True)
class Server:
    name: str
    address: Address
    weight: int
    maxconn: int
    maxqueue: int
    backup: bool
    cookie: str | None
    check: bool
    inter: float
    rise: int
    fall: int


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    mode: str
    balance: str
    balance_arg: str | None
    servers: tuple[Server, ...]
    timeouts: Timeouts
    retries: int
    redispatch: bool
    http_check: HttpCheck | None
    cookie: Cookie | None
    stick_table: StickTable | None
    # ("src", None), ("cookie", NAME) or ("hdr", lower-case name); None: no stick-on
    stick_on: tuple[str, str | None] | None
    line: int


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    text: str
    global_: Global
    frontends: dict[str, Frontend]
    backends: dict[str, Backend]
