"""The relay through transports (lb.streamtunnel), for tunnels with a TLS side.

In process, on a uvloop loop: the relay's two connections are real loopback TCP
connections, accepted and made by uvloop with real TLS (trustme certificates) on the
side(s) a test asks for; the test's own client and server speak TLS through a memory BIO,
so a test decides when each sends its close_notify, its TCP end of stream, or a reset."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
import trustme
import uvloop
from backends import (
    TCP_BANNER,
    HttpConn,
    TlsEchoBackend,
    free_port,
    pattern_bytes,
    pattern_sha256,
    recv_exact,
    wait_until,
    ws_upgrade,
)
from test_reload import cli, start, wait_gone, worker_pids

from lb import handover
from lb.streamtunnel import STAYS, TransportTunnel, is_tls
from lb.timer import clock
from lb.tunnel import HIGH_WATER, Held

HOST = "127.0.0.1"
NAME = "tunnel.test"
MIB = 1 << 20
# What the relay may hold while a side reads nothing: a write buffer over HIGH_WATER by
# one read (uvloop reads 256 KiB at a time), and one read a TLS side has not decrypted,
# and a little for the direction that flows. (Seen: 260 to 330 KiB.)
BOUND = 3 * HIGH_WATER

KINDS = {  # which side of the tunnel is TLS
    "tls-client": (True, False),
    "tls-server": (False, True),
    "tls-both": (True, True),
}


def run(test: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        clock.start()
        try:
            await asyncio.wait_for(test(), 30)
        finally:
            clock.stop()

    uvloop.run(main())


class Certs:
    def __init__(self) -> None:
        ca = trustme.CA()
        self.server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(NAME).configure_cert(self.server)
        self.client = ssl.create_default_context()
        ca.configure_trust(self.client)


CERTS = Certs()


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait, turn after turn of the loop, until `predicate` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "the condition never held"
        await asyncio.sleep(0.002)


def small_buffers(sock: socket.socket) -> socket.socket:
    """Small kernel buffers: what the relay holds shows, the kernel cannot hide it."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    return sock


