"""A frontend as one worker runs it: its listeners, its sessions, its counters."""

from __future__ import annotations

import asyncio
import functools
import socket
from typing import TYPE_CHECKING, Any

from lb import config
from lb.backend import Backend
from lb.httpproxy import HttpSession
from lb.tcpproxy import TcpSession

if TYPE_CHECKING:
    from lb.worker import Worker


class Frontend:
    def __init__(
        self, cfg: config.Frontend, backends: dict[str, Backend], worker: Worker
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.worker = worker
        self.timeouts = cfg.timeouts
        self.max_head = worker.config.global_.max_header_size
        self.default_backend = backends.get(cfg.default_backend or "")
        self.sessions: set[Any] = set()
        self.cur_conns = 0
        self.total = 0
        self.stopping = False
        self.sockets: list[socket.socket] = []
        self._servers: list[asyncio.Server] = []
        session = HttpSession if cfg.mode == "http" else TcpSession
        self._factory = functools.partial(session, self)

    async def start(self) -> None:
        """Accept on every listening socket handed over by the master."""
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            # uvloop takes ownership of the socket it serves: give it a duplicate, so this
            # worker can stop accepting and start again on the same listening socket.
            server = await loop.create_server(
                self._factory, sock=sock.dup(), backlog=self.cfg.backlog
            )
            self._servers.append(server)

    def stop_accepting(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()

    def soft_stop(self) -> None:
        self.stopping = True
        self.stop_accepting()
        for session in list(self.sessions):
            session.close_if_idle()

    def opened(self, session: Any) -> None:
        self.sessions.add(session)
        self.cur_conns += 1
        self.total += 1

    def closed(self, session: Any) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.cur_conns -= 1
            if self.stopping:
                self.worker.maybe_exit()
