"""Taking over from a running pylb: `pylb -f CFG -sf PID` (or `-st`, or `-x SOCKET`).

The new process asks the old master, over its stats socket, for
- `_getsocks`: every listening socket, every stick table's and every map's shared memory
  (by SCM_RIGHTS), so binds that remain keep their socket and its kernel backlog (no
  connection waiting there is lost), and tables and maps come without a copy;
- `_getstate`: the runtime state (servers, frontends, variables, map edits, health
  counters), applied by name as an in-place reload does;
- `_handover`: a connection kept open both ways. The old master sends on it the idle
  client connections its workers let go once told to stop; and from then on it asks the
  new master for server slots on its workers' behalf (`slot` messages both ways), so a
  server's `maxconn` counts both processes together. The new process says `ready` once
  it reads the connection; only then does the old one send the slots its workers hold and
  forward their requests (a `_handover` client that stalls never gets the slots), and if
  the new process goes away the old one takes its slots back.
The old side of these commands is in lb.runtime.server.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lb import config, tables
from lb.counters import WORDS
from lb.log import log
from lb.mapstore import MapIndex
from lb.shared import Layout
from lb.sock import Listener
from lb.sticktable import StickTable
from lb.tally import GONE, Totals

TIMEOUT = 5.0


@dataclass
class Inheritance:
    """What the old process handed over."""

    listeners: list[Listener] = field(default_factory=list)
    # The tables' and maps' shared memory, as descriptors: opened (mapped) only by the
    # master, after daemonizing. An mmap keeps a duplicate descriptor of its own, which
    # daemonizing would close under it, and its later close would hit a reused number.
    table_fds: dict[str, int] = field(default_factory=dict)
    map_fds: dict[str, int] = field(default_factory=dict)
    map_edits: dict[str, dict[str, Any]] = field(default_factory=dict)
    state: dict[str, Any] | None = None
    heir: socket.socket | None = None  # where handed-over connections will arrive
    held: dict[str, list[list[Any]]] = field(default_factory=dict)  # old workers' slots
    early: bytes = b""  # handover messages read along with the answer

    def descriptors(self) -> list[int]:
        """What must stay open through daemonizing (listeners aside): the handover
        connection, and the tables' and maps' shared memory."""
        kept = [*self.table_fds.values(), *self.map_fds.values()]
        return kept + ([self.heir.fileno()] if self.heir is not None else [])

    def tables(self) -> dict[str, StickTable]:
        """The stick tables handed over, mapped now (master only)."""
        return tables.open_inherited(list(self.table_fds), list(self.table_fds.values()))

    def maps(self) -> dict[str, tuple[MapIndex, dict[str, Any]]]:
        """The maps' indexes handed over, mapped now, with their run-time edits."""
        out: dict[str, tuple[MapIndex, dict[str, Any]]] = {}
        for name, fd in self.map_fds.items():
            try:
                out[name] = (MapIndex.open(fd), self.map_edits.get(name, {}))
            except (ValueError, OSError):
                os.close(fd)  # not usable: the map is read from its file instead
        return out


@dataclass
class OldMemory:
    """The old generation's shared memory as lb.reload.carry_state reads it."""

    words: list[int]
    layout: Layout


def _request(path: str, command: str) -> tuple[socket.socket, bytes, list[int]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(path)
    sock.sendall(command.encode() + b"\n")
    data, fds = b"", []
    while b"\n" not in data:
        chunk, new_fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 253)
        fds.extend(new_fds)
        if not chunk:
            break
        data += chunk
    return sock, data, fds


def inherit(path: str) -> Inheritance:
    """Everything an old pylb listening on stats socket `path` can hand over. Raises
    OSError when it cannot be reached, ValueError when it refuses."""
    inheritance = Inheritance()
    sock, data, fds = _request(path, "_getsocks")
    sock.close()
    answer = json.loads(data or b"{}")
    if "listeners" not in answer:
        for fd in fds:
            socket.close(fd)
        raise ValueError(answer.get("error", data.decode(errors="replace").strip()))
    listening = len(answer["listeners"])
    for (frontend, address), fd in zip(answer["listeners"], fds[:listening], strict=True):
        inheritance.listeners.append(Listener(frontend, address, socket.socket(fileno=fd)))
    names, map_names = answer.get("tables", []), answer.get("maps", [])
    inheritance.table_fds = dict(zip(names, fds[listening : listening + len(names)], strict=True))
    inheritance.map_fds = dict(zip(map_names, fds[listening + len(names) :], strict=False))
    sock, data, _ = _request(path, "_getstate")
    sock.close()
    inheritance.state = json.loads(data)
    inheritance.map_edits = inheritance.state.get("maps", {})
    heir, data, _ = _request(path, "_handover")
    first, _, rest = data.partition(b"\n")
    answer = json.loads(first or b"{}")
    if answer.get("ok"):
        heir.settimeout(None)
        inheritance.heir = heir
        inheritance.held = answer.get("held", {})
        inheritance.early = rest  # slot requests that came right behind the answer
    else:
        heir.close()
    return inheritance


