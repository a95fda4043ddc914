"""The stats socket: a UNIX stream socket served by the master.

One command line per connection (commands joined by `;`), answered, then closed; or, after
`prompt`, an interactive session where every answer ends with the prompt `> `, until
`quit`. A client that stays silent past the timeout, or sends a line longer than
MAX_LINE, is disconnected: no client can hold the master up.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from typing import TYPE_CHECKING

from lb import config, maps, privileges
from lb.log import log
from lb.runtime import commands, sslcert

if TYPE_CHECKING:
    from lb.master import Master

MAX_LINE = 16384
PROMPT = "> "


class StatsSocket:
    def __init__(self, cfg: config.StatsSocket, master: Master) -> None:
        self.cfg = cfg
        self.master = master
        self.path = os.path.abspath(cfg.path)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen on the socket's path (a stale socket file left there is replaced)."""
        if os.path.exists(self.path) and stat.S_ISSOCK(os.stat(self.path).st_mode):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(
            self._serve, self.path, limit=MAX_LINE
        )
        self._inode = os.stat(self.path).st_ino
        os.chmod(self.path, self.cfg.mode)
        if self.cfg.user or self.cfg.group:
            uid = privileges.uid_of(self.cfg.user) if self.cfg.user else -1
            gid = privileges.gid_of(self.cfg.group) if self.cfg.group else -1
            os.chown(self.path, uid, gid)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            try:
                if os.stat(self.path).st_ino == self._inode:  # not a newer pylb's socket
                    os.unlink(self.path)
            except OSError:
                pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = commands.Session(commands.LEVELS[self.cfg.level], self.cfg.timeout)
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), session.timeout)
                except (asyncio.LimitOverrunError, ValueError):
                    writer.write(b"Command line too long.\n")
                    break
                if not line:
                    break
                if line.startswith(b"_"):  # a newer pylb taking over (lb.takeover)
                    await self._takeover(line.decode().strip(), session, writer)
                    return
                text = line.decode("utf-8", "replace")
                if text.rstrip().endswith("<<"):  # a payload follows, up to an empty line
                    text = text.rstrip()[:-2]
                    session.payload = await self._payload(reader, session)
                try:
                    answer, keep_going = await self._run_line(text, session)
                finally:
                    session.payload = None
                writer.write(answer.encode())
                await asyncio.wait_for(writer.drain(), session.timeout)
                if not keep_going:
                    break
        except (TimeoutError, ConnectionError):
            pass
        except Exception:  # a bug in a command must not take the master down
            log.exception("stats socket: command failed")
        finally:
            writer.close()

    async def _payload(self, reader: asyncio.StreamReader, session: commands.Session) -> str:
        """The lines after a command ending in `<<`, up to an empty line (or the end)."""
        lines: list[bytes] = []
        size = 0
        while True:
            line = await asyncio.wait_for(reader.readline(), session.timeout)
            if not line or not line.strip():
                return b"".join(lines).decode("utf-8", "replace")
            size += len(line)
            if size <= sslcert.MAX_PAYLOAD + MAX_LINE:  # beyond: read on, keep no more
                lines.append(line)

    async def _takeover(
        self, command: str, session: commands.Session, writer: asyncio.StreamWriter
    ) -> None:
        # The transport's socket object cannot carry descriptors: use a real one.
        raw = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
        # As in HAProxy, handing out descriptors needs `expose-fd listeners`; the state
        # and the handover (connections, slots) need level admin too.
        if not self.cfg.expose_fd or (command != "_getsocks" and session.level != commands.ADMIN):
            needs = "expose-fd listeners" + (" and level admin" if command != "_getsocks" else "")
            writer.write(json.dumps({"error": f"Permission denied: {command} needs {needs}"})
                         .encode() + b"\n")
            await writer.drain()
            raw.close()
            return
        master = self.master
        if command == "_getsocks":
            names, tables = master.tables.descriptors()
            edits, indexes = maps.descriptors(master.maps)
            data = json.dumps({
                "listeners": [[lst.frontend, lst.address] for lst in master.listeners],
                "tables": names,
                "maps": list(edits),
            }).encode() + b"\n"
            raw.setblocking(True)
            listening = [lst.sock.fileno() for lst in master.listeners]
            socket.send_fds(raw, [data], listening + tables + indexes)
            raw.close()
            log.info("listening sockets handed to a new process")
        elif command == "_getstate":
            writer.write(json.dumps(master.snapshot()).encode() + b"\n")
            await writer.drain()
        elif command == "_handover":
            # From here on the new process keeps the slot counts: tell it ours and hand
            # over in one go (no await in between, so no slot changes hands unseen).
            master.add_heir(raw, {"ok": True})
            return  # kept: slots and idle connections go there
        else:
            writer.write(b'{"error": "unknown"}\n')
            await writer.drain()
        raw.close()

    async def _run_line(self, line: str, session: commands.Session) -> tuple[str, bool]:
        """The answer to one line, and whether the connection stays open."""
        out = []
        for command in _split(line):
            if command == "prompt":
                session.interactive = not session.interactive
                continue
            if command == "quit":
                return "".join(out), False
            out.append(await commands.execute(self.master, command, session))
        if session.interactive:
            out.append(PROMPT if out else "\n" + PROMPT)
            return "".join(out), True
        return "".join(out), False


def _split(line: str) -> list[str]:
    """Commands of one line: `;` separates them, `\\;` is a literal semicolon."""
    parts, current, escaped = [], [], False
    for char in line.strip():
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ";":
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    parts.append("".join(current).strip())
    return [p for p in parts if p]