class Peer:
    """The test's end of one of the relay's connections: plain, or TLS over a memory BIO
    (its close_notify, TCP end of stream and reset are the test's to send)."""

    def __init__(
        self, sock: socket.socket, context: ssl.SSLContext | None, server_side: bool
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = None if context is None else context.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side,
            server_hostname=None if server_side else NAME,
        )
        self.close_notify_seen = False  # the relay ended its TLS cleanly
        self.tcp_eof = False

    async def handshake(self) -> None:
        assert self.tls is not None
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                assert await self._fill(), "end of stream during the handshake"
        await self._flush()

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            await self.loop.sock_sendall(self.sock, data)

    async def _fill(self) -> bool:
        data = await self.loop.sock_recv(self.sock, 256 * 1024)
        if data:
            self.incoming.write(data)
        else:
            self.tcp_eof = True
            self.incoming.write_eof()
        return bool(data)

    async def send(self, data: bytes, chunk: int = 64 * 1024) -> None:
        if self.tls is None:
            await self.loop.sock_sendall(self.sock, data)
            return
        view = memoryview(data)
        for at in range(0, len(data), chunk):
            self.tls.write(view[at:at + chunk])
            await self._flush()

    async def recv(self, size: int = 256 * 1024) -> bytes:
        """Some bytes; b"" at the end of stream (a close_notify, answered, or TCP's)."""
        if self.tls is None:
            data = await self.loop.sock_recv(self.sock, size)
            self.tcp_eof = not data
            return data
        while True:
            try:
                data = self.tls.read(size)
            except ssl.SSLWantReadError:
                await self._fill()  # then read again: bytes, or the end (TLS's, or TCP's)
                continue
            except ssl.SSLZeroReturnError:
                data = b""
            except ssl.SSLEOFError:
                return b""  # the TCP end of stream without a close_notify
            if not data:
                self.close_notify_seen = True
                await self.close_notify()  # as TLS stacks do: the relay waits for it
            return data

    async def read_exactly(self, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            data = await self.recv(min(size - len(out), 256 * 1024))
            assert data, f"end of stream after {len(out)} of {size} bytes"
            out += data
        return bytes(out)

    async def read_to_eof(self) -> bytes:
        out = bytearray()
        while data := await self.recv():
            out += data
        return bytes(out)

    async def close_notify(self) -> None:
        """Send the TLS close_notify (the connection stays open for reading)."""
        assert self.tls is not None
        try:
            self.tls.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass
        await self._flush()

    def shut(self) -> None:
        """TCP's half-close."""
        self.sock.shutdown(socket.SHUT_WR)

    def reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        self.sock.close()


class Caught(Held):
    """The relay's end of a connection, read from no more until the tunnel takes it."""

    def __init__(self, made: asyncio.Future[Caught] | None = None) -> None:
        super().__init__()
        self.made = made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.made is not None and not self.made.done():
            self.made.set_result(self)


@dataclass
class Setup:
    """A client, the relay's two connections (a: the client's, b: the server's), a server."""

    client: Peer
    server: Peer
    a: Caught
    b: Caught
    closed: list[TransportTunnel] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    listeners: list[Any] = field(default_factory=list)

    def tunnel(self, timeout: float = 30.0) -> TransportTunnel:
        def on_close(tunnel: TransportTunnel) -> None:
            self.closed.append(tunnel)
            self.done.set()

        return TransportTunnel(
            self.a.transport, self.b.transport, timeout, on_close  # type: ignore[arg-type]
        )

    async def finished(self) -> None:
        await asyncio.wait_for(self.done.wait(), 10)

    async def closed_cleanly(self, tunnel: TransportTunnel) -> None:
        """`tunnel.close()`: both peers read to their end of stream (a TLS one gets, and
        answers, a close_notify) and the tunnel ends."""
        loop = asyncio.get_running_loop()
        readers = [loop.create_task(peer.read_to_eof()) for peer in (self.client, self.server)]
        tunnel.close()
        assert await asyncio.gather(*readers) == [b"", b""]
        await self.finished()
        for peer in (self.client, self.server):
            assert peer.close_notify_seen == (peer.tls is not None)

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()
        for peer in (self.client, self.server):
            peer.sock.close()


async def connect(kind: str, buffers: bool = False) -> Setup:
    """A client connected to the relay, the relay to a server, TLS where `kind` says."""
    client_tls, server_tls = KINDS[kind]
    loop = asyncio.get_running_loop()
    # The client, and the relay's end of its connection.
    listener = socket.socket()
    if buffers:
        small_buffers(listener)  # (accepted connections inherit them)
    listener.bind((HOST, 0))
    listener.listen()
    made: asyncio.Future[Caught] = loop.create_future()
    relay_front = await loop.create_server(
        lambda: Caught(made), sock=listener, ssl=CERTS.server if client_tls else None
    )
    sock = socket.socket()
    if buffers:
        small_buffers(sock)
    sock.setblocking(False)
    await loop.sock_connect(sock, relay_front.sockets[0].getsockname())
    client = Peer(sock, CERTS.client if client_tls else None, server_side=False)
    if client_tls:
        await client.handshake()
    a = await made
    # The server, and the relay's end of its connection.
    backend = socket.create_server((HOST, 0))
    backend.setblocking(False)
    relay_sock = socket.socket()
    if buffers:
        small_buffers(relay_sock)
    relay_sock.setblocking(False)
    await loop.sock_connect(relay_sock, backend.getsockname())
    conn, _ = await loop.sock_accept(backend)
    backend.close()
    if buffers:
        small_buffers(conn)
    server = Peer(conn, CERTS.server if server_tls else None, server_side=True)
    opening = loop.create_connection(
        Caught, sock=relay_sock, ssl=CERTS.client if server_tls else None,
        server_hostname=NAME if server_tls else None,
    )
    if server_tls:
        (_, b), _ = await asyncio.gather(opening, server.handshake())
    else:
        _, b = await opening
    assert is_tls(a.transport) == client_tls and is_tls(b.transport) == server_tls
    return Setup(client, server, a, b, listeners=[relay_front])  # type: ignore[arg-type]


def each_kind(test: Callable[[str], Awaitable[None]]) -> Callable[[str], None]:
    @pytest.mark.parametrize("kind", list(KINDS))
    def wrapper(kind: str) -> None:
        run(lambda: test(kind))

    wrapper.__name__ = test.__name__
    wrapper.__doc__ = test.__doc__
    return wrapper


# -- bytes -----------------------------------------------------------------------------


@each_kind
async def test_bytes_both_ways_and_their_counts(kind: str) -> None:
    setup = await connect(kind)
    tunnel = setup.tunnel()
    for round_ in range(20):
        up, down = b"ping %d\n" % round_, b"pong %d!\n" % round_
        await setup.client.send(up)
        assert await setup.server.read_exactly(len(up)) == up
        await setup.server.send(down)
        assert await setup.client.read_exactly(len(down)) == down
    ups = sum(len(b"ping %d\n" % n) for n in range(20))
    downs = sum(len(b"pong %d!\n" % n) for n in range(20))
    assert [end.received for end in tunnel.ends] == [ups, downs]
    assert tunnel.peer_address() == setup.client.sock.getsockname()
    assert not tunnel.closed and not setup.closed
    await setup.closed_cleanly(tunnel)
    assert setup.closed == [tunnel] and tunnel not in clock.watched
    setup.close()


@each_kind
async def test_4_mib_each_way_with_a_stalled_reader_keeps_the_relay_bounded(kind: str) -> None:
    """The client reads nothing for a while: the relay stops reading the server (its
    sender waits) and holds at most BOUND bytes; then every byte arrives, in order."""
    setup = await connect(kind, buffers=True)
    loop = asyncio.get_running_loop()
    tunnel = setup.tunnel()
    size = 4 * MIB
    up, down = pattern_bytes(size), bytes(reversed(pattern_bytes(size)))
    most = 0
    watching = True

    async def watch() -> None:
        nonlocal most
        while watching:
            most = max(most, tunnel.buffered())
            await asyncio.sleep(0)

    watcher = loop.create_task(watch())
    to_client = loop.create_task(setup.server.send(down))
    to_server = loop.create_task(setup.client.send(up))
    got_up = loop.create_task(setup.server.read_exactly(size))
    # The client does not read: the relay stops reading what the server sends.
    await until(lambda: tunnel.ends[1].reading is False and tunnel.ends[0].paused)
    await asyncio.sleep(0.05)  # (a few more turns: nothing must move meanwhile)
    assert not to_client.done(), "the server could send everything: no backpressure"
    held = tunnel.buffered()
    assert 0 < held <= BOUND, held
    got_down = await setup.client.read_exactly(size)
    assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
    assert await got_up == up
    await asyncio.gather(to_client, to_server)
    watching = False
    await watcher
    assert most <= BOUND, f"the relay held {most} bytes"
    assert [end.received for end in tunnel.ends] == [size, size]
    await setup.closed_cleanly(tunnel)
    setup.close()


@pytest.mark.parametrize("ending", ["close_notify", "fin", "close_notify+fin"])
def test_a_tls_client_that_sends_and_leaves_while_the_server_reads_nothing_loses_nothing(
    ending: str,
) -> None:
    """uvloop drops what its TLS transport read ahead of a paused protocol when the TCP
    end of stream follows: the relay must not let it read ahead (see lb.streamtunnel)."""

    async def test() -> None:
        setup = await connect("tls-client", buffers=True)
        # Room in the client's socket for what the relay does not read (the rest waits
        # in the relay, and in the kernel on the way to the server).
        setup.client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MIB)
        tunnel = setup.tunnel()
        data = pattern_bytes(512 * 1024)
        await setup.client.send(data)
        await until(lambda: tunnel.ends[0].reading is False)  # the server reads nothing
        if "close_notify" in ending:
            await setup.client.close_notify()
        if "fin" in ending:
            setup.client.shut()
        # The relay's turns to read what it may: uvloop, let read ahead, would see the
        # end of stream here and drop what it read before. (Whatever the timing, no byte
        # may be lost: this wait only gives the bug its chance.)
        await asyncio.sleep(0.1)
        got = await setup.server.read_to_eof()
        assert len(got) == len(data) and got == data
        await setup.finished()
        assert tunnel.ends[0].received == len(data)
        setup.close()

    run(test)


