"""Taking over from a running pylb: `pylb -f CFG -sf PID` (or `-st`, or `-x SOCKET`).

The new process asks the old master, over its stats socket, for
- `_getsocks`: every listening socket (by SCM_RIGHTS), so binds that remain keep their
  socket and its kernel backlog: no connection waiting there is lost;
- `_getstate`: the runtime state (servers, frontends, stick tables, variables, maps,
  health counters), applied by name as an in-place reload does;
- `_handover`: a connection kept open, on which the old master sends the idle client
  connections its workers let go once the new process has told it to stop.
The old side of these commands is in lb.runtime.server.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from typing import Any

from lb import config
from lb.shared import Layout
from lb.sock import Listener

TIMEOUT = 5.0


@dataclass
class Inheritance:
    """What the old process handed over."""

    listeners: list[Listener] = field(default_factory=list)
    state: dict[str, Any] | None = None
    heir: socket.socket | None = None  # where handed-over connections will arrive


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
    while not data.endswith(b"\n"):
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
    for (frontend, address), fd in zip(answer["listeners"], fds, strict=True):
        inheritance.listeners.append(Listener(frontend, address, socket.socket(fileno=fd)))
    sock, data, _ = _request(path, "_getstate")
    sock.close()
    inheritance.state = json.loads(data)
    heir, data, _ = _request(path, "_handover")
    if data.strip() == b"ok":
        heir.settimeout(None)
        inheritance.heir = heir
    else:
        heir.close()
    return inheritance


def old_memory(state: dict[str, Any]) -> tuple[OldMemory, config.Config]:
    """The old process's shared memory and configuration, from its `_getstate`."""
    old_cfg = config.loads(state["config_text"], state["config_path"])
    return OldMemory(state["words"], Layout(old_cfg)), old_cfg


class HeirReader:
    """Reads the connections an old master hands over: JSON lines, descriptors in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""
        self._fds: list[int] = []

    def read(self) -> tuple[list[tuple[dict[str, Any], int]], bool]:
        """Whole messages' connections now readable, and whether the stream ended."""
        try:
            chunk, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 16, 253)
        except BlockingIOError:
            return [], False
        except OSError:
            chunk, fds = b"", []
        self._fds.extend(fds)
        self._buffer += chunk
        conns: list[tuple[dict[str, Any], int]] = []
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            for conn in json.loads(line)["conns"]:
                conns.append((conn, self._fds.pop(0)))
        return conns, not chunk
