"""A worker process: serves the listening sockets the master hands it, nothing else.

Forked from the worker template (lb.template), or started by the master as
`python -m lb.worker FD`; either way `main` runs with FD, its end of the control
channel. The first message on it carries the configuration and, by SCM_RIGHTS, the
listening sockets; the worker answers `ready` once it accepts on all of them.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import gc
import ipaddress
import logging
import os
import pickle
import signal
import socket
import sys
from typing import Any

import setproctitle
import uvloop

from lb import config, control, handover, maps, privileges, tls
from lb import log as logsetup
from lb.applet import MasterLink
from lb.backend import Backend
from lb.frontend import Frontend
from lb.log import log
from lb.mapstore import SharedMap
from lb.queue import Queue
from lb.serverconn import ConnectionPool
from lb.shared import GLOBAL_FIELDS, Shared
from lb.sticktable import StickTable
from lb.timer import clock
from lb.tunnel import take_socket

EXIT_GRACE = 0.05  # seconds a stopping worker waits for connections already accepted
HANDSHAKE_RECHECK = 0.1  # ... and between looks at TLS handshakes it waits for
ORPHAN_GRACE = 30.0  # how long a worker whose master died finishes what is in flight
ORPHAN_ACCEPT = 0.2  # ... and how long it still accepts clients that connected meanwhile
PR_SET_PDEATHSIG = 1
_NO_MAP = SharedMap(None)  # configurations name only maps that exist: never used


class Worker:
    def __init__(self, sock: socket.socket, hello: dict[str, Any], fds: list[int]) -> None:
        self._sock = sock
        self.channel: control.Channel | None = None  # on the loop, once running
        self.queue = Queue(self._send)
        self.master_link = MasterLink(self._send)  # requests for the stats pages (lb.applet)
        # the master's parsed configuration (it read and checked it once for all)
        self.config: config.Config = pickle.loads(base64.b64decode(hello["config"]))
        self.generation: int = hello["generation"]
        self.master_pid: int = hello.get("master", os.getppid())
        self.master_gone = False
        self.index: int = hello["index"]
        self.count: int = hello["workers"]
        self.pool = ConnectionPool()
        self.slot: int = hello["slot"]  # this worker's column in the shared counters
        # The listening sockets come first, then the stick tables, the maps' indexes and
        # the shared memory.
        self.shared = Shared(fds.pop(), self.config)
        listening, tables = len(hello["listeners"]), len(hello["tables"])
        self.tables = {
            name: StickTable(fd, name, _expire(self.config, name))
            for name, fd in zip(hello["tables"], fds[listening : listening + tables], strict=True)
        }
        # Runtime state the operator sets through the master (rules read it)
        self.maps = maps.opened(hello["maps"], fds[listening + tables :])
        self.variables: dict[str, str] = dict(hello.get("vars", {}))
        del fds[listening:]
        # TLS: the session ticket keys all workers share, and certificates committed at
        # run time (`commit ssl cert`) in place of the configuration's
        self.ticket_keys = tls.ticket_keys(hello.get("ticket_keys", []))
        self.certs = tls.decode_certs(hello.get("certs", ""))
        self.backends = {
            name: Backend(cfg, self.shared, self.slot)
            for name, cfg in self.config.backends.items()
        }
        for name, backend in self.backends.items():
            if backend.cfg.stick_on is not None:
                backend.stick = self.tables.get(name)
        self.frontends = {
            name: Frontend(cfg, self.backends, self) for name, cfg in self.config.frontends.items()
        }
        for (frontend, address), fd in zip(hello["listeners"], fds, strict=True):
            self.frontends[frontend].add_socket(socket.socket(fileno=fd), address)
        self.stopping = False
        self.handing_over = False  # soft-stopping with a newer generation to take over
        self.accepts: handover.Accepts | None = None  # ... and what it can take over
        self._leaving: list[tuple[dict[str, Any], list[int]]] = []  # connections to hand over
        self.handed: dict[str, int] = {}  # what went to the next generation, by kind
        self._exit_check: asyncio.TimerHandle | None = None
        self._done: asyncio.Future[None] | None = None

    # -- lb.rules.Runtime: what rules may look at ----------------------------------------

    def nbsrv(self, backend: str) -> int:
        """Usable servers of a backend (up, not in maintenance)."""
        found = self.backends.get(backend)
        return sum(s.persistable for s in found.servers) if found is not None else 0

    def var(self, name: str) -> str | None:
        return self.variables.get(name)

    def map(self, name: str) -> SharedMap:
        return self.maps.get(name, _NO_MAP)

    def table(self, name: str) -> StickTable | None:
        return self.tables.get(name)

    def resolve_servers(self) -> None:
        """Server names to addresses now, as HAProxy resolves them at start: a worker
        about to enter a chroot will not find the system's resolver files there."""
        for backend in self.backends.values():
            for server in backend.servers:
                try:
                    ipaddress.ip_address(server.host)
                    continue  # an address already
                except ValueError:
                    pass
                try:
                    found = socket.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM)
                except OSError as err:
                    log.warning("server %s: cannot resolve %s before the chroot: %s",
                                server, server.host, err)
                    continue
                server.host = str(found[0][4][0])

    def connections(self) -> int:
        """Connections admitted by pylb as a whole, all frontends."""
        return self.shared.total(GLOBAL_FIELDS)

    @property
    def name(self) -> str:
        return f"worker {self.index}/{self.count} gen {self.generation}"

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        clock.start()
        for frontend in self.frontends.values():
            await frontend.start()
            clock.on_tick.append(frontend.check_limits)  # places freed by other workers
        self.channel = control.Channel(self._sock, self._on_control, self._master_gone)
        self.channel.on_drained = self.maybe_exit  # connections handed over are sent
        # SIGUSR1: a soft stop, or, as the parent-death signal, the master is gone
        loop.add_signal_handler(signal.SIGUSR1, self._on_sigusr1)
        loop.add_signal_handler(signal.SIGTERM, self._finish)
        self.channel.send({"op": "ready", "pid": os.getpid()})
        await self._done
        clock.stop()
        self.pool.close()

    def _send(self, message: dict[str, Any]) -> None:
        if self.channel is not None:
            self.channel.send(message)

    def _on_control(self, message: dict[str, Any], fds: list[int]) -> None:
        op = message["op"]
        if op != "adopt":
            for fd in fds:
                os.close(fd)
        if op == "grant":
            self.queue.on_grant(message, self.backends)
        elif op == "web-reply":
            self.master_link.answered(message)
        elif op == "reopen-logs":
            for frontend in self.frontends.values():
                if frontend.request_log is not None:
                    frontend.request_log.reopen()
            log.info("log files reopened")
        elif op == "ask":
            self._send({"op": "reply", "req": message["req"], "data": self._answer(message)})
        elif op == "adopt":
            if "accepts" in message:  # one of ours, back: the newest generation refused it
                self.accepts = message["accepts"]
            self._adopt(message["conns"], fds)
            return
        elif op == "accepts":
            self.accepts = message["accepts"]  # a newer generation: what it takes over
            self._move_again()
        elif op == "ticket-keys":
            if self.ticket_keys is not None:
                self.ticket_keys.set([bytes.fromhex(key) for key in message["keys"]])
        elif op == "soft-stop":
            self.soft_stop(message.get("handover", False), message.get("accepts"))
        elif op == "stop":
            self._finish()

    def _answer(self, message: dict[str, Any]) -> Any:
        """What the master asks for an operator's command (see lb.runtime)."""
        what = message["what"]
        if what == "connections":
            return sum(len(f.sessions) for f in self.frontends.values())
        if what == "staying":
            return self._staying()
        if what == "check-limits":
            for frontend in self.frontends.values():
                frontend.check_limits()
            return True
        if what == "map-edit":
            shared = self.maps.get(message["name"])
            return maps.edit(shared, message) if shared is not None else False
        if what == "ssl-cert":
            return self._commit_cert(tls.decode_certs(message["certs"]))
        if what == "set-var":
            self.variables[message["name"]] = message["value"]
            return True
        if what == "sessions":
            return [
                session.describe()
                for frontend in self.frontends.values()
                for session in frontend.sessions
            ]
        if what == "shutdown-sessions":
            victims = [
                session
                for frontend in self.frontends.values()
                for session in frontend.sessions
                if session.server is not None
                and (session.server.backend.name, session.server.name)
                == (message["be"], message["srv"])
            ]
            for session in victims:
                session.kill()
            return len(victims)
        return None

    def _commit_cert(self, certs: dict[str, Any]) -> int:
        """`commit ssl cert`: new handshakes use these certificates; how many binds do."""
        return sum(
            contexts.replace(cert)
            for frontend in self.frontends.values()
            for contexts in frontend.tls.values()
            for cert in certs.values()
        )

    def _on_sigusr1(self) -> None:
        if os.getppid() != self.master_pid:
            self._master_gone()
        else:
            self.soft_stop()

    def _master_gone(self) -> None:
        """Nobody holds the listening sockets for us any more. Clients that connected
        just before the master died are still arriving: accept them for ORPHAN_ACCEPT,
        then close our listening sockets so that a new pylb can bind the port, finish
        what is in flight, and exit (after `hard-stop-after` at the latest, or
        ORPHAN_GRACE without one)."""
        if self.master_gone:
            return
        self.master_gone = True
        self.handing_over = False  # nobody to hand connections to: finish them here
        log.warning("master is gone: closing the listeners, finishing what is in flight")
        self.queue.master_gone()  # requests waiting for a slot go on without one
        self.master_link.gone()
        loop = asyncio.get_running_loop()
        grace = self.config.global_.hard_stop_after or ORPHAN_GRACE
        loop.call_later(grace, self._hard_stop)
        loop.call_later(ORPHAN_ACCEPT, self._orphan_close)

    def _orphan_close(self) -> None:
        for frontend in self.frontends.values():
            frontend.close_listeners()
        self.soft_stop()

    # -- handing connections over to the next generation ---------------------------------

    def hand_over(
        self,
        frontend: str,
        transport: asyncio.BaseTransport,
        data: bytes,
        ticket: list[int] | None = None,
    ) -> None:
        """Give a client connection, and bytes already read from it, to the master for the
        next generation. The connection itself stays open: only our handle on it goes."""
        fd = take_socket(transport).detach()
        conn = {"fe": frontend, "data": base64.b64encode(data).decode(), "ticket": ticket}
        self.send_away(conn, [fd])

    def send_away(self, conn: dict[str, Any], fds: list[int]) -> None:
        """Give `conn` (its descriptors `fds`: ours until sent) to the master for the next
        generation; sent in batches, once per turn of the loop."""
        if not self._leaving:
            asyncio.get_running_loop().call_soon(self._send_leaving)
        self._leaving.append((conn, fds))
        kind = conn["tunnel"].get("kind", "tunnel") if "tunnel" in conn else "connection"
        self.handed[kind] = self.handed.get(kind, 0) + 1

    def _send_leaving(self) -> None:
        leaving, self._leaving = self._leaving, []
        batch: list[tuple[dict[str, Any], list[int]]] = []
        count = 0
        for conn, fds in leaving:
            if count + len(fds) > control.MAX_FDS - 1:  # one more for a bulk message
                self._send_batch(batch)
                batch, count = [], 0
            batch.append((conn, fds))
            count += len(fds)
        if batch:
            self._send_batch(batch)
        self.maybe_exit()

    def _send_batch(self, batch: list[tuple[dict[str, Any], list[int]]]) -> None:
        conns = [conn for conn, _ in batch]
        fds = [fd for _, conn_fds in batch for fd in conn_fds]
        channel = self.channel
        if channel is not None and not channel.closed:
            channel.send({"op": "handover", "conns": conns}, fds)
        if channel is None or channel.closed:  # no master to pass them on: ours again
            self._adopt(conns, fds)
            return
        for fd in fds:
            os.close(fd)  # in flight now: not ours

    def _adopt(self, conns: list[dict[str, Any]], fds: list[int]) -> None:
        """Connections an older generation handed over: served here from now on."""
        loop = asyncio.get_running_loop()
        position = 0
        for conn in conns:
            count = conn.get("fds", 1)
            mine, position = fds[position : position + count], position + count
            frontend = self.frontends.get(conn["fe"])
            if frontend is None:
                for fd in mine:
                    os.close(fd)
                continue
            if "tunnel" in conn:
                frontend.adopt_tunnel(conn["tunnel"], mine)
                continue
            loop.create_task(frontend.adopt(
                socket.socket(fileno=mine[0]), base64.b64decode(conn["data"]), conn.get("ticket")
            ))

    def _move_again(self) -> None:
        """Offer the tunnels and answers that stayed to the newest generation."""
        if self.handing_over:
            for frontend in self.frontends.values():
                for session in list(frontend.sessions):
                    if session.stays:
                        session.stays = ""
                        session.close_if_idle()

    def _staying(self) -> str:
        """Why this worker is still alive, for `show proc` ("" when it is not stopping)."""
        if not self.stopping:
            return ""
        reasons: dict[str, int] = {}
        for frontend in self.frontends.values():
            for session in frontend.sessions:
                why = session.stays or (
                    "tunnel" if session.tunnel is not None else "request in flight"
                )
                reasons[why] = reasons.get(why, 0) + 1
            handshakes = frontend.handshaking()
            if handshakes:
                reasons["TLS handshake"] = reasons.get("TLS handshake", 0) + handshakes
        return ", ".join(f"{count} x {why}" for why, count in sorted(reasons.items()))

    def soft_stop(self, hand_over: bool = False, accepts: handover.Accepts | None = None) -> None:
        """Stop accepting, finish what is in flight, then exit. With `hand_over`, a new
        generation is up: idle connections and tunnels (those that `accepts` allows, see
        lb.handover) go to it instead of staying here."""
        if self.stopping:
            return
        self.stopping = True
        self.handing_over = hand_over
        self.accepts = accepts
        for frontend in self.frontends.values():
            frontend.soft_stop()
        hard_stop = self.config.global_.hard_stop_after
        if hard_stop:
            asyncio.get_running_loop().call_later(hard_stop, self._hard_stop)
        self.maybe_exit()

    def _hard_stop(self) -> None:
        left = sum(len(f.sessions) for f in self.frontends.values())
        log.warning("hard-stop-after expired: closing %d connections", left)
        self._finish()

    def maybe_exit(self) -> None:
        """Exit once stopping with nothing left, after a short grace: connections the
        kernel handed us just before we stopped accepting may still be on their way. TLS
        handshakes under way are waited for; one that fails ends without telling us, so
        then we look again a little later."""
        if self._exit_check is not None or not self.stopping:
            return
        if self._idle():
            delay = EXIT_GRACE
        elif self._idle(but_handshakes=True):
            delay = HANDSHAKE_RECHECK
        else:
            return
        self._exit_check = asyncio.get_running_loop().call_later(delay, self._exit_if_idle)

    def _idle(self, but_handshakes: bool = False) -> bool:
        """Stopping, with nothing left: no connection (TLS handshakes included, unless
        `but_handshakes`), none waiting to be handed over, and every handover message
        sent (those waiting hold the only copies of their connections: exiting would
        close them)."""
        channel = self.channel
        return (
            self.stopping and not self._leaving
            and not (channel is not None and not channel.closed and channel.pending)
            and not any(f.sessions for f in self.frontends.values())
            and (but_handshakes or not any(f.handshaking() for f in self.frontends.values()))
        )

    def _exit_if_idle(self) -> None:
        self._exit_check = None
        if self._idle():
            self._finish()
        else:
            self.maybe_exit()

    def _finish(self) -> None:
        if self._done is not None and not self._done.done():
            if self.handed:
                log.info("handed over to the next generation: %s", ", ".join(
                    f"{count} {kind}{'s' if count > 1 else ''}"
                    for kind, count in sorted(self.handed.items())))
            self._done.set_result(None)


