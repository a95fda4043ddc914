"""A byte relay between two connections: TCP mode, and HTTP after an Upgrade.

Each side's EOF is passed on as a half-close (the other direction keeps flowing); a side
that cannot keep up pauses reading on the other. The relay ends when both directions have
ended or either connection is lost, or after `timeout` seconds with no byte either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from lb.timer import clock


class Tunnel:
    __slots__ = ("ends", "timeout", "deadline", "_on_close", "closed")

    def __init__(
        self,
        a: asyncio.Transport,
        b: asyncio.Transport,
        timeout: float,
        on_close: Callable[[Tunnel], None] | None = None,
    ) -> None:
        self.timeout = timeout
        self.deadline = clock.now + timeout
        self._on_close = on_close
        self.closed = False
        end_a, end_b = _End(self, a), _End(self, b)
        end_a.peer, end_b.peer = end_b, end_a
        self.ends = (end_a, end_b)
        for end in self.ends:
            end.transport.set_protocol(end)
        clock.watched.add(self)
        for end in self.ends:
            end.transport.resume_reading()

    def send(self, side: int, data: bytes) -> None:
        """Bytes read before the tunnel began, to be delivered to side 0 (a) or 1 (b)."""
        if data:
            self.ends[side].transport.write(data)

    def on_timeout(self) -> None:
        self.close()

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        clock.watched.discard(self)
        for end in self.ends:
            if abort:
                end.transport.abort()
            else:
                end.transport.close()
        if self._on_close is not None:
            self._on_close(self)


class _End(asyncio.Protocol):
    __slots__ = ("tunnel", "transport", "peer", "eof", "received")

    def __init__(self, tunnel: Tunnel, transport: asyncio.Transport) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.peer: _End = self
        self.eof = False
        self.received = 0  # bytes read from this side

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)
        self.received += len(data)
        tunnel = self.tunnel
        tunnel.deadline = clock.now + tunnel.timeout

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer.transport
        if self.peer.eof:
            self.tunnel.close()
        elif not peer.is_closing() and peer.can_write_eof():
            peer.write_eof()
        return True  # keep our side open: the other direction may still be sending

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.close(abort=exc is not None)

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()
