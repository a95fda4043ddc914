"""A byte relay between two connections: TCP mode, and HTTP after an Upgrade.

Each side's EOF is passed on as a half-close (the other direction keeps flowing); a side
that cannot keep up stops the reading of the other. The relay ends when both directions
have ended or either connection fails, or after `timeout` seconds with no byte either way.

The relay works on the sockets themselves, not on asyncio transports, so that everything
it holds is its own: the bytes read and not yet written, the half-closes, the counts.
That is what lets a stopping worker hand a tunnel, whole, to the next generation
(`detach`, then `Tunnel.resume` in the new process): nothing is lost or sent twice.

On Linux a direction that carries bulk (one read brought SPLICE_AFTER bytes or more) moves
its bytes with splice(2) from then on: socket -> a pipe of its own -> socket, so they never
come up to Python. The pipe holds bytes like `out` does, after them: they count as
waiting bytes, and `detach` reads them out into `out` before it hands the state over.
Bytes in `out` always go first (the relay splices only while `out` is empty), and a
direction falls back to recv/send for good when the kernel refuses to splice its sockets.
Descriptors: a tunnel of small messages (an idle WebSocket) opens no pipe; a direction
that carried bulk keeps its pipe (two descriptors) until it ends, or the tunnel does.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from lb.timer import clock

READ_SIZE = 256 * 1024
HIGH_WATER = 256 * 1024  # bytes waiting for a side: stop reading the other side
LOW_WATER = 64 * 1024  # ... and read it again once this little is left

SPLICE = hasattr(os, "splice")  # Linux, Python 3.10+: bulk directions splice
SPLICE_AFTER = 64 * 1024  # a read this large: the direction gets a pipe and splices on
# A pipe holds what a direction may have waiting: below HIGH_WATER, plus one read. A read
# spliced takes as much as that leaves room for (recv takes READ_SIZE): the bound is the
# same, and the larger reads and writes are what make splicing pay (with the kernel's
# 64 KiB pipes it cost more CPU than recv/send).
PIPE_SIZE = HIGH_WATER + READ_SIZE
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_NO_SPLICE = frozenset((errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP))  # not for these fds


class Tunnel:
    __slots__ = ("ends", "timeout", "deadline", "_on_close", "closed", "_loop")

    def __init__(
        self,
        a: socket.socket,
        b: socket.socket,
        timeout: float,
        on_close: Callable[[Tunnel], None] | None = None,
        state: dict[str, Any] | None = None,
    ) -> None:
        """Relay between `a` (the client's side) and `b` (the server's). `state` is what
        `detach` gave in another process: the relay goes on from there."""
        self._loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.deadline = clock.now + timeout
        self._on_close = on_close
        self.closed = False
        end_a, end_b = _End(self, a), _End(self, b)
        end_a.peer, end_b.peer = end_b, end_a
        self.ends = (end_a, end_b)
        if state is not None:
            self.deadline = clock.now + max(state["left"], 0.0)
            for end, out, eof, shut, received in zip(
                self.ends, state["out"], state["eof"], state["shut"], state["received"],
                strict=True,
            ):
                end.out = bytearray(base64.b64decode(out))
                end.eof, end.shut, end.received = eof, shut, received
                end.counted = received
        clock.watched.add(self)
        for end in self.ends:
            end.start()
        # A tunnel taken over with both directions ended ends now (not within __init__:
        # its owner holds it only once this returns).
        self._loop.call_soon(self._check_done)

    @classmethod
    def resume(
        cls,
        fds: list[int],
        timeout: float,
        on_close: Callable[[Tunnel], None] | None,
        state: dict[str, Any],
    ) -> Tunnel:
        """The tunnel another process detached: its descriptors and its state."""
        a, b = (socket.socket(fileno=fd) for fd in fds)
        return cls(a, b, timeout, on_close, state)

    def send(self, side: int, data: bytes) -> None:
        """Bytes read before the tunnel began, to be delivered to side 0 (a) or 1 (b)."""
        if data and not self.closed:
            end = self.ends[side]
            end.unpipe()  # (none yet, as the tunnel begins) these bytes come after those
            end.out += data
            end.flush()

    def end_of(self, side: int) -> None:
        """Side 0 (a) or 1 (b) sent its EOF before the tunnel began."""
        if not self.closed:
            self.ends[side].ended()

    def peer_address(self) -> tuple[str, int]:
        try:
            host, port = self.ends[0].sock.getpeername()[:2]
        except OSError:
            return "", 0
        return host, port

    def on_timeout(self) -> None:
        self.close()

    def close(self, abort: bool = False) -> None:
        """End the relay and close both connections (`abort`: what waits to be written
        is dropped, and the sides see a reset)."""
        if self.closed:
            return
        self._stop()
        for end in self.ends:
            end.close_pipe()
            if abort:
                reset_on_close(end.sock)
            end.sock.close()
        if self._on_close is not None:
            self._on_close(self)

    def detach(self) -> tuple[dict[str, Any], list[int]]:
        """Stop relaying and give up the tunnel: its state, and duplicates of its two
        descriptors (ours close). The connections stay open, in whoever takes them."""
        self._stop()
        for end in self.ends:
            end.unpipe()  # what waits in a pipe joins `out`: the state is whole
        state = {
            "out": [base64.b64encode(bytes(end.out)).decode() for end in self.ends],
            "eof": [end.eof for end in self.ends],
            "shut": [end.shut for end in self.ends],
            "received": [end.received for end in self.ends],
            "left": self.deadline - clock.now,
        }
        fds = [os.dup(end.sock.fileno()) for end in self.ends]
        for end in self.ends:
            end.sock.close()
        return state, fds

    def _stop(self) -> None:
        self.closed = True
        clock.watched.discard(self)
        for end in self.ends:
            end.stop()

    def _check_done(self) -> None:
        """Both directions ended, everything written: the relay is over."""
        a, b = self.ends
        if a.eof and b.eof and a.shut and b.shut:
            self.close()


class _End:
    """One side of the tunnel: its socket and the bytes waiting to be written to it."""

    __slots__ = (
        "tunnel", "sock", "fd", "peer", "out", "eof", "shut", "received", "counted",
        "reading", "writing", "_loop", "pipe", "piped", "splicing",
    )

    def __init__(self, tunnel: Tunnel, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.tunnel = tunnel
        self.sock = sock
        self.fd = sock.fileno()
        self._loop = tunnel._loop
        self.peer: _End = self
        self.out = bytearray()  # read from the peer, not yet written to this side
        self.eof = False  # this side sent its EOF (its direction has ended)
        self.shut = False  # we half-closed this side: the peer's EOF is passed on
        self.received = 0  # bytes read from this side
        self.counted = 0  # ... of which the proxy's counters already have
        self.reading = False
        self.writing = False
        # Bytes for this side may also wait in a pipe, after `out` (never both at once:
        # the relay splices only while `out` is empty).
        self.pipe: tuple[int, int] | None = None  # its read and write ends
        self.piped = 0  # bytes in it
        self.splicing = SPLICE  # bytes for this side may go through a pipe

    def start(self) -> None:
        if self.out:
            self.flush()
        elif self.peer.eof and not self.shut:
            self._shut()
        if not self.eof and len(self.peer.out) < HIGH_WATER:
            self._read(True)

    def stop(self) -> None:
        self._read(False)
        self._write(False)

    def _read(self, on: bool) -> None:
        if on != self.reading:
            self.reading = on
            if on:
                self._loop.add_reader(self.fd, self._readable)
            else:
                self._loop.remove_reader(self.fd)

    def _write(self, on: bool) -> None:
        if on != self.writing:
            self.writing = on
            if on:
                self._loop.add_writer(self.fd, self._writable)
            else:
                self._loop.remove_writer(self.fd)

    def _readable(self) -> None:
        peer = self.peer
        pipe = peer.pipe
        if pipe is not None and not peer.out:
            self._splice_in(peer, pipe[1])
            return
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.tunnel.close(abort=True)
            return
        if not data:
            self.ended()
            return
        size = len(data)
        self.received += size
        tunnel = self.tunnel
        tunnel.deadline = clock.now + tunnel.timeout
        if peer.out:
            peer.out += data
        else:
            sent = peer._send(data)
            if sent < 0:
                return
            if sent < size:
                peer.out += data[sent:]
                peer._write(True)
        if size >= SPLICE_AFTER and peer.pipe is None and peer.splicing:
            peer._open_pipe()  # bulk: the next reads splice (once `out` is written)
        if len(peer.out) >= HIGH_WATER:
            self._read(False)  # until the peer takes some

    def _splice_in(self, peer: _End, pipe: int) -> None:
        """Read into the peer's pipe (its `out` is empty) and write on from there."""
        room = PIPE_SIZE - peer.piped  # (at least READ_SIZE while this side is read)
        if room <= 0:
            self._read(False)  # (a splice of 0 bytes would read as the EOF)
            return
        try:
            size = os.splice(self.fd, pipe, room, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            if peer.piped:
                # A full pipe (its slots can fill before PIPE_SIZE bytes do), or nothing
                # to read: read again once the peer takes some (it is being written to).
                self._read(False)
            elif self._unspliceable():
                peer.copy()
            return
        except OSError as exc:
            if exc.errno in _NO_SPLICE:
                peer.copy()
            else:
                self.tunnel.close(abort=True)
            return
        if not size:
            self.ended()
            return
        self.received += size
        tunnel = self.tunnel
        tunnel.deadline = clock.now + tunnel.timeout
        peer.piped += size
        peer.flush()
        if len(peer.out) + peer.piped >= HIGH_WATER:
            self._read(False)  # until the peer takes some

    def ended(self) -> None:
        """This side sent its EOF: pass it on once what it sent before is written."""
        self.eof = True
        self._read(False)
        peer = self.peer
        if not peer.out and not peer.piped:
            peer._shut()
        self.tunnel._check_done()

    def flush(self) -> None:
        """Write what waits for this side, as much as it takes now: `out`, then the pipe."""
        if self.tunnel.closed:
            return
        out = self.out
        if out:
            sent = self._send(out)
            if sent < 0:
                return
            del out[:sent]
        if self.piped and not out and self._splice_out() < 0:
            return
        waiting = len(out) + self.piped
        if waiting:
            self._write(True)
        else:
            self._write(False)
            if self.peer.eof:
                self._shut()
                self.tunnel._check_done()
        peer = self.peer
        if not peer.reading and not peer.eof and waiting <= LOW_WATER:
            peer._read(True)

    def _writable(self) -> None:
        self.flush()
        self.tunnel.deadline = clock.now + self.tunnel.timeout

    def _send(self, data: bytes | bytearray) -> int:
        """Bytes of `data` written now; -1 when the side failed (the tunnel is closed)."""
        if self.tunnel.closed:
            return -1
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            self.tunnel.close(abort=True)
            return -1

    def _splice_out(self) -> int:
        """Write from the pipe as much as this side takes now: the bytes written, or -1
        when the side failed (the tunnel is closed)."""
        pipe = self.pipe
        if pipe is None or self.tunnel.closed:
            return -1
        try:
            sent = os.splice(pipe[0], self.fd, self.piped, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            if exc.errno in _NO_SPLICE:
                self.splicing = False  # what the pipe holds is written from `out`
                self.unpipe()
                return 0
            self.tunnel.close(abort=True)
            return -1
        self.piped -= sent
        return sent

    def _unspliceable(self) -> bool:
        """The socket was readable, yet splice read nothing: can recv? (It can at TCP's
        urgent mark, where splice stops; else splice would be asked again and again.)"""
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK))
        except OSError:
            return False  # nothing indeed (BlockingIOError), or an error the next read sees

    def copy(self) -> None:
        """Bytes for this side are copied from now on (recv/send), not spliced: what the
        pipe holds is written from `out`."""
        self.splicing = False
        self.unpipe()
        self.flush()

    def _open_pipe(self) -> None:
        """A pipe for the bytes to this side, or none (out of descriptors, or the kernel
        would not make it PIPE_SIZE large: over /proc/sys/fs/pipe-max-size or the user's
        pipe-user-pages-soft): then this direction copies, as before."""
        try:
            pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self.splicing = False
            return
        try:
            fcntl.fcntl(pipe[1], _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            os.close(pipe[0])
            os.close(pipe[1])
            self.splicing = False
            return
        self.pipe = pipe

    def unpipe(self) -> None:
        """Read what waits in the pipe into `out` (after what is there: nothing, as the
        relay splices only while `out` is empty) and close it."""
        if self.pipe is None:
            return
        fd = self.pipe[0]
        while self.piped:
            try:
                data = os.read(fd, self.piped)
            except BlockingIOError:  # (never, while it holds bytes)
                break
            if not data:
                break
            self.out += data
            self.piped -= len(data)
        self.close_pipe()

    def close_pipe(self) -> None:
        """Close the pipe and drop what it holds."""
        if self.pipe is not None:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None
            self.piped = 0

    def _shut(self) -> None:
        if not self.shut:
            self.shut = True
            self.close_pipe()  # empty: nothing more comes for this side
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass


_NO_LINGER = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


def reset_on_close(sock: Any) -> None:
    """Have closing `sock` send a reset rather than a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _NO_LINGER)
    except OSError:
        pass


class Held(asyncio.Protocol):
    """A connection read from no more until its user takes it over (the relay, or a
    response moving in); what arrives before (a server that speaks first) is kept."""

    def __init__(self) -> None:
        self.early: list[bytes] = []
        self.eof = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        # uvloop starts reading after connection_made whatever it was told there, so
        # reading stops here, at the first read: at most one read waits.
        self.early.append(data)
        self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self.eof = True
        # Kept open for the bytes still to send; a TLS transport closes anyway (asyncio
        # cannot half-close TLS), and says so in a warning unless told False.
        return self.transport is None or self.transport.get_extra_info("ssl_object") is None


class _Detached(asyncio.Protocol):
    """What a transport talks to once its socket has left it: nothing listens."""


def take_socket(transport: asyncio.BaseTransport) -> socket.socket:
    """The socket under `transport`, as our own: the transport lets go of it (and must
    have nothing left to write: see `drained`)."""
    raw = transport.get_extra_info("socket")
    fd = os.dup(raw.fileno())
    transport.set_protocol(_Detached())
    transport.abort()  # closes the transport's descriptor, not the connection
    return socket.socket(fileno=fd)


async def drained(transport: asyncio.WriteTransport) -> bool:
    """Wait until `transport` has written everything it holds (True), or is closing."""
    if not transport.get_write_buffer_size():
        return not transport.is_closing()
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bool] = loop.create_future()

    class _Drain(asyncio.Protocol):
        def resume_writing(self) -> None:
            if not done.done():
                done.set_result(True)

        def connection_lost(self, exc: Exception | None) -> None:
            if not done.done():
                done.set_result(False)

    transport.set_protocol(_Drain())
    transport.set_write_buffer_limits(high=0, low=0)  # resume_writing once empty
    return await done