@each_kind
async def test_bytes_written_before_the_tunnel_go_first(kind: str) -> None:
    """What the session wrote to a transport, then what it read early (`send`), then
    what the relay reads: in this order, on both sides."""
    setup = await connect(kind)
    await setup.server.send(b"early from the server;")
    await until(lambda: bool(setup.b.early))
    await setup.server.send(b"relayed from the server")  # waits, unread, in the socket
    setup.a.transport.write(b"101 Switching;")  # type: ignore[union-attr]
    setup.b.transport.write(b"GET / Upgrade;")  # type: ignore[union-attr]
    tunnel = setup.tunnel()
    tunnel.send(0, b"".join(setup.b.early))
    tunnel.send(1, b"leftover;")
    await setup.client.send(b"relayed from the client")
    expected = b"101 Switching;early from the server;relayed from the server"
    assert await setup.client.read_exactly(len(expected)) == expected
    expected = b"GET / Upgrade;leftover;relayed from the client"
    assert await setup.server.read_exactly(len(expected)) == expected
    # the early bytes were counted by their reader, not by the relay
    assert [end.received for end in tunnel.ends] == [23, 23]
    await setup.closed_cleanly(tunnel)
    setup.close()


# -- ends ------------------------------------------------------------------------------


def test_half_close_from_the_plain_side() -> None:
    """The plain server sends its EOF: the TLS client gets every byte, then the TLS end
    (a TLS side cannot half-close), and the relay ends both connections."""

    async def test() -> None:
        setup = await connect("tls-client")
        tunnel = setup.tunnel()
        await setup.server.send(b"last words")
        setup.server.shut()
        assert await setup.client.read_to_eof() == b"last words"
        assert setup.client.close_notify_seen
        await setup.finished()
        assert await setup.server.read_to_eof() == b""  # closed once the client was gone
        assert [end.received for end in tunnel.ends] == [0, 10]
        setup.close()

    run(test)


