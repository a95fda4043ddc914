"""A byte relay between two asyncio transports: tunnels with a TLS side.

lb.tunnel relays on the sockets themselves, taken out of their transports, so that a
stopping worker can hand a tunnel, whole, to the next generation. A TLS connection cannot
be relayed that way: its bytes must go through its TLS transport (uvloop's, made by
`create_server(ssl=...)` or `create_connection(ssl=...)`), which decrypts what it reads and
encrypts what it writes, and its TLS state lives in this process. So when either side of
a tunnel (TCP mode, HTTP after an Upgrade) is TLS, `TransportTunnel` relays instead: it
takes both transports over (`set_protocol`) and offers what the sessions and lb.handover
use of `lb.tunnel.Tunnel`: `send`, `end_of`, `peer_address`, `on_timeout` (it is in
`clock.watched`), `close`, `closed`, the byte counts of `ends` and the `on_close` callback.

What differs from lb.tunnel:
- It cannot move at a reload (there is no `detach`): lb.handover refuses it, its session
  `stays` ("TLS tunnel") and it finishes in the old worker, until either side closes, its
  timeout, or hard-stop-after.
- Half-closes. A TLS transport cannot half-close (no `write_eof`): an EOF is passed on to
  a plain side as a half-close (`write_eof`, after what waits for it), and to a TLS side
  as a close (what waits is written, then its close_notify), which ends what that side
  sends too. A TLS side that sent its close_notify takes no more bytes (uvloop closes it
  once it has written what it holds); a connection that is gone has the other one closed
  once what waits for it is written.
- The relay is over, and `on_close` runs, once both connections are gone (or at once
  after an abort): a stopping worker does not exit with bytes still buffered.
- A side's bytes wait in its transport's write buffer, HIGH_WATER at most before the other
  side is no longer read (`pause_writing`), LOW_WATER before it is read again.
- uvloop's TLS transport reads ahead of its protocol and, when the TCP end of stream comes
  while its protocol is paused, closes without delivering what it read: a TLS side here
  reads from its socket only while nothing decrypted waits (read buffer limits 1 and 0),
  so the end of stream stays unread behind the bytes before it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from lb.timer import clock
from lb.tunnel import HIGH_WATER, LOW_WATER, reset_on_close

STAYS = "TLS tunnel"  # why a TransportTunnel's session stays at a reload (`show proc`)


def is_tls(transport: asyncio.BaseTransport | None) -> bool:
    """Is `transport` a TLS connection?"""
    return transport is not None and transport.get_extra_info("ssl_object") is not None


class TransportTunnel:
    """Relays between transport `a` (the client's side) and `b` (the server's)."""

    __slots__ = ("ends", "timeout", "deadline", "_on_close", "closed", "finished")

    def __init__(
        self,
        a: asyncio.Transport,
        b: asyncio.Transport,
        timeout: float,
        on_close: Callable[[TransportTunnel], None] | None = None,
    ) -> None:
        self.timeout = timeout
        self.deadline = clock.now + timeout
        self._on_close = on_close
        self.closed = False  # the relay is over: both connections are closed or closing
        self.finished = False  # ... and gone: on_close ran
        end_a, end_b = _Side(self, a), _Side(self, b)
        end_a.peer, end_b.peer = end_b, end_a
        self.ends = (end_a, end_b)
        clock.watched.add(self)
        for end in self.ends:
            end.take()
        for end in self.ends:
            end.update_reading()
        # A connection gone before the relay began ends it now (not within __init__: its
        # owner holds it only once this returns, and sends it the bytes read before).
        asyncio.get_running_loop().call_soon(self._check_gone)

    def send(self, side: int, data: bytes) -> None:
        """Bytes read before the tunnel began, to be delivered to side 0 (a) or 1 (b):
        after what its transport holds, before what the relay writes to it."""
        if data and not self.closed:
            self.ends[side].write(data)

    def end_of(self, side: int) -> None:
        """Side 0 (a) or 1 (b) sent its EOF before the tunnel began."""
        if not self.closed:
            self.ends[side].ended()

    def peer_address(self) -> tuple[str, int]:
        peer = self.ends[0].transport.get_extra_info("peername")
        if not peer:
            return "", 0
        return peer[0], peer[1]

    def buffered(self) -> int:
        """Bytes the relay holds: what the transports have yet to write, and what a TLS
        side decrypted and the relay has not taken yet."""
        total = 0
        for end in self.ends:
            if end.lost:
                continue
            transport = end.transport
            total += transport.get_write_buffer_size()
            read_size = getattr(transport, "get_read_buffer_size", None)
            if read_size is not None:
                total += read_size()
        return total

    def on_timeout(self) -> None:
        """No byte either way for `timeout` seconds (or a close that does not end): both
        connections close now, what waits to be written is dropped."""
        self._abort(reset=False)

    def close(self, abort: bool = False) -> None:
        """End the relay: both connections close once what waits for them is written, and
        a TLS one once its close_notify is sent (`abort`: at once, what waits is dropped,
        and the sides see a reset)."""
        if abort:
            self._abort(reset=True)
            return
        if self.closed:
            return
        self.closed = True
        for end in self.ends:
            end.update_reading()
            if not end.lost:
                end.shut = True
                end.transport.close()
        self._check_finished()

    def _abort(self, reset: bool) -> None:
        if self.finished:
            return
        self.closed = True
        for end in self.ends:
            end.reading = False
            if not end.lost:
                end.shut = True
                if reset:
                    sock = end.transport.get_extra_info("socket")
                    if sock is not None:
                        reset_on_close(sock)
                end.transport.abort()
        self._finish()

    def _check_done(self) -> None:
        """Both directions ended: close both connections."""
        if not self.closed and all(end.eof and end.shut for end in self.ends):
            self.close()

    def _check_gone(self) -> None:
        if not self.closed and any(end.lost for end in self.ends):
            self.close()
        self._check_done()

    def _check_finished(self) -> None:
        if self.closed and not self.finished and all(end.lost for end in self.ends):
            self._finish()

    def _finish(self) -> None:
        self.closed = self.finished = True
        clock.watched.discard(self)
        if self._on_close is not None:
            self._on_close(self)


class _Side(asyncio.Protocol):
    """One side of the tunnel: the protocol of its transport."""

    __slots__ = (
        "tunnel", "transport", "peer", "plain", "eof", "shut", "lost", "received", "counted",
        "reading", "paused",
    )

    def __init__(self, tunnel: TransportTunnel, transport: asyncio.Transport) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.peer: _Side = self
        self.plain = transport.can_write_eof()  # plain TCP, which can half-close
        self.eof = False  # this side sent its EOF (its direction has ended)
        self.shut = False  # nothing more is written to it (EOF passed on, or closing)
        self.lost = False  # the connection is gone (connection_lost)
        self.received = 0  # bytes read from this side
        self.counted = 0  # ... of which the proxy's counters already have
        self.reading: bool | None = None  # as last asked of the transport (None: unknown)
        self.paused = False  # its write buffer is full: the peer is not read

    def take(self) -> None:
        """Become the transport's protocol."""
        transport = self.transport
        if transport.get_protocol() is None:  # gone: its connection_lost went to the last
            self.lost = self.eof = self.shut = True
            self.reading = False
            return
        transport.set_protocol(self)
        if transport.is_closing():  # it reads no more, and takes no more
            self.eof = self.shut = True
            return
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        if not self.plain:
            set_read_limits = getattr(transport, "set_read_buffer_limits", None)
            if set_read_limits is not None:
                set_read_limits(high=1, low=0)  # see the module's docstring
        if transport.get_write_buffer_size() > HIGH_WATER:
            # (paused for its former protocol, it says only when it resumes)
            self.paused = True

    def taking(self) -> bool:
        """Does what is written to this side still reach it?"""
        return not (self.shut or self.lost or (self.eof and not self.plain))

    def update_reading(self) -> None:
        """Read this side while its bytes have somewhere to go, and room there."""
        peer = self.peer
        want = not (
            self.tunnel.closed or self.eof or self.lost or peer.paused or not peer.taking()
        )
        if want != self.reading:
            self.reading = want
            if self.lost:
                return
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def write(self, data: bytes) -> None:
        """Write `data` to this side (dropped when it takes no more)."""
        if self.tunnel.closed or not self.taking():
            return
        transport = self.transport
        transport.write(data)
        if not self.paused and transport.get_write_buffer_size() > HIGH_WATER:
            self.pause_writing()  # (paused for its former protocol: see take)

    def ended(self) -> None:
        """This side sent its EOF: pass it on."""
        if self.eof:
            return
        self.eof = True
        self.update_reading()
        peer = self.peer
        peer.update_reading()  # a TLS side that ended takes no more: its peer is not read
        peer.pass_eof()
        self.tunnel._check_done()

    def pass_eof(self) -> None:
        """The peer's direction ended: end this side's, after what waits for it."""
        if self.shut:
            return
        self.shut = True
        transport = self.transport
        if self.plain:
            if not transport.is_closing():
                transport.write_eof()
        else:
            transport.close()  # TLS cannot half-close: after what waits, its close_notify
            self.ended()  # ... and it reads no more

    # -- asyncio.Protocol ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        tunnel = self.tunnel
        tunnel.deadline = clock.now + tunnel.timeout
        self.peer.write(data)

    def eof_received(self) -> bool:
        self.ended()
        return self.plain  # a plain connection stays open for the other direction

    def pause_writing(self) -> None:
        self.paused = True
        self.peer.update_reading()

    def resume_writing(self) -> None:
        self.paused = False
        tunnel = self.tunnel
        tunnel.deadline = clock.now + tunnel.timeout
        self.peer.update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = self.eof = self.shut = True
        self.reading = False
        tunnel = self.tunnel
        if tunnel.finished:
            return
        if exc is not None:  # it failed: so does the other side
            tunnel.close(abort=True)
            return
        tunnel.close()  # the other side closes once what waits for it is written
        tunnel._check_finished()
