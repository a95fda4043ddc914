"""The schema tables: one per section. Adding a key is one line here (plus its dataclass
attribute in model.py and its line in docs/configuration.md)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from yaml.nodes import MappingNode

from lb.rules import syntax as rules

from . import tls
from .fields import Field, Schema, named, partial, record
from .model import (
    Acl,
    Address,
    Condition,
    Cookie,
    ErrorFile,
    HttpCheck,
    HttpRequestRule,
    PrometheusPage,
    StatsPage,
    StatsSocket,
    StickTable,
    TcpConnectionRule,
    TlsBind,
    UseBackend,
)
from .values import (
    balance,
    boolean,
    ca_file,
    choice,
    cookie_value,
    count,
    directory,
    duration,
    expose_fd,
    file_mode,
    host_header,
    http_method,
    integer,
    log_target,
    name,
    path,
    plain_path,
    realm,
    redispatch,
    retry_on,
    server_address,
    server_name,
    size,
    socket_path,
    stats_auth,
    stats_uri,
    status_range,
    stick_on,
    store,
    system_group,
    system_user,
    token,
    uri_path,
)
from .yamltree import Value

MAX_WORKERS = 64  # `global.workers` at most (documented in docs/configuration.md)


def binds(v: Value) -> tuple[tuple[Address, int, TlsBind | None], ...]:
    """``bind``: one address (or mapping, see lb.config.tls) or a non-empty list of them;
    each kept with its line."""
    items = [v] if v.is_scalar or isinstance(v.node, MappingNode) else v.elements()
    if not items:
        raise v.error("expected at least one address")
    return tuple(tls.bind(item) for item in items)


mode = choice("http", "tcp")

# -- HTTP rules: HAProxy's words in YAML strings, parsed by lb.rules.syntax -----------------

T = TypeVar("T")


def _rule_text(v: Value, what: str) -> str:
    """A rule is one YAML string; an unquoted leading ! would make it a YAML tag."""
    tag = str(v.node.tag)
    if v.is_scalar and tag.startswith("!"):
        written = f"{tag} {v.node.value}".rstrip()
        raise v.error(f'YAML reads a leading ! as a tag: quote the value, like "{written}"')
    if not v.is_scalar or v.is_null:
        raise v.error(f"expected {what}, got {v.describe()}")
    return v.text or ""


def _located(v: Value, parse: Callable[[str, int], T], what: str) -> T:
    """``parse`` the rule at ``v``; its ValueError becomes a ConfigError at that line."""
    text = _rule_text(v, what)
    try:
        return parse(text, v.line)
    except ValueError as exc:
        raise v.error(str(exc)) from None


def _lines(v: Value) -> list[Value]:
    """One string or a list of them (null: none)."""
    if v.is_null:
        return []
    return [v] if v.is_scalar else v.elements()


def acls(v: Value) -> tuple[Acl, ...]:
    """``NAME: criterion [flags] values`` or ``NAME: [line, line]``; lines are OR'ed."""
    out: list[Acl] = []
    for acl_name, child in v.items():
        if not rules.NAME_RE.fullmatch(acl_name):
            raise child.error("invalid ACL name (use letters, digits and - _ . :)",
                              line=child.key_line)
        lines = _lines(child)
        if not lines:
            raise child.error("expected an ACL like path_beg /api, got null")
        what = "an ACL like path_beg /api"
        tests = tuple(_located(item, rules.parse_acl, what) for item in lines)
        out.append(Acl(acl_name, tests, child.key_line))
    return tuple(out)


def http_request(v: Value) -> tuple[HttpRequestRule, ...]:
    what = "a rule like deny if blocked"
    return tuple(_located(item, rules.parse_http_request, what) for item in _lines(v))


def tcp_request_connection(v: Value) -> tuple[TcpConnectionRule, ...]:
    what = "a rule like reject if { sc_conn_cur(0) gt 10 }"
    return tuple(_located(item, rules.parse_tcp_connection, what) for item in _lines(v))


def use_backend(v: Value) -> tuple[UseBackend, ...]:
    what = "a backend and an optional condition, like api if is_api"
    return tuple(_located(item, rules.parse_use_backend, what) for item in _lines(v))


def monitor_uri(v: Value) -> str:
    return _located(v, rules.parse_monitor_uri, "a URI like /site_alive")


def monitor_fail(v: Value) -> Condition:
    return _located(v, rules.parse_condition, "a condition like site_dead || maint")


def errorfiles(v: Value) -> tuple[ErrorFile, ...]:
    """``STATUS: PATH``; each file is read and checked now, as HAProxy does."""
    out: list[ErrorFile] = []
    for status_text, child in v.items():
        try:
            status = rules.errorfile_status(status_text)
        except ValueError as exc:
            raise child.error(str(exc), line=child.key_line) from None
        file = path(child)
        try:
            response = rules.read_errorfile(file)
        except ValueError as exc:
            raise child.error(str(exc)) from None
        out.append(ErrorFile(status, file, response))
    return tuple(out)


def maps(v: Value) -> dict[str, str]:
    """``NAME: PATH`` of map files; each is read now so a missing file stops the load."""
    out: dict[str, str] = {}
    for map_name, child in v.items():
        if not rules.NAME_RE.fullmatch(map_name):
            raise child.error("invalid map name (use letters, digits and - _ . :)",
                              line=child.key_line)
        file = path(child)
        try:
            rules.check_map_file(file)
        except OSError as exc:
            raise child.error(f"cannot read map file {file!r}: {exc.strerror}") from None
        except ValueError as exc:
            raise child.error(str(exc)) from None
        out[map_name] = file
    return out


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
    "user": Field(system_user),
    "group": Field(system_group),
    "level": Field(choice("user", "operator", "admin"), "operator"),
    "expose-fd": Field(expose_fd, False),
    "timeout": Field(duration, 10.0),
}

