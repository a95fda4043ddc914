"""TCP mode: each client connection is relayed byte for byte to one server."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from lb import handover, httplog
from lb.balance import Context
from lb.counters import CONNECT, LBTOT, STOT
from lb.retry import redispatch_now
from lb.streamtunnel import TransportTunnel, is_tls
from lb.timer import clock
from lb.tunnel import Held, Tunnel, take_socket

if TYPE_CHECKING:
    from lb.backend import Server
    from lb.frontend import Frontend
    from lb.rules import StickCounters


class TcpSession(asyncio.Protocol):
    __slots__ = (
        "frontend", "transport", "deadline", "server", "retries_left", "task", "done",
        "early", "early_eof", "queue_id", "slot", "begin", "queued", "connect", "connected",
        "retries", "tunnel", "tracked", "adopted", "peer", "stays",
    )

    def __init__(self, frontend: Frontend, adopted: bool = False) -> None:
        self.frontend = frontend
        self.adopted = adopted
        self.tracked: StickCounters | None = None  # tcp-request connection track-sc
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.deadline = 0.0
        self.server: Server | None = None
        self.retries_left = 0
        self.task: asyncio.Task[None] | None = None
        self.done = False  # relayed or closed: this object's part is over
        self.early: list[bytes] = []  # client bytes read before the relay began
        self.early_eof = False
        self.queue_id = 0  # waiting for a slot on a limited server (see lb.queue)
        self.slot: Server | None = None  # the limited server whose slot this holds
        # For the log line: when each step happened (monotonic seconds, -1: not yet)
        self.begin = time.monotonic()
        self.queued = self.connect = self.connected = -1.0
        self.retries = 0
        self.tunnel: Tunnel | TransportTunnel | None = None
        self.peer: tuple[str, int] = ("", 0)  # the client's address
        self.stays = ""  # why this connection cannot move to the next generation

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if is_tls(transport):
            # uvloop's TLS transport reads ahead of a paused protocol and drops what it
            # read if the connection then ends: read nothing ahead
            transport.set_read_buffer_limits(high=1, low=0)  # type: ignore[attr-defined]
        self.frontend.tls_opened(self, transport.get_extra_info("ssl_object"))  # if TLS
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = (peer[0], peer[1])
        frontend = self.frontend
        if frontend.connection_rules is not None:
            if not frontend.connected(self, self.peer[0], self.adopted):
                self.done = True
                return  # rejected by tcp-request connection
        if frontend.admit(self):
            self.admitted()

    def admitted(self) -> None:
        """The frontend's limits let this connection in: find it a server."""
        backend = self.frontend.default_backend
        if backend is None:
            self._give_up()
            return
        self.retries_left = backend.cfg.retries
        clock.watched.add(self)
        self._dispatch(None)

    def _dispatch(self, exclude: Server | None) -> None:
        backend = self.frontend.default_backend
        assert backend is not None
        client_ip = self.peer[0]
        table = backend.stick  # tcp mode sticks on src only
        stick_key = table.key_of(client_ip) if table is not None and client_ip else None
        server = backend.stuck(stick_key)
        if server is None or server is exclude:
            server = backend.pick(Context(client_ip.encode()), exclude)
        if server is not None and stick_key is not None:
            backend.stick.learn(stick_key, server.name)  # type: ignore[union-attr]
        self._release_slot()
        if server is None:
            if backend.holds and not self.frontend.worker.queue.alone:
                # hold-when-down: wait in the backend's queue for a server to be usable
                self.queued = time.monotonic()
                self.deadline = clock.now + backend.timeouts.queue
                self.queue_id = self.frontend.worker.queue.acquire(
                    backend, None, False, self._granted
                )
            else:
                self._give_up()
            return
        if server.maxconn > 0:  # a limited server: the master hands out its slots
            self.queued = time.monotonic()
            self.deadline = clock.now + backend.timeouts.queue
            self.queue_id = self.frontend.worker.queue.acquire(
                backend, server, False, self._granted
            )
            return
        self._connect(server)

    def _granted(self, server: Server | None) -> None:
        self.queue_id = 0
        if server is None or self.done:
            if server is not None:
                self.frontend.worker.queue.release(server)
            self._give_up()
            return
        self.slot = server
        self._connect(server)

    def _release_slot(self) -> None:
        queue = self.frontend.worker.queue
        if self.queue_id:
            queue.cancel(self.queue_id)
            self.queue_id = 0
        if self.slot is not None:
            queue.release(self.slot)
            self.slot = None

    def _connect(self, server: Server) -> None:
        self.server = server
        self.connect = time.monotonic()
        server.counters.w[CONNECT] += 1
        self.deadline = clock.now + server.backend.timeouts.connect
        self.task = asyncio.get_running_loop().create_task(self._open(server))

    async def _open(self, server: Server) -> None:
        # A TLS server (ssl: true) gets its context and name (lb.tls.client): a failed
        # handshake is a failed connect (SSLError is an OSError), within `timeout connect`.
        tls = getattr(server, "tls", None)
        name = (getattr(server, "sni", None) or server.host) if tls is not None else None
        try:
            transport, held = await asyncio.get_running_loop().create_connection(
                Held, server.host, server.port, ssl=tls, server_hostname=name
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
        self.connected = time.monotonic()
        clock.watched.discard(self)
        server.opened()
        server.counters.w[STOT] += 1
        server.counters.w[LBTOT] += 1
        self.transport.pause_reading()
        transport.pause_reading()
        tunnel: Tunnel | TransportTunnel
        if is_tls(self.transport) or is_tls(transport):
            # TLS on either side: the bytes go through the transports (lb.streamtunnel),
            # and the tunnel ends in this process.
            tunnel = TransportTunnel(self.transport, transport, self._timeout(), self._finished)
        else:
            # Neither side was written to yet: the relay takes the sockets as they are.
            tunnel = Tunnel(
                take_socket(self.transport), take_socket(transport), self._timeout(),
                self._finished,
            )
        self.tunnel = tunnel
        tunnel.send(0, b"".join(held.early))
        tunnel.send(1, b"".join(self.early))
        if held.eof:
            tunnel.end_of(1)
        if self.early_eof:
            tunnel.end_of(0)
        if self.frontend.stopping and not tunnel.closed:
            self.close_if_idle()  # connected as this worker stopped: move it now

    def _timeout(self) -> float:
        timeouts = self.frontend.timeouts
        return max(timeouts.client, timeouts.server)

    def resume_tunnel(
        self, state: dict[str, Any], fds: list[int], backend: object, server: Server
    ) -> None:
        """Go on with a session an older generation relayed (see lb.handover)."""
        self.done = True
        self.server = server
        self.peer = (state["peer"][0], state["peer"][1])
        self.begin = state["begin"]
        self.queued, self.connect, self.connected = state["times"]
        self.retries = state["retries"]
        self.slot = server if state["slot"] else None
        server.opened()
        frontend = self.frontend
        if frontend.connection_rules is not None:
            frontend.connected(self, self.peer[0], True)  # its stick counters, again
        self.tunnel = Tunnel.resume(fds, self._timeout(), self._finished, state)
        if frontend.stopping:
            self.close_if_idle()

    def _finished(self, tunnel: Tunnel | TransportTunnel) -> None:
        self._release_slot()
        server = self.server
        server.closed()  # type: ignore[union-attr]
        handover.count_bytes(self, tunnel)
        self._log(tunnel.ends[1].received, "--")
        self.frontend.closed(self)

    def _log(self, bytes_out: int, termination: str) -> None:
        """One line in the frontend's request log, in HAProxy's TCP format."""
        if self.frontend.request_log is not None:
            self.frontend.request_log.write(httplog.tcp_record(self, bytes_out, termination))

    def data_received(self, data: bytes) -> None:
        # Before the relay: keep this read for the server and read no more until then.
        self.early.append(data)
        self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.early_eof = True
        # The client half-closed: its bytes still go to the server. (Over TLS the
        # transport closes whatever we say: asyncio cannot half-close TLS.)
        return not is_tls(self.transport)

    def on_timeout(self) -> None:
        """Queue or connect timed out, or the connect failed: retry, then give up."""
        if self.queue_id:
            self._give_up()  # timeout queue
            return
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.retries_left <= 0:
            self._give_up()
            return
        self.retries_left -= 1
        self.retries += 1
        backend = self.frontend.default_backend
        cfg = backend.cfg  # type: ignore[union-attr]
        server = self.server
        if redispatch_now(cfg.redispatch, cfg.retries, self.retries_left) or (
            cfg.redispatch and server is not None and not server.selectable  # marked down
        ):
            self._dispatch(self.server)
        else:
            self._connect(self.server)  # type: ignore[arg-type]

    def _give_up(self) -> None:
        if not self.done:
            self._log(0, "sQ" if self.queue_id else "SC")
        self.done = True
        self._release_slot()
        clock.watched.discard(self)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        # Only before the relay: once relayed, the tunnel owns the client connection.
        self.done = True
        if self.task is not None:
            self.task.cancel()
            self.task = None
        self._release_slot()
        clock.watched.discard(self)
        self.frontend.closed(self)

    def describe(self) -> dict[str, object]:
        """This connection, for `show sess`."""
        peer = self.peer
        backend = self.frontend.default_backend
        return {
            "id": id(self), "src": f"{peer[0]}:{peer[1]}", "fe": self.frontend.name,
            "be": backend.name if backend is not None else "<NONE>",
            "srv": self.server.name if self.server is not None else "<none>",
            "age": time.monotonic() - self.begin,
            "state": "tunnel" if self.tunnel is not None else "connecting",
        }

    def kill(self) -> None:
        """`shutdown sessions server`: end this connection now."""
        if self.tunnel is not None:
            self.tunnel.close(abort=True)
        else:
            self._give_up()

    def close_if_idle(self) -> None:
        """Soft stop: a relayed connection moves to the next generation, whole; one that
        is still connecting gets there first. A TLS one stays (lb.handover.leave says so
        in `stays`) and ends here."""
        tunnel = self.tunnel
        if tunnel is not None and not tunnel.closed:
            handover.leave(self, "tcp", {
                "peer": list(self.peer), "retries": self.retries,
                "times": [self.queued, self.connect, self.connected],
            })