def _expire(cfg: config.Config, table: str) -> float | None:
    """The expiry the configuration gives table `table` (named after its proxy)."""
    backend = cfg.backends.get(table)
    if backend is not None and backend.stick_table is not None:
        return backend.stick_table.expire
    frontend = cfg.frontends.get(table)
    settings = frontend.stick_table if frontend is not None else None
    return settings.expire if settings is not None else None


def _die_with_master(master: int) -> None:
    """Have the kernel send SIGUSR1 when the master dies, whatever kills it; if it died
    before this, exit now: its sockets are nobody's to serve."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGUSR1), 0, 0, 0)
    if os.getppid() != master:
        sys.exit(1)


def _standard_streams_open() -> None:
    """Descriptors 0, 1 and 2 open (on /dev/null if they were not), so that those the
    master sends cannot land there: a stray print would write into them."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    channel = socket.socket(fileno=int(argv[0]))
    _standard_streams_open()
    # Ctrl-C in a terminal reaches the whole process group: the master decides for us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGWINCH, signal.SIG_IGN)  # the master tells us, once
    hello, fds = control.receive(channel)
    if hello is None:
        return 1
    _die_with_master(hello.get("master", os.getppid()))
    logsetup.setup(hello.get("log", "stderr"), hello.get("log_level", logging.INFO))
    worker = Worker(channel, hello, fds)
    # Everything is open: give up what a process that reads clients' bytes must not have
    g = worker.config.global_
    if g.chroot is not None:
        worker.resolve_servers()
    privileges.drop_worker(privileges.identity(g.user, g.group), g.chroot)
    # What exists now (code, configuration) lives as long as the worker: keep it out of
    # the collector's way; requests allocate much and rarely make cycles.
    gc.freeze()
    gc.set_threshold(20000, 50, 100)
    logsetup.set_role(worker.name)
    setproctitle.setproctitle(
        f"pylb: worker {worker.index}/{worker.count} [gen {worker.generation}]"
    )
    uvloop.run(worker.run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
