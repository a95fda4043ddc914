"""Listening sockets: bound by the master only, passed to workers with SCM_RIGHTS."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from lb.config import Address


@dataclass(frozen=True)
class Listener:
    """A listening socket and the frontend bind it serves."""

    frontend: str
    address: str
    sock: socket.socket


def bind(address: Address, backlog: int) -> socket.socket:
    """A listening, non-blocking TCP socket on `address`."""
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if address.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def inode(fd: int) -> int:
    """The socket's inode: the same number in every process holding that socket."""
    return os.fstat(fd).st_ino
