"""The byte relay (lb.tunnel) on its own: socket pairs in one loop, no pylb process.

What a tunnel hands over (`detach`, then `Tunnel.resume`) must be everything it holds:
bytes read and not yet written, in order, and the half-closes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop
from backends import pattern_bytes

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
        waiting = len(tunnel.ends[0].out)
        assert 0 < waiting <= 2 * HIGH_WATER
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
        for sock in (pair.client, pair.server):
            sock.close()
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
