"""The byte relay (lb.tunnel) on its own: socket pairs in one loop, no pylb process.

What a tunnel hands over (`detach`, then `Tunnel.resume`) must be everything it holds:
bytes read and not yet written, in order, and the half-closes."""

from __future__ import annotations

import asyncio
import base64
import errno
import fcntl
import hashlib
import os
import random
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop
from backends import pattern_bytes

from lb import tunnel as tunnel_mod
from lb.timer import TICK, clock
from lb.tunnel import HIGH_WATER, Tunnel


def run(test: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        clock.start()
        try:
            await asyncio.wait_for(test(), 20)
        finally:
            clock.stop()

    uvloop.run(main())


class Pair:
    """A client and a server, each joined to pylb's side by a socket pair."""

    def __init__(self) -> None:
        self.client, client_side = socket.socketpair()
        self.server, server_side = socket.socketpair()
        for sock in (self.client, self.server):
            sock.setblocking(False)
        self.sides = (client_side, server_side)
        self.closed: list[Tunnel] = []

    def tunnel(self, timeout: float = 30.0) -> Tunnel:
        return Tunnel(*self.sides, timeout, self.closed.append)

    def close_ends(self) -> None:
        for sock in (self.client, self.server):
            sock.close()


async def read_exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < size:
        chunk = await loop.sock_recv(sock, min(size - len(out), 1 << 20))
        assert chunk, f"EOF after {len(out)} of {size} bytes"
        out += chunk
    return bytes(out)


async def read_to_eof(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 20):
        out += chunk
    return bytes(out)


def moved(tunnel: Tunnel, pair: Pair) -> Tunnel:
    """The tunnel detached and resumed, as a new generation would take it."""
    state, fds = tunnel.detach()
    return Tunnel.resume(fds, 30.0, pair.closed.append, state)


def test_bytes_both_ways_and_half_closes() -> None:
    async def test() -> None:
        pair = Pair()
        loop = asyncio.get_running_loop()
        tunnel = pair.tunnel()
        await loop.sock_sendall(pair.client, b"hello")
        assert await read_exactly(pair.server, 5) == b"hello"
        pair.client.shutdown(socket.SHUT_WR)
        assert await read_to_eof(pair.server) == b""  # the EOF is passed on
        await loop.sock_sendall(pair.server, b"still talking")
        assert await read_exactly(pair.client, 13) == b"still talking"
        assert not pair.closed
        pair.server.shutdown(socket.SHUT_WR)
        assert await read_to_eof(pair.client) == b""
        await asyncio.sleep(0.01)
        assert pair.closed == [tunnel]
        assert [end.received for end in tunnel.ends] == [5, 13]

    run(test)


def test_a_stalled_reader_keeps_memory_bounded_and_loses_nothing() -> None:
    async def test() -> None:
        pair = Pair()
        loop = asyncio.get_running_loop()
        tunnel = pair.tunnel()
        blob = pattern_bytes(8 << 20)
        sender = loop.create_task(loop.sock_sendall(pair.server, blob))
        await asyncio.sleep(0.2)  # the client reads nothing meanwhile
        assert 0 < waiting(tunnel.ends[0]) <= 2 * HIGH_WATER  # (spliced: in its pipe)
        assert not sender.done()
        assert await read_exactly(pair.client, len(blob)) == blob
        await sender

    run(test)


def test_detach_and_resume_mid_stream_loses_nothing() -> None:
    """Move the tunnel many times while 4 MB flow each way and the client reads slowly:
    every move carries bytes waiting in the relay."""

    async def test() -> None:
        pair = Pair()
        loop = asyncio.get_running_loop()
        size = 4 << 20
        up, down = pattern_bytes(size), bytes(reversed(pattern_bytes(size)))
        tunnel = pair.tunnel()
        senders = [loop.create_task(loop.sock_sendall(pair.client, up)),
                   loop.create_task(loop.sock_sendall(pair.server, down))]
        got_up = loop.create_task(read_exactly(pair.server, size))
        got_down = bytearray()
        carried = 0
        moves = 0
        while len(got_down) < size:
            try:
                got_down += pair.client.recv(32 * 1024)
            except BlockingIOError:
                pass
            await asyncio.sleep(0)
            if moves < 200:
                carried += sum(len(end.out) for end in tunnel.ends)
                tunnel = moved(tunnel, pair)
                moves += 1
        assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
        assert await got_up == up
        await asyncio.gather(*senders)
        assert carried > 0, "no move carried waiting bytes: the test proves nothing"
        assert [end.received for end in tunnel.ends] == [size, size]

    run(test)


def test_half_close_survives_the_move() -> None:
    async def test() -> None:
        pair = Pair()
        loop = asyncio.get_running_loop()
        tunnel = pair.tunnel()
        pair.client.shutdown(socket.SHUT_WR)
        assert await read_to_eof(pair.server) == b""
        tunnel = moved(tunnel, pair)
        assert tunnel.ends[0].eof and tunnel.ends[1].shut
        await loop.sock_sendall(pair.server, b"answer after the move")
        assert await read_exactly(pair.client, 21) == b"answer after the move"
        pair.server.close()
        assert await read_to_eof(pair.client) == b""
        await asyncio.sleep(0.01)
        assert pair.closed == [tunnel]

    run(test)


def test_eof_waiting_behind_bytes_is_passed_on_after_them() -> None:
    """A side that sent bytes then EOF while the other side read nothing: the move
    carries both, and the EOF comes after the last byte."""

    async def test() -> None:
        pair = Pair()
        pair.sides[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # a slow client
        loop = asyncio.get_running_loop()
        tunnel = pair.tunnel()
        blob = pattern_bytes(3 << 20)
        first = 128 * 1024  # fits in the relay and the socket buffers
        await loop.sock_sendall(pair.server, blob[:first])
        await asyncio.sleep(0.05)
        state: dict[str, Any]
        state, fds = tunnel.detach()
        assert state["out"][0], "nothing waited for the client"
        # The server sends the rest and leaves while nobody relays.
        pair.server.setblocking(True)
        sender = loop.run_in_executor(None, pair.server.sendall, blob[first:])
        resumed = Tunnel.resume(fds, 30.0, pair.closed.append, state)
        got = await read_exactly(pair.client, len(blob))
        await sender
        pair.server.shutdown(socket.SHUT_WR)
        assert got == blob
        assert await read_to_eof(pair.client) == b""
        assert not resumed.closed  # the client's direction is still open
        await loop.sock_sendall(pair.client, b"bye")
        assert await read_exactly(pair.server, 3) == b"bye"

    run(test)


def test_timeout_left_is_carried() -> None:
    async def test() -> None:
        pair = Pair()
        tunnel = pair.tunnel(timeout=0.3)
        await asyncio.sleep(0.2)
        state, fds = tunnel.detach()
        assert 0.0 < state["left"] <= 0.1 + TICK + 0.01  # the clock is up to a tick old
        resumed = Tunnel.resume(fds, 0.3, pair.closed.append, state)
        await asyncio.sleep(0.05 + state["left"] + 0.1)
        assert pair.closed == [resumed], "the remaining timeout was not kept"

    run(test)


def test_detach_leaves_no_descriptor_behind() -> None:
    async def test() -> None:
        before = len(os.listdir("/proc/self/fd"))
        pair = Pair()
        tunnel = pair.tunnel()
        for _ in range(50):
            tunnel = moved(tunnel, pair)
        tunnel.close()
        pair.close_ends()
        assert len(os.listdir("/proc/self/fd")) == before

    run(test)


def test_a_tunnel_taken_over_with_both_directions_ended_ends_after_its_last_bytes() -> None:
    """Both sides sent their EOF, bytes still wait for the client: the tunnel taken over
    writes them, passes the EOF on, and ends (its owner hears of it once)."""

    async def test() -> None:
        pair = Pair()
        pair.sides[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # a slow client
        loop = asyncio.get_running_loop()
        tunnel = pair.tunnel()
        blob = pattern_bytes(256 * 1024)
        await loop.sock_sendall(pair.server, blob)
        pair.server.shutdown(socket.SHUT_WR)
        pair.client.shutdown(socket.SHUT_WR)
        assert await read_to_eof(pair.server) == b""  # the client's EOF went through
        await asyncio.sleep(0.05)
        state, fds = tunnel.detach()
        assert state["out"][0] and all(state["eof"]), state["eof"]
        resumed = Tunnel.resume(fds, 30.0, pair.closed.append, state)
        assert await read_to_eof(pair.client) == blob
        await asyncio.sleep(0.01)
        assert pair.closed == [resumed]

    run(test)


# -- splice: bulk directions relay socket -> pipe -> socket in the kernel ---------------


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Both ends of a TCP connection over the loopback."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname()[:2])
        far, _ = listener.accept()
    return near, far


class TcpPair(Pair):
    """A client and a server joined to pylb's side by TCP connections: what splice sees in
    production (Pair's socket pairs are AF_UNIX)."""

    def __init__(self) -> None:
        self.client, client_side = tcp_pair()
        self.server, server_side = tcp_pair()
        for sock in (self.client, self.server):
            sock.setblocking(False)
        self.sides = (client_side, server_side)
        self.closed = []

    def narrow_client_way(self) -> None:
        """Small kernel buffers between the relay and the client: what waits for a slow
        client is mostly the relay's."""
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.sides[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)

    def send_both_ways(self, up: bytes, down: bytes) -> list[asyncio.Task[None]]:
        """The client sends `up` and the server `down`, at once; each shuts after."""
        loop = asyncio.get_running_loop()
        return [loop.create_task(send_then_shut(self.client, up)),
                loop.create_task(send_then_shut(self.server, down))]


class Spliced:
    """os.splice, watched: the bytes it moved into pipes (the relay's reads)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.into_pipes = 0
        self.calls = 0
        real = os.splice

        def splice(src: int, dst: int, count: int, *args: Any, **kw: Any) -> int:
            self.calls += 1
            moved = real(src, dst, count, *args, **kw)
            if stat.S_ISFIFO(os.fstat(dst).st_mode):
                self.into_pipes += moved
            return moved

        monkeypatch.setattr(os, "splice", splice)


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def digest(data: bytes | bytearray) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def waiting(end: Any) -> int:
    """Bytes the relay holds for `end`: its `out` and its pipe."""
    return len(end.out) + end.piped


async def send_then_shut(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)
    sock.shutdown(socket.SHUT_WR)


async def read_slowly(sock: socket.socket, probe: Callable[[], None]) -> bytes:
    """Everything to the EOF, 64 KiB at a time with a pause after each: `probe` looks at
    the relay after each read."""
    loop = asyncio.get_running_loop()
    out = bytearray()
    while chunk := await loop.sock_recv(sock, 64 * 1024):
        out += chunk
        probe()
        await asyncio.sleep(0.001)
    return bytes(out)


def test_splice_moves_large_transfers_both_ways_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """20 MB each way at once over TCP: every byte once, in order; nearly all spliced."""
    spliced = Spliced(monkeypatch)

    async def test() -> None:
        before = open_fds()
        pair = TcpPair()
        size = 20 << 20
        up, down = blob(size, 1), blob(size, 2)
        tunnel = pair.tunnel()
        senders = pair.send_both_ways(up, down)
        got_up, got_down = await asyncio.gather(read_to_eof(pair.server),
                                                read_to_eof(pair.client))
        await asyncio.gather(*senders)
        assert digest(got_up) == digest(up)
        assert digest(got_down) == digest(down)
        await asyncio.sleep(0.01)
        assert pair.closed == [tunnel]
        assert [end.received for end in tunnel.ends] == [size, size]
        assert spliced.into_pipes > 2 * size * 0.9, spliced.into_pipes  # not recv/send
        pair.close_ends()
        assert open_fds() == before  # the pipes closed with the tunnel

    run(test)


def test_splice_slow_reader_stops_the_reading_with_bounded_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client reads nothing for a while: the bytes waiting for it (in the pipe) stay
    within HIGH_WATER plus one read, as with recv/send; the relay stops reading the server,
    whose send stalls; then everything arrives."""
    spliced = Spliced(monkeypatch)

    async def test() -> None:
        pair = TcpPair()
        pair.narrow_client_way()
        loop = asyncio.get_running_loop()
        size = 32 << 20
        data = blob(size, 3)
        tunnel = pair.tunnel()
        client_end, server_end = tunnel.ends
        sender = loop.create_task(send_then_shut(pair.server, data))
        peak = 0
        for _ in range(40):  # 0.4 s: the client reads nothing meanwhile
            await asyncio.sleep(0.01)
            peak = max(peak, waiting(client_end))
        assert client_end.pipe is not None and client_end.piped > 0, "not spliced"
        assert 0 < peak <= tunnel_mod.HIGH_WATER + tunnel_mod.READ_SIZE, peak
        assert not server_end.reading  # backpressure: the server is read no more
        assert not sender.done()
        received = server_end.received
        await asyncio.sleep(0.1)
        assert server_end.received == received  # ... and nothing more is taken
        got = await read_to_eof(pair.client)
        await sender
        assert digest(got) == digest(data)
        assert spliced.into_pipes > size * 0.9

    run(test)


@pytest.mark.parametrize("first", ["client", "server"])
def test_splice_half_close_mid_transfer(monkeypatch: pytest.MonkeyPatch, first: str) -> None:
    """Both sides stream 8 MB; one ends its direction (bytes then EOF) while the other
    keeps sending: the EOF, which the relay sees while bytes still wait in the pipe, is
    passed on after the last byte; the other direction flows on, then ends too, and the
    tunnel ends."""
    spliced = Spliced(monkeypatch)

    async def test() -> None:
        pair = TcpPair()
        loop = asyncio.get_running_loop()
        size = 8 << 20
        tunnel = pair.tunnel()
        early, late = (pair.client, pair.server) if first == "client" else (pair.server,
                                                                            pair.client)
        early_end, late_end = tunnel.ends if early is pair.client else tunnel.ends[::-1]
        # A slow reader behind small kernel buffers: bytes wait in the relay's pipe.
        late.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        late_end.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        early_data, late_data = blob(size, 4), blob(size, 5)
        # `late` sends its first half and waits; `early` sends everything and its EOF.
        late_sender = loop.create_task(loop.sock_sendall(late, late_data[: size // 2]))
        early_sender = loop.create_task(send_then_shut(early, early_data))
        to_early = loop.create_task(read_exactly(early, size // 2))
        # `late` reads slowly until the relay has the EOF: the relay, stopped by the bytes
        # waiting in its pipe, read on once they were down to LOW_WATER, took the last
        # bytes and the EOF at once: some wait behind it.
        got = bytearray()
        while not early_end.eof:
            try:
                got += late.recv(16 * 1024)
            except BlockingIOError:
                pass
            await asyncio.sleep(0.001)
        assert late_end.piped > 0, "the EOF came with no byte waiting in the pipe"
        assert not late_end.shut  # it is passed on after them
        got += await read_to_eof(late)
        assert digest(got) == digest(early_data)
        await early_sender
        first_half = await to_early
        await late_sender
        assert not tunnel.closed and not pair.closed  # the other direction is open
        assert late_end.eof is False
        await send_then_shut(late, late_data[size // 2:])
        rest = await read_to_eof(early)
        assert digest(first_half + rest) == digest(late_data)
        await asyncio.sleep(0.01)
        assert pair.closed == [tunnel]
        assert [end.received for end in tunnel.ends] == [size, size]
        assert spliced.into_pipes > 2 * size * 0.8

    run(test)


def test_splice_detach_mid_transfer_carries_exactly_what_is_undelivered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Move the tunnel again and again while 20 MB flow each way and the client reads
    slowly: each state holds, in `out`, exactly the bytes the pipes and `out` held; the
    tunnel resumed in this process on the descriptors delivers every byte once, in
    order; no descriptor is left behind."""
    spliced = Spliced(monkeypatch)

    async def test() -> None:
        before = open_fds()
        pair = TcpPair()
        loop = asyncio.get_running_loop()
        size = 20 << 20
        up, down = blob(size, 6), blob(size, 7)
        tunnel = pair.tunnel()
        senders = pair.send_both_ways(up, down)
        got_up = loop.create_task(read_to_eof(pair.server))
        got_down = bytearray()
        moves = carried_piped = 0
        while True:
            try:
                chunk = pair.client.recv(256 * 1024)
            except BlockingIOError:
                chunk = None
            if chunk == b"":
                break
            if chunk:
                got_down += chunk
            await asyncio.sleep(0.002)
            if moves < 300 and not tunnel.closed:
                held = [bytes(end.out) for end in tunnel.ends]
                piped = [end.piped for end in tunnel.ends]
                carried_piped += sum(piped)
                received = [end.received for end in tunnel.ends]
                state, fds = tunnel.detach()
                assert all(end.pipe is None for end in tunnel.ends)
                for out, held_out, in_pipe in zip(state["out"], held, piped, strict=True):
                    out = base64.b64decode(out)
                    assert len(out) == len(held_out) + in_pipe
                    assert out.startswith(held_out)
                assert state["received"] == received
                tunnel = Tunnel.resume(fds, 30.0, pair.closed.append, state)
                moves += 1
        assert digest(got_down) == digest(down)
        assert digest(await got_up) == digest(up)
        await asyncio.gather(*senders)
        await asyncio.sleep(0.01)
        assert pair.closed == [tunnel]
        assert [end.received for end in tunnel.ends] == [size, size]
        assert carried_piped > 0, "no move found bytes in a pipe: the test proves nothing"
        assert spliced.into_pipes > 0
        pair.close_ends()
        assert open_fds() == before

    run(test)


def test_splice_refused_falls_back_to_copying_without_loss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernel splices the first reads, then refuses (EINVAL) while bytes wait in the
    pipes: they are written from `out`, in order, and the relay copies from then on."""
    real = os.splice
    calls = 0

    def splice(*args: Any, **kw: Any) -> int:
        nonlocal calls
        calls += 1
        if calls > 40:
            raise OSError(errno.EINVAL, "splice refused")
        return real(*args, **kw)

    monkeypatch.setattr(os, "splice", splice)

    async def test() -> None:
        before = open_fds()
        pair = TcpPair()
        pair.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        loop = asyncio.get_running_loop()
        size = 16 << 20
        up, down = blob(size, 8), blob(size, 9)
        tunnel = pair.tunnel()
        senders = pair.send_both_ways(up, down)
        got_up = loop.create_task(read_to_eof(pair.server))
        await asyncio.sleep(0.1)  # the client reads late: bytes wait in the pipe
        got_down = await read_to_eof(pair.client)
        assert digest(got_down) == digest(down)
        assert digest(await got_up) == digest(up)
        await asyncio.gather(*senders)
        assert calls > 40, "splice was not refused mid-transfer"
        assert not any(end.splicing for end in tunnel.ends)
        assert [end.received for end in tunnel.ends] == [size, size]
        await asyncio.sleep(0.01)
        assert pair.closed == [tunnel]
        pair.close_ends()
        assert open_fds() == before

    run(test)


@pytest.mark.parametrize("how", ["no os.splice", "pipe not enlarged"])
def test_without_splice_the_relay_copies(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """No splice on this system, or no pipe of PIPE_SIZE for us (over the user's pipe
    quota): the relay copies, with no pipe open."""
    spliced = Spliced(monkeypatch)
    if how == "no os.splice":
        monkeypatch.setattr(tunnel_mod, "SPLICE", False)
    else:
        def fcntl_refused(fd: int, cmd: int, arg: int = 0) -> int:
            raise PermissionError(errno.EPERM, "over pipe-user-pages-soft")

        monkeypatch.setattr(fcntl, "fcntl", fcntl_refused)

    async def test() -> None:
        before = open_fds()
        pair = TcpPair()
        loop = asyncio.get_running_loop()
        size = 8 << 20
        data = blob(size, 10)
        tunnel = pair.tunnel()
        sender = loop.create_task(send_then_shut(pair.server, data))
        assert digest(await read_to_eof(pair.client)) == digest(data)
        await sender
        assert spliced.calls == 0
        assert tunnel.ends[0].pipe is None
        pair.client.close()
        pair.server.close()
        await asyncio.sleep(0.01)
        assert open_fds() == before

    run(test)


def test_bytes_sent_before_the_relay_go_before_spliced_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bytes given with Tunnel.send wait in `out` while the server streams: the relay
    copies until `out` is written, then splices, and the client gets them in order."""
    spliced = Spliced(monkeypatch)

    async def test() -> None:
        pair = TcpPair()
        pair.narrow_client_way()
        loop = asyncio.get_running_loop()
        early, stream = blob(1 << 20, 11), blob(16 << 20, 12)
        tunnel = pair.tunnel()
        tunnel.send(0, early)
        client_end = tunnel.ends[0]
        assert client_end.out  # more than the socket took at once
        sender = loop.create_task(send_then_shut(pair.server, stream))
        await asyncio.sleep(0.05)
        assert client_end.out and client_end.piped == 0  # copied behind `out`, not spliced
        both: list[bool] = []
        got = await read_slowly(pair.client, lambda: both.append(
            bool(client_end.out) and client_end.piped > 0))
        await sender
        assert digest(got) == digest(early + stream)
        assert not any(both)  # never bytes in `out` and in the pipe at once
        assert spliced.into_pipes > 0

    run(test)


def test_splice_stops_at_urgent_data_and_the_relay_copies_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TCP urgent data: splice reads up to the urgent mark and no further, while the
    socket stays readable. The relay must not spin there: recv reads on (and, like the
    relay without splice, leaves the urgent byte out of the stream)."""
    Spliced(monkeypatch)

    async def test() -> None:
        pair = TcpPair()
        loop = asyncio.get_running_loop()
        tunnel = pair.tunnel()
        first, second = blob(2 << 20, 13), blob(2 << 20, 14)
        await loop.sock_sendall(pair.client, first)
        assert await read_exactly(pair.server, len(first)) == first
        assert tunnel.ends[1].pipe is not None, "not spliced: the test proves nothing"
        pair.client.send(b"!", socket.MSG_OOB)
        await send_then_shut(pair.client, second)
        assert digest(await read_to_eof(pair.server)) == digest(second)
        assert tunnel.ends[1].splicing is False

    run(test)


def test_small_messages_open_no_pipe_and_a_bulk_direction_one() -> None:
    """Descriptors: a tunnel of small messages costs none beyond its sockets; a direction
    that carried bulk holds a pipe (two) until its EOF."""

    async def test() -> None:
        pair = TcpPair()
        loop = asyncio.get_running_loop()
        tunnel = pair.tunnel()
        baseline = open_fds()
        for i in range(200):
            message = b"ping %d" % i
            await loop.sock_sendall(pair.client, message)
            assert await read_exactly(pair.server, len(message)) == message
            await loop.sock_sendall(pair.server, message.upper())
            assert await read_exactly(pair.client, len(message)) == message.upper()
        assert open_fds() == baseline
        assert all(end.pipe is None for end in tunnel.ends)
        bulk = blob(4 << 20, 15)
        await loop.sock_sendall(pair.server, bulk)
        assert await read_exactly(pair.client, len(bulk)) == bulk
        assert tunnel.ends[0].pipe is not None and tunnel.ends[1].pipe is None
        assert open_fds() == baseline + 2
        pair.server.shutdown(socket.SHUT_WR)
        assert await read_to_eof(pair.client) == b""
        assert tunnel.ends[0].pipe is None  # its direction ended: the pipe closed
        assert open_fds() == baseline
        pair.client.close()
        pair.server.close()

    run(test)
