"""The control channel between the master and one worker.

A SOCK_SEQPACKET socketpair: one JSON object per packet, descriptors riding along with
SCM_RIGHTS. Packets keep message boundaries, so neither side needs framing of its own.
A packet is limited by the socket's buffer, so a larger message (a big state, a long
list) travels in a memfd: the packet says `{"op": "bulk"}` and carries the memfd as its
first descriptor. No message is too big; small ones, the usual, cost no extra call.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from lb.log import log

MAX_PACKET = 1 << 20
MAX_FDS = 253  # SCM_MAX_FD
INLINE_MAX = 64 * 1024  # larger messages travel in a memfd
OUTBOX_MAX = 100_000  # messages waiting for a peer that does not read
STALL_TIMEOUT = 30.0  # seconds a peer may take nothing while messages wait for it


def pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def encode(message: dict[str, Any], fds: list[int]) -> tuple[bytes, list[int], int | None]:
    """The packet and descriptors that carry `message`, and the memfd made for a large
    one (the caller closes it once sent)."""
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) <= INLINE_MAX:
        return data, fds, None
    bulk = os.memfd_create("pylb-message", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(bulk, view):]
    return b'{"op":"bulk","size":%d}' % len(data), [bulk, *fds], bulk


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data, all_fds, bulk = encode(message, fds or [])
    try:
        if all_fds:
            socket.send_fds(sock, [data], all_fds)
        else:
            sock.send(data)
    finally:
        if bulk is not None:
            os.close(bulk)


def receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the descriptors that came with it; (None, []) at end of stream."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_PACKET, MAX_FDS)
    fds = list(fds)
    if not data:
        for fd in fds:
            socket.close(fd)
        return None, []
    try:
        message = json.loads(data)
        if isinstance(message, dict) and message.get("op") == "bulk" and fds:
            bulk = fds.pop(0)
            try:
                message = json.loads(_read_all(bulk, message["size"]))
            finally:
                os.close(bulk)
        if not isinstance(message, dict):
            raise ValueError("not a JSON object")
    except (ValueError, KeyError, TypeError) as err:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"malformed message: {err}") from None
    return message, fds


def _read_all(fd: int, size: int) -> bytes:
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, min(size - offset, 1 << 24), offset)
        if not chunk:
            raise ValueError("bulk message shorter than announced")
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


class Channel:
    """One end of a control channel on the running event loop: messages in are handed to
    `on_message`; messages out that the socket cannot take yet wait, in order, in an
    outbox flushed when it is writable (a grant or a stop must never be dropped)."""

    def __init__(
        self,
        sock: socket.socket,
        on_message: Callable[[dict[str, Any], list[int]], None],
        on_close: Callable[[], None],
    ) -> None:
        self.sock = sock
        self._on_message = on_message
        self._on_close = on_close
        self._outbox: deque[tuple[bytes, list[int]]] = deque()
        self._progress = 0.0  # when the peer last took a message we had queued
        self.closed = False
        self.on_drained: Callable[[], None] | None = None  # called when the outbox empties
        sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock, self._readable)

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        """Send, or queue; the caller may close its `fds` as soon as this returns (queued
        descriptors are duplicates, closed once sent)."""
        if self.closed:
            return
        data, all_fds, bulk = encode(message, fds or [])
        try:
            if not self._outbox and self._try_send(data, all_fds):
                return
            if self.closed:
                return
            if not self._outbox:
                self._progress = time.monotonic()
                self._loop.add_writer(self.sock, self._writable)
            elif len(self._outbox) >= OUTBOX_MAX or (
                time.monotonic() - self._progress > STALL_TIMEOUT
            ):
                log.warning("control channel: the other end reads nothing (%d messages "
                            "waiting): closing it", len(self._outbox))
                self.close()
                self._on_close()
                return
            self._outbox.append((data, [os.dup(fd) for fd in all_fds]))
        finally:
            if bulk is not None:
                os.close(bulk)

    def _try_send(self, data: bytes, fds: list[int]) -> bool:
        try:
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.send(data)
        except BlockingIOError:
            return False
        except OSError:
            self.close()
        return True

    def _writable(self) -> None:
        while self._outbox:
            data, fds = self._outbox[0]
            if not self._try_send(data, fds):
                return
            for fd in fds:
                os.close(fd)
            self._progress = time.monotonic()
            if self._outbox:
                self._outbox.popleft()
        if not self.closed:
            self._loop.remove_writer(self.sock)
            if self.on_drained is not None:
                self.on_drained()

    @property
    def pending(self) -> int:
        """Messages waiting for the peer to take them (with their descriptors: a process
        must not exit before they are sent)."""
        return len(self._outbox)

    def drain(self) -> None:
        """Take every message the peer sent and we have not read yet (a worker that
        exited may have left some: connections it handed over)."""
        while not self.closed:
            try:
                message, fds = receive(self.sock)
            except BlockingIOError:
                return
            except OSError:
                return
            except ValueError as err:
                log.warning("control channel: a malformed message was dropped (%s)", err)
                continue
            if message is None:
                return
            self._on_message(message, fds)

    def _readable(self) -> None:
        try:
            message, fds = receive(self.sock)
        except BlockingIOError:
            return
        except OSError:
            message, fds = None, []
        except ValueError as err:  # not JSON, a short bulk message: that one is dropped
            log.warning("control channel: a malformed message was dropped (%s)", err)
            return
        if message is None:
            self.close()
            self._on_close()
            return
        self._on_message(message, fds)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for _, fds in self._outbox:
            for fd in fds:
                os.close(fd)
        self._outbox.clear()
        self._loop.remove_reader(self.sock)
        self._loop.remove_writer(self.sock)
        self.sock.close()
