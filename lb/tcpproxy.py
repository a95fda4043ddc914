"""TCP mode: each client connection is relayed byte for byte to one server."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from lb.balance import Context
from lb.timer import clock
from lb.tunnel import Tunnel

if TYPE_CHECKING:
    from lb.backend import Server
    from lb.frontend import Frontend


class _Held(asyncio.Protocol):
    """A new server connection, not read from until the relay takes it over."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]


class TcpSession(asyncio.Protocol):
    __slots__ = (
        "frontend", "transport", "deadline", "server", "retries_left", "task", "done",
        "early", "early_eof",
    )

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.deadline = 0.0
        self.server: Server | None = None
        self.retries_left = 0
        self.task: asyncio.Task[None] | None = None
        self.done = False  # relayed or closed: this object's part is over
        self.early: list[bytes] = []  # client bytes read before the relay began
        self.early_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.pause_reading()  # client bytes wait in the kernel until relayed
        self.frontend.opened(self)
        backend = self.frontend.default_backend
        if backend is None:
            self._give_up()
            return
        self.retries_left = backend.cfg.retries
        clock.watched.add(self)
        self._dispatch(None)

    def _dispatch(self, exclude: Server | None) -> None:
        backend = self.frontend.default_backend
        peer = self.transport.get_extra_info("peername")
        context = Context(peer[0].encode() if peer else b"")
        server = backend.pick(context, exclude)  # type: ignore[union-attr]
        if server is None:
            self._give_up()
            return
        self.server = server
        self.deadline = clock.now + backend.timeouts.connect  # type: ignore[union-attr]
        self.task = asyncio.get_running_loop().create_task(self._connect(server))

    async def _connect(self, server: Server) -> None:
        try:
            transport, _ = await asyncio.get_running_loop().create_connection(
                _Held, server.host, server.port
            )
        except OSError:
            self.task = None
            if not self.done:
                self.on_timeout()
            return
        self.task = None
        if self.done:
            transport.close()
            return
        self.done = True
        clock.watched.discard(self)
        server.opened()
        frontend = self.frontend
        timeouts = frontend.timeouts

        def finished(_tunnel: Tunnel) -> None:
            server.closed()
            frontend.closed(self)

        tunnel = Tunnel(
            self.transport, transport, max(timeouts.client, timeouts.server), finished  # type: ignore[arg-type]
        )
        tunnel.send(1, b"".join(self.early))
        if self.early_eof:
            tunnel.ends[0].eof_received()

    def data_received(self, data: bytes) -> None:
        self.early.append(data)  # reading is paused; at most what came with the accept

    def eof_received(self) -> bool:
        self.early_eof = True
        return True  # the client half-closed: its bytes still go to the server

    def on_timeout(self) -> None:
        """The connect timed out or failed: retry, then give up."""
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.retries_left <= 0:
            self._give_up()
            return
        self.retries_left -= 1
        redispatch = self.retries_left == 0 and self.frontend.default_backend.cfg.redispatch  # type: ignore[union-attr]
        self._dispatch(self.server if redispatch else None)

    def _give_up(self) -> None:
        self.done = True
        clock.watched.discard(self)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        # Only before the relay: once relayed, the tunnel owns the client connection.
        self.done = True
        if self.task is not None:
            self.task.cancel()
            self.task = None
        clock.watched.discard(self)
        self.frontend.closed(self)

    def close_if_idle(self) -> None:
        pass  # a TCP connection has no idle point between requests: it finishes
