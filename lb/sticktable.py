"""Stick tables: which server a client key (address, cookie, header) sticks to.

The master owns every table; each worker keeps a replica for lookups on its request path.
A worker that learns an entry tells the master, which stores it (evicting the oldest entry
of a full table) and sends it to every worker: an entry learned through one worker is used
by all the others one control-channel hop later, well under a millisecond on one machine.

Expiry times are CLOCK_MONOTONIC seconds, the same clock in every process.

Messages: (worker -> master) stick {be, key, srv}; (master -> workers) stick {be, set:
[[key, srv, expires]...], del: [key...]}; `clear` drops a whole table or one key.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from lb import config

Entry = tuple[str, float]  # server name, expiry (monotonic seconds; inf: never)


def _expiry(table: config.StickTable) -> float:
    return time.monotonic() + table.expire if table.expire else math.inf


class Replica:
    """A worker's copy of one backend's table."""

    def __init__(
        self, backend: str, table: config.StickTable, send: Callable[[dict[str, Any]], None]
    ) -> None:
        self.backend = backend
        self.table = table
        self._send = send
        self.entries: dict[str, Entry] = {}

    def lookup(self, key: str) -> str | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            del self.entries[key]
            return None
        return entry[0]

    def learn(self, key: str, server: str) -> None:
        """Record that `key` goes to `server`, telling the master when that is news or
        when the entry's life is half spent (so busy keys do not expire)."""
        entry = self.entries.get(key)
        expire = self.table.expire
        if entry is not None and entry[0] == server and (
            not expire or entry[1] - time.monotonic() > expire / 2
        ):
            return
        self.entries[key] = (server, _expiry(self.table))
        self._send({"op": "stick", "be": self.backend, "key": key, "srv": server})

    def apply(self, message: dict[str, Any]) -> None:
        for key in message.get("del", ()):
            self.entries.pop(key, None)
        for key, server, expires in message.get("set", ()):
            self.entries[key] = (server, math.inf if expires is None else expires)
        if message.get("clear"):
            self.entries.clear()


class Tables:
    """The master's tables, one per backend with a `stick-table`."""

    def __init__(self, cfg: config.Config) -> None:
        self.configs = {
            name: backend.stick_table
            for name, backend in cfg.backends.items()
            if backend.stick_table is not None
        }
        self.tables: dict[str, OrderedDict[str, Entry]] = {
            name: OrderedDict() for name in self.configs
        }

    def reconfigure(self, cfg: config.Config) -> None:
        """A reload: keep the entries of backends that still have a table."""
        old = self.tables
        self.configs = {
            name: backend.stick_table
            for name, backend in cfg.backends.items()
            if backend.stick_table is not None
        }
        self.tables = {name: old.get(name, OrderedDict()) for name in self.configs}
        for name, table in self.tables.items():
            while len(table) > self.configs[name].size:
                table.popitem(last=False)

    def learn(self, backend: str, key: str, server: str) -> dict[str, Any] | None:
        """Store an entry; the message to send every worker, or None if not a table."""
        table = self.tables.get(backend)
        if table is None:
            return None
        expires = _expiry(self.configs[backend])
        table[key] = (server, expires)
        table.move_to_end(key)
        evicted = []
        while len(table) > self.configs[backend].size:
            evicted.append(table.popitem(last=False)[0])  # the oldest goes
        return {
            "op": "stick",
            "be": backend,
            "set": [[key, server, None if math.isinf(expires) else expires]],
            "del": evicted,
        }

    def load(self, snapshot: dict[str, list[list[Any]]], cfg: config.Config) -> None:
        """Entries from another pylb's `snapshot` (taking over from it)."""
        for backend, entries in snapshot.items():
            table = self.tables.get(backend)
            if table is None:
                continue
            for key, server, expires in entries:
                table[key] = (server, math.inf if expires is None else expires)
        self.reconfigure(cfg)

    def purge(self) -> None:
        """Drop expired entries (replicas expire theirs on lookup)."""
        now = time.monotonic()
        for table in self.tables.values():
            for key in [k for k, (_, expires) in table.items() if expires <= now]:
                del table[key]

    def clear(self, backend: str, key: str | None = None) -> dict[str, Any] | None:
        table = self.tables.get(backend)
        if table is None:
            return None
        if key is None:
            table.clear()
            return {"op": "stick", "be": backend, "clear": True}
        table.pop(key, None)
        return {"op": "stick", "be": backend, "del": [key]}

    def snapshot(self) -> dict[str, list[list[Any]]]:
        """Every live entry, for a worker that starts now."""
        self.purge()
        return {
            backend: [
                [key, server, None if math.isinf(expires) else expires]
                for key, (server, expires) in table.items()
            ]
            for backend, table in self.tables.items()
        }