def test_half_close_between_plain_sides_of_a_tls_server_tunnel() -> None:
    """The plain client half-closes: the TLS server gets its bytes and a close_notify,
    and the relay closes once it is gone; what the server sent before arrives first."""

    async def test() -> None:
        setup = await connect("tls-server")
        tunnel = setup.tunnel()
        await setup.server.send(b"hello")
        assert await setup.client.read_exactly(5) == b"hello"
        await setup.client.send(b"request")
        setup.client.shut()
        assert await setup.server.read_to_eof() == b"request"
        assert setup.server.close_notify_seen
        assert await setup.client.read_to_eof() == b""
        await setup.finished()
        assert [end.received for end in tunnel.ends] == [7, 5]
        setup.close()

    run(test)


@pytest.mark.parametrize("side", ["client", "server"])
def test_half_close_from_the_tls_side(side: str) -> None:
    """A TLS side sends its close_notify: the plain side gets its bytes then an EOF;
    the TLS side gets the relay's close_notify, and the relay ends."""

    async def test() -> None:
        setup = await connect("tls-client" if side == "client" else "tls-server")
        tunnel = setup.tunnel()
        tls, plain = (setup.client, setup.server) if side == "client" else (
            setup.server, setup.client)
        await plain.send(b"before")
        assert await tls.read_exactly(6) == b"before"
        await tls.send(b"goodbye")
        await tls.close_notify()
        assert await plain.read_to_eof() == b"goodbye"
        assert await tls.read_to_eof() == b""
        assert tls.close_notify_seen
        await setup.finished()
        received = [7, 6] if side == "client" else [6, 7]
        assert [end.received for end in tunnel.ends] == received
        setup.close()

    run(test)


def test_a_close_notify_passes_through_a_tls_both_tunnel() -> None:
    async def test() -> None:
        setup = await connect("tls-both")
        tunnel = setup.tunnel()
        await setup.client.send(b"question")
        await setup.client.close_notify()
        assert await setup.server.read_to_eof() == b"question"
        assert setup.server.close_notify_seen
        assert await setup.client.read_to_eof() == b""
        await setup.finished()
        assert tunnel.ends[0].received == 8
        setup.close()

    run(test)


@each_kind
async def test_a_side_that_closes_ends_both(kind: str) -> None:
    for closing in ("client", "server"):
        setup = await connect(kind)
        tunnel = setup.tunnel()
        gone, other = (setup.client, setup.server) if closing == "client" else (
            setup.server, setup.client)
        await other.send(b"x" * 1000)
        assert await gone.read_exactly(1000) == b"x" * 1000
        if gone.tls is not None:
            await gone.close_notify()
        gone.sock.close()
        assert await other.read_to_eof() == b""
        await setup.finished()
        assert setup.closed == [tunnel]
        setup.close()


