"""The control channel between the master and one worker.

A SOCK_SEQPACKET socketpair: one JSON object per packet, descriptors riding along with
SCM_RIGHTS. Packets keep message boundaries, so neither side needs framing of its own.
"""

from __future__ import annotations

import json
import socket
from typing import Any

MAX_PACKET = 1 << 20
MAX_FDS = 253  # SCM_MAX_FD


def pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the descriptors that came with it; (None, []) at end of stream."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_PACKET, MAX_FDS)
    if not data:
        for fd in fds:
            socket.close(fd)
        return None, []
    return json.loads(data), list(fds)