class LineWriter:
    """JSON lines (and descriptors) to the other pylb without ever blocking our loop:
    what the socket cannot take now waits, in order, and goes when it can. A peer that
    lets more than MAX_PENDING bytes pile up, or takes nothing for STALL_TIMEOUT, is
    dropped (and logged): a stalled peer must not hold up the master."""

    MAX_PENDING = 256 << 20  # tunnels carry what they buffered: up to ~1.4 MB each
    STALL_TIMEOUT = 10.0

    def __init__(self, sock: socket.socket, on_drop: Callable[[LineWriter], None]) -> None:
        self.sock = sock
        self._on_drop = on_drop
        self._pending: deque[tuple[bytes, list[int]]] = deque()  # fds: our duplicates
        self._size = 0
        self._stalled_since = 0.0
        self.closed = False
        sock.setblocking(False)
        self._loop = asyncio.get_running_loop()

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        """Send or queue; the caller keeps (and may close) its `fds`."""
        if self.closed:
            return
        data = json.dumps(message).encode() + b"\n"
        if not self._pending:
            try:
                sent = socket.send_fds(self.sock, [data], fds) if fds else self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as err:
                self.drop(f"cannot write to it ({err.strerror})")
                return
            if sent == len(data):
                return
            if sent:
                data, fds = data[sent:], None  # descriptors went with the first byte
            self._stalled_since = time.monotonic()
            self._loop.add_writer(self.sock, self._writable)
        self._pending.append((data, [os.dup(fd) for fd in fds or ()]))
        self._size += len(data)
        if self._size > self.MAX_PENDING or (
            time.monotonic() - self._stalled_since > self.STALL_TIMEOUT
        ):
            self.drop("it does not read what we send")

    @property
    def pending(self) -> int:
        """Lines not yet written."""
        return len(self._pending)

    def _writable(self) -> None:
        while self._pending:
            data, fds = self._pending[0]
            try:
                sent = socket.send_fds(self.sock, [data], fds) if fds else self.sock.send(data)
            except BlockingIOError:
                return
            except OSError as err:
                self.drop(f"cannot write to it ({err.strerror})")
                return
            self._stalled_since = time.monotonic()
            for fd in fds:
                os.close(fd)
            self._size -= sent
            if sent < len(data):
                self._pending[0] = (data[sent:], [])
                return
            self._pending.popleft()
        self._loop.remove_writer(self.sock)

    def drop(self, why: str) -> None:
        if self.closed:
            return
        log.warning("dropping the connection to the other pylb: %s", why)
        self.close()
        self._on_drop(self)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_writer(self.sock)
        for _data, fds in self._pending:
            for fd in fds:
                os.close(fd)
        self._pending.clear()


def old_memory(state: dict[str, Any]) -> tuple[OldMemory, config.Config]:
    """The old process's shared memory and configuration, from its `_getstate`."""
    old_cfg = config.loads(state["config_text"], state["config_path"])
    return OldMemory(state["words"], Layout(old_cfg)), old_cfg


def counters(state: dict[str, Any]) -> Totals:
    """The old process's traffic counters, summed, from its `_getstate` (none from a pylb
    too old to send them, or sent malformed)."""
    totals: Totals = {}
    for item in state.get("counters") or ():
        try:
            kind, name, values = item
            if kind in ("fe", "be", "srv", GONE[0]) and len(values) == WORDS:
                totals[(str(kind), str(name))] = [int(value) for value in values]
        except (TypeError, ValueError):
            continue
    return totals


class LineReader:
    """Reads a handover connection: JSON lines; the descriptors of `conns` in order
    (`fds` of them for each, one by default)."""

    def __init__(self, sock: socket.socket, early: bytes = b"") -> None:
        self.sock = sock
        self._buffer = early
        self._fds: list[int] = []

    def read(self) -> tuple[list[tuple[dict[str, Any], list[int]]], bool]:
        """Whole messages now readable, each with its descriptors, and whether the
        stream ended."""
        chunk: bytes | None
        try:
            chunk, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 16, 253)
        except BlockingIOError:
            chunk, fds = None, []  # nothing new: what is buffered may still be whole
        except OSError:
            chunk, fds = b"", []
        self._fds.extend(fds)
        self._buffer += chunk or b""
        messages: list[tuple[dict[str, Any], list[int]]] = []
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            message = json.loads(line)
            count = sum(conn.get("fds", 1) for conn in message.get("conns", ()))
            taken, self._fds = self._fds[:count], self._fds[count:]
            messages.append((message, taken))
        return messages, chunk == b""