@each_kind
async def test_a_reset_resets_the_other_side(kind: str) -> None:
    setup = await connect(kind)
    setup.tunnel()
    setup.client.reset()
    with pytest.raises(ConnectionResetError):
        await setup.server.read_to_eof()
    await setup.finished()
    setup.close()


@each_kind
async def test_the_timeout_aborts_both_sides(kind: str) -> None:
    setup = await connect(kind)
    tunnel = setup.tunnel(timeout=0.3)
    await setup.client.send(b"keep")
    assert await setup.server.read_exactly(4) == b"keep"
    begin = asyncio.get_running_loop().time()
    await setup.finished()
    assert asyncio.get_running_loop().time() - begin >= 0.2  # (the clock ticks: TICK)
    assert tunnel.closed and tunnel not in clock.watched
    for peer in (setup.client, setup.server):
        try:
            assert await peer.read_to_eof() == b""
        except ConnectionResetError:
            pass
        assert not peer.close_notify_seen  # aborted: no clean TLS end
    setup.close()


@each_kind
async def test_close_with_abort_resets_both_sides_at_once(kind: str) -> None:
    setup = await connect(kind, buffers=True)
    tunnel = setup.tunnel()
    sender = asyncio.get_running_loop().create_task(setup.server.send(pattern_bytes(4 * MIB)))
    await until(lambda: tunnel.ends[0].paused)  # bytes wait for the client
    tunnel.close(abort=True)
    assert setup.closed == [tunnel]  # at once
    with pytest.raises(ConnectionResetError):
        while await setup.client.recv():
            pass
    # The server's next send sees the reset (a later one a broken pipe); then it reads
    # its end of stream.
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        await sender
    setup.close()


@each_kind
async def test_a_side_gone_before_the_tunnel_began_ends_it(kind: str) -> None:
    setup = await connect(kind)
    loop = asyncio.get_running_loop()
    readers = [loop.create_task(peer.read_to_eof()) for peer in (setup.client, setup.server)]
    setup.b.transport.close()  # type: ignore[union-attr]
    tunnel = setup.tunnel()
    tunnel.send(1, b"lost")  # dropped: that side takes no more
    tunnel.send(0, b"kept")
    await setup.finished()
    assert tunnel.ends[1].lost
    assert await asyncio.gather(*readers) == [b"kept", b""]
    setup.close()


# -- reloads ---------------------------------------------------------------------------


@each_kind
async def test_a_transport_tunnel_stays_at_a_handover(kind: str) -> None:
    """lb.handover.leave never detaches it: the session stays, and says why."""
    setup = await connect(kind)
    tunnel = setup.tunnel()
    worker = SimpleNamespace(handing_over=True, accepts={"fe": {}, "srv": {}})
    session = SimpleNamespace(
        frontend=SimpleNamespace(worker=worker, name="fe"), tunnel=tunnel, stays="",
    )
    assert handover.leave(session, "tcp", {}) is False
    assert session.stays == STAYS
    await setup.client.send(b"still here")
    assert await setup.server.read_exactly(10) == b"still here"
    await setup.closed_cleanly(tunnel)
    setup.close()


@each_kind
async def test_a_stream_with_a_tls_side_stays(kind: str) -> None:
    setup = await connect(kind)
    session = SimpleNamespace(
        moving=None, transport=setup.a.transport, conn=SimpleNamespace(transport=setup.b.transport),
        stays="",
    )
    handover.leave_stream(session)
    assert session.stays == "TLS connection" and session.moving is None
    for caught in (setup.a, setup.b):
        caught.transport.close()  # type: ignore[union-attr]
    setup.close()


# -- through pylb ----------------------------------------------------------------------
# A real pylb with TLS binds (and a TLS server): WebSocket and TCP-mode tunnels relayed
# through the transports, and a reload that leaves them in the old worker.


