"""The schema tables: one per section. Adding a key is one line here (plus its dataclass
attribute in model.py and its line in docs/configuration.md)."""

from __future__ import annotations

import os

from .fields import Field, Schema, named, partial, record
from .model import Address, Cookie, HttpCheck, StatsSocket, StickTable
from .values import (
    balance,
    bind_address,
    boolean,
    choice,
    cookie_value,
    count,
    duration,
    expose_fd,
    file_mode,
    host_header,
    http_method,
    integer,
    log_target,
    name,
    path,
    server_address,
    size,
    socket_path,
    status_range,
    stick_on,
    token,
    uri_path,
)
from .yamltree import Value


def binds(v: Value) -> tuple[tuple[Address, int], ...]:
    """``bind``: one address or a non-empty list; each kept with its line."""
    items = v.elements() if not v.is_scalar else [v]
    if not items:
        raise v.error("expected at least one address")
    return tuple((bind_address(item), item.line) for item in items)


mode = choice("http", "tcp")

TIMEOUT: Schema = {
    "connect": Field(duration, 5.0),
    "client": Field(duration, 30.0),
    "server": Field(duration, 30.0),
    "queue": Field(duration, 30.0),
    "http-request": Field(duration, 10.0),
    "http-keep-alive": Field(duration, 10.0),
    "check": Field(duration, 2.0),
    "tunnel": Field(duration, 3600.0),
}

STATS: Schema = {
    "socket": Field(socket_path, required=True, attr="path"),
    "mode": Field(file_mode, 0o600),
    "user": Field(name),
    "group": Field(name),
    "level": Field(choice("user", "operator", "admin"), "operator"),
    "expose-fd": Field(expose_fd, False),
    "timeout": Field(duration, 10.0),
}

GLOBAL: Schema = {
    "workers": Field(integer(1), factory=lambda: os.cpu_count() or 1),
    "maxconn": Field(integer(1), 4096),
    "pidfile": Field(path),
    "daemon": Field(boolean, False),
    "hard-stop-after": Field(duration),
    "log": Field(log_target, "stderr"),
    "max-header-size": Field(size, 16 * 1024),
    "stats": Field(record(STATS, StatsSocket)),
}

SERVER: Schema = {
    "address": Field(server_address, required=True),
    "weight": Field(integer(0, 256), 1),
    "maxconn": Field(integer(0), 0),
    "maxqueue": Field(integer(0), 0),
    "backup": Field(boolean, False),
    "cookie": Field(cookie_value),
    "check": Field(boolean, False),
    "inter": Field(duration, 2.0),
    "rise": Field(integer(1), 2),
    "fall": Field(integer(1), 3),
}

DEFAULT_SERVER: Schema = {k: f for k, f in SERVER.items() if k != "address"}

HTTP_CHECK: Schema = {
    "method": Field(http_method, "GET"),
    "path": Field(uri_path, "/"),
    "expect": Field(status_range, (200, 399)),
    "host": Field(host_header),
}

COOKIE: Schema = {
    "name": Field(token, required=True),
    "mode": Field(choice("insert", "rewrite", "prefix"), "insert"),
    "indirect": Field(boolean, False),
    "nocache": Field(boolean, False),
}

STICK_TABLE: Schema = {
    "type": Field(choice("ip", "string"), "ip"),
    "size": Field(count, 100 * 1024),
    "expire": Field(duration),  # None: entries never expire, the oldest make room
}

FRONTEND: Schema = {
    "bind": Field(binds, required=True, attr="binds"),
    "mode": Field(mode, "http", inherit=True),
    "maxconn": Field(integer(1), None, inherit=True),  # None: global maxconn
    "backlog": Field(integer(1), 1024, inherit=True),
    "default_backend": Field(name),
    "timeout": Field(partial(TIMEOUT), merge=True, inherit=True, attr="timeouts"),
    "forwardfor": Field(boolean, False, inherit=True),
    "log": Field(log_target, inherit=True),  # None: no request log
}

BACKEND: Schema = {
    "mode": Field(mode, "http", inherit=True),
    "balance": Field(balance, ("roundrobin", None), inherit=True),
    "retries": Field(integer(0), 3, inherit=True),
    "redispatch": Field(boolean, False, inherit=True),
    "timeout": Field(partial(TIMEOUT), merge=True, inherit=True, attr="timeouts"),
    "http-check": Field(record(HTTP_CHECK, HttpCheck), inherit=True),
    "cookie": Field(record(COOKIE, Cookie)),
    "stick-table": Field(record(STICK_TABLE, StickTable), inherit=True),
    "stick-on": Field(stick_on, inherit=True),
    "default-server": Field(partial(DEFAULT_SERVER), merge=True, inherit=True, attr=None),
    "servers": Field(named(SERVER, "server", at_least_one=True), required=True, attr=None),
}

# `defaults` accepts every key a frontend or backend may inherit.
DEFAULTS: Schema = {
    k: f for table in (FRONTEND, BACKEND) for k, f in table.items() if f.inherit
}

ROOT: Schema = {
    "global": Field(partial(GLOBAL)),
    "defaults": Field(partial(DEFAULTS)),
    "frontends": Field(named(FRONTEND, "frontend", at_least_one=True), required=True),
    "backends": Field(named(BACKEND, "backend")),
}
