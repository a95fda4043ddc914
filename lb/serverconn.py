"""Connections to servers, and the per-worker pool of idle keep-alive ones."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from lb import h1

if TYPE_CHECKING:
    from lb.backend import Server
    from lb.httpproxy import HttpSession

MAX_IDLE_PER_SERVER = 256


class ServerConnection:
    """One HTTP connection to a server (an asyncio protocol); `session` is its user while
    a request runs."""

    __slots__ = ("server", "pool", "transport", "reader", "session", "reused", "received")

    def __init__(self, server: Server, pool: ConnectionPool, max_head: int) -> None:
        self.server = server
        self.pool = pool
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.reader = h1.ResponseReader(max_head)
        self.session: HttpSession | None = None
        self.reused = False
        self.received = False  # a byte of the current response has arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is None:  # a server talking while idle in the pool: not reusable
            self.transport.close()
            return
        self.received = True
        session.response_events(self.reader.feed(data))

    def eof_received(self) -> bool:
        session = self.session
        if session is not None:
            session.server_closed(self)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.discard(self)
        session = self.session
        if session is not None:
            session.server_closed(self)

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.server_backpressure(True)

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.server_backpressure(False)


class ConnectionPool:
    """Idle keep-alive server connections of one worker, most recently used first."""

    def __init__(self) -> None:
        self.idle: dict[Server, list[ServerConnection]] = {}

    def take(self, server: Server) -> ServerConnection | None:
        idle = self.idle.get(server)
        while idle:
            conn = idle.pop()
            if not conn.transport.is_closing():
                conn.reused = True
                return conn
        return None

    def give(self, conn: ServerConnection) -> None:
        conn.session = None
        idle = self.idle.setdefault(conn.server, [])
        if len(idle) >= MAX_IDLE_PER_SERVER or conn.transport.is_closing():
            conn.transport.close()
            return
        idle.append(conn)

    def discard(self, conn: ServerConnection) -> None:
        idle = self.idle.get(conn.server)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        for idle in self.idle.values():
            for conn in idle:
                conn.transport.close()
        self.idle.clear()