@dataclass
class Pki:
    ca: trustme.CA
    pem: Any  # the frontends' certificate chain and key (a file)
    ca_file: Any  # the CA, for pylb to check TLS servers

    def client(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = trustme.CA()
    where = tmp_path_factory.mktemp("pki")
    pem, ca_file = where / "site.pem", where / "ca.pem"
    ca.issue_cert(NAME).private_key_and_cert_chain_pem.write_to_path(str(pem))
    ca.cert_pem.write_to_path(str(ca_file))
    return Pki(ca, pem, ca_file)


def site_config(pki: Pki, ws: str, tcp: str, **pg_server: Any) -> tuple[dict[str, Any],
                                                                          dict[str, int]]:
    """`ws` (HTTP) and `db` (TCP mode) on TLS binds, `plain` (TCP mode) on a plain one,
    its server `tcp` reached as `pg_server` says (TLS, for one)."""
    ports = {name: free_port() for name in ("ws", "db", "plain")}

    def tls_bind(name: str) -> list[dict[str, Any]]:
        return [{"address": f"{HOST}:{ports[name]}", "ssl": True, "crt": str(pki.pem)}]

    cfg = {
        "global": {"workers": 1, "stats": {"socket": "lb.sock", "level": "admin"}},
        "defaults": {"timeout": {"connect": "2s", "client": "30s", "server": "30s",
                                 "tunnel": "60s", "queue": "30s"}},
        "frontends": {
            "ws": {"bind": tls_bind("ws"), "default_backend": "web"},
            "db": {"bind": tls_bind("db"), "mode": "tcp", "default_backend": "pg"},
            "plain": {"bind": f"{HOST}:{ports['plain']}", "mode": "tcp",
                      "default_backend": "pg"},
        },
        "backends": {
            "web": {"servers": {"w1": {"address": ws}}},
            "pg": {"mode": "tcp", "servers": {"p1": {"address": tcp, **pg_server}}},
        },
    }
    return cfg, ports


def tls_connect(pki: Pki, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection((HOST, port), timeout=10)
    return pki.client().wrap_socket(raw, server_hostname=NAME)


def echoes(sock: socket.socket, size: int = 64 * 1024, rounds: int = 4) -> None:
    """Bytes sent come back, in order (one piece at a time: one thread per TLS socket)."""
    for round_ in range(rounds):
        piece = pattern_bytes(size)[round_:] + b"%d" % round_
        sock.sendall(piece)
        assert recv_exact(sock, len(piece)) == piece


def end_cleanly(sock: ssl.SSLSocket) -> None:
    """Our close_notify, and pylb's in answer: a clean TLS end."""
    sock.unwrap().close()


def sessions(lb: Any, frontend: str) -> int:
    """The frontend's current sessions (`scur` in `show stat`)."""
    lines = cli(lb, "show stat").splitlines()
    names = lines[0].removeprefix("# ").split(",")
    for line in lines[1:]:
        row = dict(zip(names, line.split(","), strict=False))
        if row.get("pxname") == frontend and row.get("svname") == "FRONTEND":
            return int(row["scur"])
    raise AssertionError(f"no frontend {frontend}")


def owner(lb: Any, sock: socket.socket) -> int | None:
    """The pid of the pylb worker holding the other end of `sock`."""
    local = sock.getsockname()
    for process in lb.workers():
        try:
            for conn in process.net_connections(kind="tcp"):
                if conn.raddr and (conn.raddr.ip, conn.raddr.port) == local:
                    return process.pid
        except psutil.NoSuchProcess:
            continue
    return None


def test_a_websocket_through_a_tls_frontend(pylb: Any, backends: Any, pki: Pki) -> None:
    ws, tcp = backends.echo("ws"), backends.tcp("echo")
    cfg, ports = site_config(pki, ws.address, tcp.address)
    lb, _ = start(pylb, cfg)
    sock = tls_connect(pki, ports["ws"])
    ws_upgrade(sock)
    echoes(sock, rounds=64)  # 4 MiB each way
    end_cleanly(sock)
    assert wait_until(lambda: sessions(lb, "ws") == 0, 5), "the session did not end"


def test_a_tcp_mode_tls_frontend_relays_to_a_plain_echo_server(
    pylb: Any, backends: Any, pki: Pki
) -> None:
    tcp = backends.tcp("echo")
    cfg, ports = site_config(pki, tcp.address, tcp.address)
    lb, _ = start(pylb, cfg)
    sock = tls_connect(pki, ports["db"])
    assert recv_exact(sock, len(TCP_BANNER)) == TCP_BANNER
    echoes(sock, size=1000, rounds=20)
    end_cleanly(sock)  # the server gets its EOF
    assert tcp.finished.wait(5)
    assert tcp.received == [b"".join(
        pattern_bytes(1000)[n:] + b"%d" % n for n in range(20))]


def test_a_tcp_mode_tls_frontend_passes_the_server_close_on_after_every_byte(
    pylb: Any, backends: Any, pki: Pki
) -> None:
    size = 8 * MIB
    source = backends.tcp("source", size=size)
    cfg, ports = site_config(pki, source.address, source.address)
    start(pylb, cfg)
    sock = tls_connect(pki, ports["db"])
    got = bytearray()
    while data := sock.recv(256 * 1024):  # b"" at pylb's close_notify
        got += data
    assert len(got) == size and hashlib.sha256(got).hexdigest() == pattern_sha256(size)
    end_cleanly(sock)


def test_tcp_mode_to_a_tls_server(pylb: Any, backends: Any, pki: Pki) -> None:
    """A plain client, a TLS server: an Upgrade (the server's echo) and a download."""
    server = backends._add(TlsEchoBackend("tls", pki.ca.issue_cert(NAME)))
    cfg, ports = site_config(pki, server.address, server.address, ssl=True,
                             **{"ca-file": str(pki.ca_file), "sni": NAME})
    start(pylb, cfg)
    with socket.create_connection((HOST, ports["plain"]), timeout=10) as sock:
        ws_upgrade(sock)
        echoes(sock, rounds=16)
    with HttpConn(ports["plain"], timeout=10) as conn:
        got = hashlib.sha256()
        response = conn.request("GET", f"/file?size={4 * MIB}")
        got.update(response.body)
        assert response.status == 200 and got.hexdigest() == pattern_sha256(4 * MIB)
    assert server.snis == [NAME, NAME]


def test_a_reload_leaves_tls_tunnels_in_the_old_worker_until_they_end(
    pylb: Any, backends: Any, pki: Pki
) -> None:
    """WebSocket and TCP-mode tunnels from TLS clients, and one from a plain client to
    a TLS server: at a reload they stay in the old worker (`show proc` says why), keep
    talking there, and end cleanly; then the old worker exits."""
    ws, tcp = backends.echo("ws"), backends.tcp("echo")
    tls_server = backends._add(TlsEchoBackend("tls", pki.ca.issue_cert(NAME)))
    cfg, ports = site_config(pki, ws.address, tcp.address)
    # `plain` goes to a TLS server (through backend `tls`)
    cfg["frontends"]["plain"]["default_backend"] = "tls"
    cfg["backends"]["tls"] = {"mode": "tcp", "servers": {"t1": {
        "address": tls_server.address, "ssl": True, "ca-file": str(pki.ca_file), "sni": NAME}}}
    lb, reload = start(pylb, cfg)
    web = tls_connect(pki, ports["ws"])
    ws_upgrade(web)
    db = tls_connect(pki, ports["db"])
    assert recv_exact(db, len(TCP_BANNER)) == TCP_BANNER
    to_tls = socket.create_connection((HOST, ports["plain"]), timeout=10)
    ws_upgrade(to_tls)
    tunnels = (web, db, to_tls)
    old = worker_pids(lb)
    assert {owner(lb, sock) for sock in tunnels} == old
    reload("SIGUSR2")
    # (the old worker hears of its stop right after the new generation is up)
    assert wait_until(lambda: "3 x TLS tunnel" in cli(lb, "show proc"), 5), cli(lb, "show proc")
    assert worker_pids(lb) & old
    for sock in tunnels:
        echoes(sock, size=100 * 1024)
        assert owner(lb, sock) in old  # still there: TLS does not move
    new = worker_pids(lb) - old
    end_cleanly(web)
    end_cleanly(db)
    assert tcp.finished.wait(5)
    assert wait_until(lambda: "1 x TLS tunnel" in cli(lb, "show proc"), 5), cli(lb, "show proc")
    assert worker_pids(lb) & old, "the old worker left with a tunnel in it"
    to_tls.shutdown(socket.SHUT_WR)  # a half-close: the TLS server closes in turn
    assert to_tls.recv(100) == b""
    to_tls.close()
    wait_gone(lb, old)
    assert worker_pids(lb) == new
    assert "hard-stop-after" not in lb.output()