GLOBAL: Schema = {
    "workers": Field(integer(1, MAX_WORKERS),
                     factory=lambda: min(os.cpu_count() or 1, MAX_WORKERS)),
    "maxconn": Field(integer(1), 4096),
    "pidfile": Field(path),
    "daemon": Field(boolean, False),
    "hard-stop-after": Field(duration),
    "spread-checks": Field(integer(0, 50), 0),  # percent of random jitter on check intervals
    "log": Field(log_target, "stderr"),
    "max-header-size": Field(size, 16 * 1024),
    "stats": Field(record(STATS, StatsSocket)),
    # how often the master makes a new TLS session ticket key (lb.tls.keyring)
    "tls-ticket-rotate": Field(duration, 3600.0),
    # least privilege (lb.privileges): workers switch to this user and group, in this root
    "user": Field(system_user),
    "group": Field(system_group),
    "chroot": Field(directory),
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
    "fastinter": Field(duration),  # None: inter. Between checks while rising or falling
    "downinter": Field(duration),  # None: inter. Between checks while DOWN
    "rise": Field(integer(1), 2),
    "fall": Field(integer(1), 3),
    # TLS to the server, HAProxy's keys; health checks use it too (HAProxy's check-ssl)
    "ssl": Field(boolean, False),
    "verify": Field(choice("none", "required"), "required"),
    "ca-file": Field(ca_file, attr="ca"),  # PEM bytes, read now; None: the system's CAs
    "sni": Field(server_name),
    "verifyhost": Field(server_name),
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
    "type": Field(choice("ip", "ipv6", "integer", "string"), "ip"),
    "size": Field(count, 100 * 1024),
    "expire": Field(duration),  # None: entries never expire, the oldest make room
    "len": Field(integer(1, 255), 32, attr="key_len"),  # string keys, in bytes
    "store": Field(store, ()),
}

STATS_PAGE: Schema = {
    "uri": Field(stats_uri, "/stats"),
    "refresh": Field(duration),  # None: the page does not reload itself
    "admin": Field(boolean, False),
    "auth": Field(stats_auth, ()),
    "realm": Field(realm, "pylb"),
}

PROMETHEUS_PAGE: Schema = {
    "uri": Field(plain_path, "/metrics"),  # matched on the path alone, as HAProxy's exporter
}


def page(schema: Schema, cls: type) -> Callable[[Value], object]:
    """`stats: true` (every default), or a mapping of the page's keys."""
    parse_mapping = record(schema, cls)

    def parse(v: Value) -> object:
        if v.is_scalar and not v.is_null:
            if boolean(v):
                return cls()
            return None  # false: none
        return parse_mapping(v)

    return parse


FRONTEND: Schema = {
    "bind": Field(binds, required=True, attr="binds"),
    "mode": Field(mode, "http", inherit=True),
    "maxconn": Field(integer(1), None, inherit=True),  # None: global maxconn
    "backlog": Field(integer(1), 1024, inherit=True),
    "default_backend": Field(name),
    "timeout": Field(partial(TIMEOUT), merge=True, inherit=True, attr="timeouts"),
    "forwardfor": Field(boolean, False, inherit=True),
    "httpclose": Field(boolean, False, inherit=True),
    "http-server-close": Field(boolean, False, inherit=True),
    "log": Field(log_target, inherit=True),  # None: no request log
    "httpslog": Field(boolean, False, inherit=True),  # option httpslog (lb.httplog)
    # HTTP rules; never inherited from defaults (HAProxy refuses them there too)
    "acl": Field(acls, ()),
    "http-request": Field(http_request, ()),
    "use_backend": Field(use_backend, ()),
    "monitor-uri": Field(monitor_uri),
    "monitor-fail": Field(monitor_fail),
    "errorfile": Field(errorfiles, (), attr="errorfiles"),
    "stick-table": Field(record(STICK_TABLE, StickTable)),
    # evaluated once per connection, before anything is read; http and tcp mode
    "tcp-request connection": Field(tcp_request_connection, (), attr="tcp_request_connection"),
    # pages pylb serves itself (lb.statspage, lb.promex); may be set in defaults, as
    # HAProxy's `stats` keys may
    "stats": Field(page(STATS_PAGE, StatsPage), inherit=True),
    "prometheus": Field(page(PROMETHEUS_PAGE, PrometheusPage), inherit=True),
}

BACKEND: Schema = {
    "mode": Field(mode, "http", inherit=True),
    "balance": Field(balance, ("roundrobin", None), inherit=True),
    "retries": Field(integer(0), 3, inherit=True),
    "redispatch": Field(redispatch, 0, inherit=True),
    "retry-on": Field(retry_on, ("conn-failure",), inherit=True),
    "retry-buffer": Field(size, 16 * 1024, inherit=True),  # request body kept for a replay
    "retry-non-idempotent": Field(boolean, False, inherit=True),
    "hold-when-down": Field(boolean, False, inherit=True),
    "maxqueue": Field(integer(0), 0, inherit=True),  # the backend's own queue; 0: no limit
    "abortonclose": Field(boolean, False, inherit=True),
    "httpclose": Field(boolean, False, inherit=True),
    "http-server-close": Field(boolean, False, inherit=True),
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
    "maps": Field(maps),
}
