"""Stick-table commands of the runtime API: show, clear and set table, as in HAProxy.

    show table [<table> [data.<type> <op> <value>] | [key <key>]]
    clear table <table> [data.<type> <op> <value>] | [key <key>]
    set table <table> key <key> [data.<type> <value>]*

Each works directly on the table's shared memory, so a change is seen by every worker's
next request. Functions raise ValueError with the line the operator gets back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from lb import config
from lb.sticktable import Entry, StickTable, now_ms
from lb.tables import Tables

OPERATORS: dict[str, Callable[[int, int], bool]] = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
}
# The order HAProxy prints data in.
_PRINT_ORDER = ("gpc0", "gpc0_rate", "conn_cnt", "conn_rate", "conn_cur", "http_req_cnt",
                "http_req_rate", "http_err_cnt", "http_err_rate")
NO_TABLE = "No such table."


def _table(tables: Tables, name: str) -> StickTable:
    table = tables.get(name)
    if table is None:
        raise ValueError(NO_TABLE)
    return table


def _servers(cfg: config.Config, table: str) -> list[str]:
    backend = cfg.backends.get(table)
    return [s.name for s in backend.servers] if backend is not None else []


class _Filter:
    """`key <key>` or `data.<type> <op> <value>`, or nothing (every entry)."""

    def __init__(self, table: StickTable, args: list[str], usage: str) -> None:
        self.key: bytes | None = None
        self.test: tuple[str, Callable[[int, int], bool], int] | None = None
        if not args:
            return
        if args[0] == "key" and len(args) == 2:
            self.key = table.key_of(args[1])
            if self.key is None:
                raise ValueError(f"Invalid key for table of type {table.type}.")
            return
        if len(args) == 3 and args[0].startswith("data."):
            data, op, value = args[0][5:], args[1], args[2]
            if data not in table.stored:
                raise ValueError(f"Data type {data!r} is not stored in this table.")
            if op not in OPERATORS:
                raise ValueError("Require an operator among \"eq\", \"ne\", \"le\", \"ge\", "
                                 "\"lt\", \"gt\".")
            if not value.lstrip("-").isdigit():
                raise ValueError("Require a valid integer value to compare against.")
            self.test = (data, OPERATORS[op], int(value))
            return
        raise ValueError(usage)

    def entries(self, table: StickTable) -> Iterator[Entry]:
        now = now_ms()
        for entry in table.entries():
            if self.key is not None and entry.key != self.key:
                continue
            if self.test is not None:
                data, compare, value = self.test
                if not compare(table.describe(entry, now)[data], value):
                    continue
            yield entry


def _line(table: StickTable, entry: Entry, servers: list[str], now: int) -> str:
    ident = hash((table.name, entry.key)) & 0xFFFFFFFFFFFF  # HAProxy prints an address
    parts = [f"0x{ident:x}: key={table.key_text(entry.key)}", "use=0"]
    expires = table.expires_in(entry, now)
    if expires is not None:
        parts.append(f"exp={max(expires, 0)}")
    server = table.server_name(entry.server)
    if server is not None:
        position = servers.index(server) + 1 if server in servers else 0
        parts.append(f"server_id={position}")
    values = table.describe(entry, now)
    for name in _PRINT_ORDER:
        if name in values:
            period = table.periods.get(name)
            parts.append(f"{name}({period})={values[name]}" if period else f"{name}={values[name]}")
    if server is not None:
        parts.append(f"server_key={server}")
    return " ".join(parts)


def show(tables: Tables, cfg: config.Config, args: list[str]) -> str:
    usage = "Usage: show table [<table> [data.<type> <op> <value>] | [key <key>]]"
    names = [args[0]] if args else list(tables)
    lines = []
    for name in names:
        table = _table(tables, name)
        chosen = _Filter(table, args[1:], usage) if args else None
        lines.append(f"# table: {name}, type: {table.type}, size:{table.limit}, "
                     f"used:{table.recount()}")
        if chosen is None:
            continue
        now, servers = now_ms(), _servers(cfg, name)
        lines.extend(_line(table, entry, servers, now) for entry in chosen.entries(table))
    return "\n".join(lines) + "\n\n"


def clear(tables: Tables, args: list[str]) -> str:
    usage = "Usage: clear table <table> [data.<type> <op> <value>] | [key <key>]"
    if not args:
        raise ValueError(usage)
    table = _table(tables, args[0])
    if len(args) == 1:
        table.clear()
        return "\n"
    chosen = _Filter(table, args[1:], usage)
    for key in [entry.key for entry in chosen.entries(table)]:
        table.remove(key)
    return "\n"


def set_(tables: Tables, cfg: config.Config, args: list[str]) -> str:
    usage = "Usage: set table <table> key <key> [data.<type> <value>]*"
    if len(args) < 3 or args[1] != "key" or len(args) % 2 == 0:
        raise ValueError(usage)
    table = _table(tables, args[0])
    key = table.key_of(args[2])
    if key is None:
        raise ValueError(f"Invalid key for table of type {table.type}.")
    server: str | None = None
    sets: dict[str, int] = {}
    for word, value in zip(args[3::2], args[4::2], strict=True):
        data = word[5:] if word.startswith("data.") else ""
        if not value.lstrip("-").isdigit() and data != "server_key":
            raise ValueError(f"Invalid value {value!r} for {word}: expected an integer.")
        if data == "server_id":
            servers = _servers(cfg, table.name)
            if not 1 <= int(value) <= len(servers):
                raise ValueError(f"No server with id {value} in backend {table.name}.")
            server = servers[int(value) - 1]
        elif data == "server_key":
            if value not in _servers(cfg, table.name):
                raise ValueError(f"No server {value!r} in backend {table.name}.")
            server = value
        elif data in table.stored:
            sets[data] = int(value)
        else:
            raise ValueError(f"Data type {data!r} is not stored in this table.")
    table.set_data(key, server, sets)
    return "\n"
