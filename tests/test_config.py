"""Tests for lb.config: the example file, error messages (file:line: key: message),
defaults merging, value syntaxes and cross checks. No sockets needed."""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
from pathlib import Path

import pytest

from lb.config import (
    Address,
    Config,
    ConfigError,
    Cookie,
    HttpCheck,
    PrometheusPage,
    StatsPage,
    StatsSocket,
    StickTable,
    Timeouts,
    load,
    loads,
    parse_bind_address,
    parse_duration,
    parse_server_address,
    parse_size,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "conf" / "lb.cfg"

# The smallest useful configuration; tests edit it and count lines from 1.
MINIMAL = """\
frontends:
  web:
    bind: 127.0.0.1:8080
    default_backend: app
backends:
  app:
    servers:
      s1:
        address: 127.0.0.1:9001
"""

DEFAULT_TIMEOUTS = Timeouts(
    connect=5.0,
    client=30.0,
    server=30.0,
    queue=30.0,
    http_request=10.0,
    http_keep_alive=10.0,
    check=2.0,
    tunnel=3600.0,
)


def error_of(text: str, path: str = "t.cfg") -> str:
    """The one-line message loads() raises for ``text``."""
    with pytest.raises(ConfigError) as info:
        loads(text, path)
    return str(info.value)


def example_text() -> str:
    return EXAMPLE.read_text()


# -- the example file -------------------------------------------------------------------------


def test_example_loads_with_expected_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    cfg = load("conf/lb.cfg")
    assert isinstance(cfg, Config)
    assert cfg.path == "conf/lb.cfg"
    assert cfg.text == example_text()

    g = cfg.global_
    assert g.workers == 2
    assert g.maxconn == 4096
    assert g.pidfile == "run/pylb.pid"
    assert g.daemon is False
    assert g.hard_stop_after is None
    assert g.log == "stderr"
    assert g.max_header_size == 16384
    assert g.stats == StatsSocket(
        path="run/pylb.sock",
        mode=0o660,
        user=None,
        group=None,
        level="admin",
        expose_fd=True,
        timeout=10.0,
    )

    assert list(cfg.frontends) == ["www", "stats"]
    stats = cfg.frontends["stats"]
    assert stats.binds == (Address("127.0.0.1", 8404),)
    assert stats.stats == StatsPage(uri="/stats", refresh=5.0, admin=True, auth=(), realm="pylb")
    assert stats.prometheus == PrometheusPage(uri="/metrics")
    assert stats.default_backend is None
    www = cfg.frontends["www"]
    assert www.name == "www"
    assert www.binds == (Address("127.0.0.1", 8080),)
    assert www.mode == "http"
    assert www.maxconn == 4096
    assert www.backlog == 1024
    assert www.default_backend == "app"
    assert www.timeouts == DEFAULT_TIMEOUTS
    assert www.forwardfor is True
    assert www.log is None
    assert www.line == 29

    assert list(cfg.backends) == ["app"]
    app = cfg.backends["app"]
    assert app.name == "app"
    assert app.mode == "http"
    assert (app.balance, app.balance_arg) == ("roundrobin", None)
    assert app.retries == 3
    assert app.redispatch == 0
    assert app.timeouts == DEFAULT_TIMEOUTS
    assert app.http_check == HttpCheck(method="GET", path="/", expect=(200, 200), host=None)
    assert app.cookie == Cookie(name="SERVERID", mode="insert", indirect=True, nocache=True)
    assert (app.stick_table, app.stick_on) == (None, None)
    assert app.line == 47
    assert [s.name for s in app.servers] == ["s1", "s2"]
    s1, s2 = app.servers
    assert s1.address == Address("127.0.0.1", 9001)
    assert s2.address == Address("127.0.0.1", 9002)
    assert (s1.cookie, s2.cookie) == ("s1", "s2")
    for s in app.servers:
        assert (s.check, s.weight, s.maxconn, s.maxqueue, s.backup) == (True, 1, 0, 0, False)
        assert (s.inter, s.rise, s.fall) == (2.0, 2, 3)


def test_example_misspelled_bind_is_reported_on_its_line() -> None:
    text = example_text().replace("    bind: 127.0.0.1:8080", "    bnd: 127.0.0.1:8080")
    with pytest.raises(ConfigError) as info:
        loads(text, "conf/lb.cfg")
    err = info.value
    assert str(err) == "conf/lb.cfg:30: frontends.www.bnd: unknown key (did you mean bind?)"
    assert (err.path, err.line, err.key) == ("conf/lb.cfg", 30, "frontends.www.bnd")
    assert err.message == "unknown key (did you mean bind?)"


def test_example_errors_on_other_lines() -> None:
    text = example_text()
    assert error_of(text.replace("connect: 5s", "connect: fast"), "conf/lb.cfg") == (
        "conf/lb.cfg:19: defaults.timeout.connect: "
        "expected a duration like 5s or 250ms, got 'fast'"
    )
    assert error_of(text.replace("cookie: s2", "cookei: s2")) == (
        "t.cfg:65: backends.app.servers.s2.cookei: unknown key (did you mean cookie?)"
    )
    assert error_of(text.replace("workers: 2", "workers: 0")) == (
        "t.cfg:8: global.workers: expected an integer from 1 to 64, got 0"
    )


def test_load_keeps_the_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bad.cfg").write_text(MINIMAL.replace("bind:", "bindd:"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load("./bad.cfg")
    assert str(info.value) == "./bad.cfg:3: frontends.web.bindd: unknown key (did you mean bind?)"


def test_missing_file() -> None:
    with pytest.raises(ConfigError) as info:
        load("/nonexistent/pylb.cfg")
    assert str(info.value) == (
        "/nonexistent/pylb.cfg: cannot read configuration: No such file or directory"
    )
    assert info.value.line is None


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "x.cfg"
    path.write_bytes(b"frontends:\n  web: \xff\n")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert str(info.value) == f"{path}:2: file is not valid UTF-8"


# -- error messages ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # unknown keys, with and without a close match
        ("    bind:", "    Bind:", "t.cfg:3: frontends.web.Bind: unknown key (did you mean bind?)"),
        ("    bind:", "    listen:", "t.cfg:3: frontends.web.listen: unknown key"),
        ("backends:", "backend:", "t.cfg:5: backend: unknown key (did you mean backends?)"),
        ("      s1:\n", "      s1:\n        wieght: 2\n",
         "t.cfg:9: backends.app.servers.s1.wieght: unknown key (did you mean weight?)"),
        # wrong types say what was expected
        ("    default_backend: app\n", "    default_backend: app\n    maxconn: lots\n",
         "t.cfg:5: frontends.web.maxconn: expected an integer >= 1, got 'lots'"),
        ("    default_backend: app\n", "    default_backend: app\n    forwardfor: 1\n",
         "t.cfg:5: frontends.web.forwardfor: expected true or false, got 1"),
        ("    default_backend: app\n", "    default_backend: app\n    mode: https\n",
         "t.cfg:5: frontends.web.mode: expected http or tcp, got 'https'"),
        ("    default_backend: app\n", "    default_backend: app\n    timeout: 5s\n",
         "t.cfg:5: frontends.web.timeout: expected a mapping, got '5s'"),
        ("    default_backend: app\n", "    default_backend: app\n    timeout:\n      client: -1\n",
         "t.cfg:6: frontends.web.timeout.client: expected a duration like 5s or 250ms, got -1"),
        ("    default_backend: app\n", "    default_backend: app\n    timeout: {client: 0s}\n",
         "t.cfg:5: frontends.web.timeout.client: expected a duration greater than 0, got '0s'"),
        ("        address: 127.0.0.1:9001", "        address: 127.0.0.1:9001\n        weight: 257",
         "t.cfg:10: backends.app.servers.s1.weight: expected an integer from 0 to 256, got 257"),
        ("        address: 127.0.0.1:9001", "        address: [127.0.0.1, 9001]",
         "t.cfg:9: backends.app.servers.s1.address: expected HOST:PORT like 127.0.0.1:8080, "
         "[::1]:8080 or *:8080, got a list"),
        ("  app:\n", "  app:\n    balance: fastest\n",
         "t.cfg:7: backends.app.balance: expected one of roundrobin, static-rr, leastconn, "
         "source, uri, random or hdr(NAME), got 'fastest'"),
        ("frontends:", "global: {max-header-size: 16kb}\nfrontends:",
         "t.cfg:1: global.max-header-size: expected a size like 16k or 1m, got '16kb'"),
        ("frontends:", "global: {stats: {socket: s, level: root}}\nfrontends:",
         "t.cfg:1: global.stats.level: expected one of user, operator, admin, got 'root'"),
        ("frontends:", "global: {stats: {socket: s, mode: 999}}\nfrontends:",
         "t.cfg:1: global.stats.mode: expected an octal file mode like \"660\", got 999"),
        ("frontends:", "global: {stats: {socket: s, expose-fd: all}}\nfrontends:",
         "t.cfg:1: global.stats.expose-fd: expected listeners, got 'all'"),
        ("frontends:", "global: {log: 'tcp@10.0.0.1:514'}\nfrontends:",
         "t.cfg:1: global.log: expected stderr, a file path, udp@HOST:PORT or unix@PATH, "
         "got 'tcp@10.0.0.1:514'"),
        ("frontends:", "global: {log: 'udp@10.0.0.1:0'}\nfrontends:",
         "t.cfg:1: global.log: bad udp@ log target: invalid port '0' in '10.0.0.1:0' "
         "(expected 1 to 65535)"),
        ("  app:\n", "  app:\n    http-check: {expect: 600}\n",
         "t.cfg:7: backends.app.http-check.expect: "
         "expected a status like 200 or a range like 200-399, got 600"),
        ("  app:\n", "  app:\n    http-check: {path: health}\n",
         "t.cfg:7: backends.app.http-check.path: expected a path starting with /, got 'health'"),
        ("  app:\n", "  app:\n    http-check: {method: get}\n",
         "t.cfg:7: backends.app.http-check.method: "
         "expected an HTTP method like GET or HEAD, got 'get'"),
        # addresses
        ("127.0.0.1:8080", "127.0.0.1:0",
         "t.cfg:3: frontends.web.bind: invalid port '0' in '127.0.0.1:0' (expected 1 to 65535)"),
        ("127.0.0.1:8080", "127.0.0.1",
         "t.cfg:3: frontends.web.bind: expected HOST:PORT like 127.0.0.1:8080, [::1]:8080 or "
         "*:8080, got '127.0.0.1'"),
        ("127.0.0.1:8080", "www.example.com:80",
         "t.cfg:3: frontends.web.bind: bind host must be an IP address, localhost or *, "
         "got 'www.example.com'"),
        ("127.0.0.1:8080", "'::1:8080'",
         "t.cfg:3: frontends.web.bind: IPv6 addresses need brackets, like [::1]:8080, "
         "got '::1:8080'"),
        ("127.0.0.1:9001", "db..internal:5432",
         "t.cfg:9: backends.app.servers.s1.address: invalid host name 'db..internal'"),
        ("127.0.0.1:9001", "'*:9001'",
         "t.cfg:9: backends.app.servers.s1.address: a server address needs a host, "
         "got '*:9001'"),
        # required keys point at the line of the mapping that lacks them
        ("    bind: 127.0.0.1:8080\n", "", "t.cfg:2: frontends.web: missing required key bind"),
        ("        address: 127.0.0.1:9001\n", "        weight: 2\n",
         "t.cfg:8: backends.app.servers.s1: missing required key address"),
        ("  app:\n    servers:\n      s1:\n        address: 127.0.0.1:9001\n",
         "  app:\n    balance: leastconn\n",
         "t.cfg:6: backends.app: missing required key servers"),
        ("      s1:\n        address: 127.0.0.1:9001\n", "      {}\n",
         "t.cfg:7: backends.app.servers: at least one server is required"),
        # request log and stick tables
        ("    default_backend: app\n", "    default_backend: app\n    log: 'syslog@host'\n",
         "t.cfg:5: frontends.web.log: expected stderr, a file path, udp@HOST:PORT or unix@PATH, "
         "got 'syslog@host'"),
        ("    default_backend: app\n", "    default_backend: app\n    log: [stderr]\n",
         "t.cfg:5: frontends.web.log: expected stderr, a file path, udp@HOST:PORT or unix@PATH, "
         "got a list"),
        ("    default_backend: app\n", "    default_backend: app\n    log: udp@10.0.0.1:99999\n",
         "t.cfg:5: frontends.web.log: bad udp@ log target: invalid port '99999' in "
         "'10.0.0.1:99999' (expected 1 to 65535)"),
        ("  app:\n", "  app:\n    log: stderr\n",
         "t.cfg:7: backends.app.log: unknown key"),  # a request log is per frontend
        ("  app:\n", "  app:\n    stick-table: {type: integer}\n    stick-on: src\n",
         "t.cfg:8: backends.app.stick-on: stick-on src needs a stick-table of type ip, ipv6 "
         "or string (backend 'app' has type integer)"),
        ("  app:\n", "  app:\n    stick-table: {type: number}\n",
         "t.cfg:7: backends.app.stick-table.type: expected one of ip, ipv6, integer, string, "
         "got 'number'"),
        ("  app:\n", "  app:\n    stick-table: {store: [http_req_rate]}\n",
         "t.cfg:7: backends.app.stick-table.store: http_req_rate needs a period, like "
         "http_req_rate(10s)"),
        ("  app:\n", "  app:\n    stick-table:\n      size: 100kb\n",
         "t.cfg:8: backends.app.stick-table.size: expected a count like 1000 or 100k, "
         "got '100kb'"),
        ("  app:\n", "  app:\n    stick-table:\n      size: 0\n",
         "t.cfg:8: backends.app.stick-table.size: expected a count greater than 0, got 0"),
        ("  app:\n", "  app:\n    stick-table:\n      expire: soon\n",
         "t.cfg:8: backends.app.stick-table.expire: expected a duration like 5s or 250ms, "
         "got 'soon'"),
        ("  app:\n", "  app:\n    stick-table: {expires: 30m}\n",
         "t.cfg:7: backends.app.stick-table.expires: unknown key (did you mean expire?)"),
        ("  app:\n", "  app:\n    stick-table: ip\n",
         "t.cfg:7: backends.app.stick-table: expected a mapping, got 'ip'"),
        ("  app:\n", "  app:\n    stick-table: {}\n    stick-on: dst\n",
         "t.cfg:8: backends.app.stick-on: expected src, req.cook(NAME) or req.hdr(NAME), "
         "got 'dst'"),
        ("  app:\n", "  app:\n    stick-table: {}\n    stick-on: req.cook(a b)\n",
         "t.cfg:8: backends.app.stick-on: expected a cookie name in req.cook(NAME), "
         "got 'req.cook(a b)'"),
        ("  app:\n", "  app:\n    stick-table: {}\n    stick-on: req.hdr()\n",
         "t.cfg:8: backends.app.stick-on: expected a header name in req.hdr(NAME), "
         "got 'req.hdr()'"),
        ("  app:\n", "  app:\n    stick-table: {}\n    stick-on: ~\n    stick_on: src\n",
         "t.cfg:9: backends.app.stick_on: unknown key (did you mean stick-on?)"),
    ],
)
def test_error_messages(old: str, new: str, expected: str) -> None:
    assert old in MINIMAL
    assert error_of(MINIMAL.replace(old, new, 1)) == expected


def test_top_level_must_be_a_mapping_with_frontends() -> None:
    assert error_of("") == "t.cfg:1: the configuration is empty"
    assert error_of("# nothing\n") == "t.cfg:1: the configuration is empty"
    assert error_of("- a\n- b\n") == "t.cfg:1: expected a mapping, got a list"
    assert error_of("global:\n  workers: 1\n") == "t.cfg:1: missing required key frontends"
    assert error_of("global: {}\nfrontends:\n") == (
        "t.cfg:2: frontends: at least one frontend is required"
    )


def test_invalid_names() -> None:
    text = MINIMAL.replace("  web:", "  'my web':")
    assert error_of(text) == (
        "t.cfg:2: frontends.my web: invalid frontend name (use letters, digits and - _ . :)"
    )
    text = MINIMAL.replace("      s1:", "      s/1:")
    assert error_of(text) == (
        "t.cfg:8: backends.app.servers.s/1: invalid server name (use letters, digits and - _ . :)"
    )


# -- YAML level -------------------------------------------------------------------------------


def test_duplicate_yaml_keys() -> None:
    dup_key = MINIMAL.replace("app\n", "app\n    bind: :81\n", 1)
    assert error_of(dup_key) == "t.cfg:5: frontends.web.bind: duplicate key (first set on line 3)"

    dup_server = MINIMAL + "      s1:\n        address: 127.0.0.1:9002\n"
    assert error_of(dup_server) == (
        "t.cfg:10: backends.app.servers.s1: duplicate key (first set on line 8)"
    )

    dup_frontend = MINIMAL.replace("backends:", "  web:\n    bind: :81\nbackends:")
    assert error_of(dup_frontend) == "t.cfg:5: frontends.web: duplicate key (first set on line 2)"

    dup_section = MINIMAL + "frontends: {}\n"
    assert error_of(dup_section) == "t.cfg:10: frontends: duplicate key (first set on line 1)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("frontends:\n  web:\n\tbind: :80\n",
         "t.cfg:3: YAML syntax error: found character '\\t' that cannot start any token"),
        ("frontends:\n  web:\n    bind: ':80\n",
         "t.cfg:4: YAML syntax error: found unexpected end of stream "
         "(while scanning a quoted scalar on line 3)"),
        ("frontends:\n  web:\n    bind: *:80\n",
         "t.cfg:3: YAML syntax error: expected alphabetic or numeric character, but found ':'; "
         'quote values that start with *, like "*:80"'),
        ("frontends:\n  web:\n    bind: [::1]:80\n",
         "t.cfg:3: YAML syntax error: expected the node content, but found ':'; "
         'quote values that start with [, like "[::1]:8080"'),
        ("frontends:\n  web:\n    bind: a: b\n",
         "t.cfg:3: YAML syntax error: mapping values are not allowed here"),
        ("frontends:\n  web:\n    bind: :80\n   mode: http\n",
         "t.cfg:4: YAML syntax error: expected <block end>, but found '<block mapping start>' "
         "(while parsing a block mapping on line 2)"),
        ("a: 1\n---\nb: 2\n",
         "t.cfg:2: YAML syntax error: expected a single document in the stream, "
         "but found another document"),
        ("frontends:\n  web: \x07\n", "t.cfg:2: YAML syntax error: unacceptable character #x0007"),
    ],
)
def test_yaml_syntax_errors(text: str, expected: str) -> None:
    assert error_of(text) == expected


def test_yaml_merge_keys_and_anchors() -> None:
    text = """\
frontends:
  web: {bind: ':80', default_backend: app}
backends:
  app:
    servers:
      s1: &srv {address: 'a:1', check: true, inter: 5s, weight: 2}
      s2: {<<: *srv, address: 'b:1', weight: 7}
"""
    s1, s2 = loads(text).backends["app"].servers
    assert (s1.address, s1.check, s1.inter, s1.weight) == (Address("a", 1), True, 5.0, 2)
    assert (s2.address, s2.check, s2.inter, s2.weight) == (Address("b", 1), True, 5.0, 7)

    text = MINIMAL.replace(
        "backends:",
        "  api:\n    <<: &common {default_backend: app, maxconn: 10}\n    bind: ':81'\n"
        "  admin:\n    <<: *common\n    bind: ':82'\n    maxconn: 5\nbackends:",
    )
    cfg = loads(text)
    assert (cfg.frontends["api"].maxconn, cfg.frontends["api"].default_backend) == (10, "app")
    assert (cfg.frontends["admin"].maxconn, cfg.frontends["admin"].default_backend) == (5, "app")

    # Compose-style extension fields are not sections.
    assert error_of("x-server: &srv {check: true}\n" + MINIMAL) == "t.cfg:1: x-server: unknown key"
    # Merged keys are validated where they were written.
    text = MINIMAL.replace("  web:\n", "  web:\n    <<: {backlog: 0}\n")
    assert error_of(text) == "t.cfg:3: frontends.web.backlog: expected an integer >= 1, got 0"


# -- defaults ---------------------------------------------------------------------------------


def test_defaults_apply_and_merge() -> None:
    text = """\
global:
  maxconn: 500
defaults:
  mode: tcp
  maxconn: 100
  backlog: 64
  retries: 1
  balance: leastconn
  timeout:
    connect: 1s
    client: 2s
  default-server:
    inter: 5s
    rise: 4
    weight: 10
frontends:
  db:
    bind: 127.0.0.1:5432
    default_backend: pg
    timeout:
      client: 3s
  plain:
    bind: 127.0.0.1:5433
    maxconn: 7
backends:
  pg:
    retries: 0
    timeout: {server: 4s}
    default-server: {inter: 1s, check: true}
    servers:
      a: {address: 'db1:5432', weight: 3}
      b: {address: 'db2:5432', inter: 250ms}
"""
    cfg = loads(text)
    db = cfg.frontends["db"]
    assert (db.mode, db.maxconn, db.backlog) == ("tcp", 100, 64)
    assert db.timeouts == dataclasses.replace(DEFAULT_TIMEOUTS, connect=1.0, client=3.0)
    assert cfg.frontends["plain"].maxconn == 7
    assert cfg.frontends["plain"].timeouts.client == 2.0

    pg = cfg.backends["pg"]
    assert (pg.mode, pg.balance, pg.retries) == ("tcp", "leastconn", 0)
    assert pg.timeouts == dataclasses.replace(
        DEFAULT_TIMEOUTS, connect=1.0, client=2.0, server=4.0
    )
    a, b = pg.servers
    assert (a.weight, a.inter, a.rise, a.check, a.fall) == (3, 1.0, 4, True, 3)
    assert (b.weight, b.inter, b.rise, b.check) == (10, 0.25, 4, True)
    assert a.address == Address("db1", 5432)


def test_frontend_maxconn_falls_back_to_global_and_workers_to_cpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 12)
    cfg = loads("global: {maxconn: 321}\n" + MINIMAL)
    assert cfg.global_.workers == 12
    assert cfg.frontends["web"].maxconn == 321
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    cfg = loads(MINIMAL)
    assert cfg.global_.workers == 1
    assert cfg.global_.maxconn == 4096
    assert cfg.frontends["web"].maxconn == 4096
    assert cfg.global_.stats is None


def test_http_check_from_defaults_is_replaced_not_merged() -> None:
    text = "defaults:\n  http-check: {path: /health, expect: 200-299, host: example.org}\n"
    cfg = loads(text + MINIMAL)
    assert cfg.backends["app"].http_check == HttpCheck("GET", "/health", (200, 299), "example.org")
    cfg = loads(text + MINIMAL.replace("  app:\n", "  app:\n    http-check: {method: HEAD}\n"))
    assert cfg.backends["app"].http_check == HttpCheck("HEAD", "/", (200, 399), None)
    cfg = loads(text + MINIMAL.replace("  app:\n", "  app:\n    http-check: ~\n"))
    assert cfg.backends["app"].http_check is None


def test_null_means_none_for_optional_keys() -> None:
    cfg = loads("global:\n  pidfile:\n  stats: ~\ndefaults:\n" + MINIMAL.replace(
        "    default_backend", "    maxconn: null\n    default_backend"))
    assert cfg.global_.pidfile is None
    assert cfg.global_.stats is None
    assert cfg.frontends["web"].timeouts == DEFAULT_TIMEOUTS
    assert cfg.frontends["web"].maxconn == 4096
    # where none is not a legal value, null is a wrong type
    assert error_of("global: {workers: ~}\n" + MINIMAL) == (
        "t.cfg:1: global.workers: expected an integer from 1 to 64, got null"
    )


# -- value syntaxes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (5, 5.0), (2.5, 2.5), (0, 0.0), ("7", 7.0), ("250ms", 0.25), ("5s", 5.0),
        ("2m", 120.0), ("1h", 3600.0), ("1d", 86400.0), ("100us", 0.0001), ("1.5s", 1.5),
        (".5s", 0.5), ("365d", 365 * 86400.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("fast", "expected a duration like 5s or 250ms, got 'fast'"),
        ("5 s", "expected a duration like 5s or 250ms, got '5 s'"),
        ("5S", "expected a duration like 5s or 250ms, got '5S'"),
        ("5sec", "expected a duration like 5s or 250ms, got '5sec'"),
        ("1m30s", "expected a duration like 5s or 250ms, got '1m30s'"),
        ("-1s", "expected a duration like 5s or 250ms, got '-1s'"),
        ("", "expected a duration like 5s or 250ms, got ''"),
        (-1, "expected a duration like 5s or 250ms, got -1"),
        (True, "expected a duration like 5s or 250ms, got true"),
        (None, "expected a duration like 5s or 250ms, got null"),
        (float("inf"), "expected a duration like 5s or 250ms, got inf"),
        ("366d", "expected a duration of at most 365d, got '366d'"),
    ],
)
def test_parse_duration_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value) == message


def test_durations_in_a_file() -> None:
    text = MINIMAL.replace(
        "    default_backend: app\n",
        "    default_backend: app\n    timeout: {connect: 250ms, client: 3, server: 1.5, "
        "tunnel: 2d, queue: 90us, check: '4'}\n",
    )
    t = loads(text).frontends["web"].timeouts
    assert (t.connect, t.client, t.server, t.tunnel, t.queue, t.check) == (
        0.25, 3.0, 1.5, 172800.0, 0.00009, 4.0
    )
    text = "global: {hard-stop-after: 30m}\n" + MINIMAL
    assert loads(text).global_.hard_stop_after == 1800.0
    assert error_of("global: {hard-stop-after: yes}\n" + MINIMAL) == (
        "t.cfg:1: global.hard-stop-after: expected a duration like 5s or 250ms, got true"
    )


@pytest.mark.parametrize(
    ("value", "size"),
    [(0, 0), (16384, 16384), ("16k", 16384), ("2K", 2048), ("1m", 1048576),
     ("1g", 1073741824), ("10", 10)],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["16kb", "1.5k", "k", "", "16 k", "1t", -1, True, 1.5, None])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError, match=r"^expected a size like 16k or 1m, got "):
        parse_size(value)


def test_sizes_in_a_file() -> None:
    assert loads("global: {max-header-size: 64k}\n" + MINIMAL).global_.max_header_size == 65536
    assert error_of("global: {max-header-size: 0}\n" + MINIMAL) == (
        "t.cfg:1: global.max-header-size: expected a size greater than 0, got 0"
    )


@pytest.mark.parametrize(
    ("text", "host", "port", "shown", "family"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080, "127.0.0.1:8080", socket.AF_INET),
        ("*:80", "0.0.0.0", 80, "0.0.0.0:80", socket.AF_INET),
        (":80", "0.0.0.0", 80, "0.0.0.0:80", socket.AF_INET),
        ("localhost:1", "127.0.0.1", 1, "127.0.0.1:1", socket.AF_INET),
        ("0.0.0.0:65535", "0.0.0.0", 65535, "0.0.0.0:65535", socket.AF_INET),
        ("[::1]:8080", "::1", 8080, "[::1]:8080", socket.AF_INET6),
        ("[::]:443", "::", 443, "[::]:443", socket.AF_INET6),
        ("[2001:DB8:0::0001]:80", "2001:db8::1", 80, "[2001:db8::1]:80", socket.AF_INET6),
    ],
)
def test_parse_bind_address(
    text: str, host: str, port: int, shown: str, family: socket.AddressFamily
) -> None:
    address = parse_bind_address(text)
    assert address == Address(host, port)
    assert str(address) == shown
    assert address.family == family


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1:65536", "invalid port '65536' in '127.0.0.1:65536' (expected 1 to 65535)"),
        ("127.0.0.1:", "invalid port '' in '127.0.0.1:' (expected 1 to 65535)"),
        ("127.0.0.1:8o", "invalid port '8o' in '127.0.0.1:8o' (expected 1 to 65535)"),
        ("127.0.0.1:-1", "invalid port '-1' in '127.0.0.1:-1' (expected 1 to 65535)"),
        ("8080", "expected HOST:PORT like 127.0.0.1:8080, [::1]:8080 or *:8080, got '8080'"),
        ("[::1]8080", "expected HOST:PORT like 127.0.0.1:8080, [::1]:8080 or *:8080, "
                      "got '[::1]8080'"),
        ("127.0.0.1 :80", "expected HOST:PORT like 127.0.0.1:8080, [::1]:8080 or *:8080, "
                          "got '127.0.0.1 :80'"),
        ("[1.2.3.4]:80", "invalid IPv6 address '1.2.3.4' in '[1.2.3.4]:80'"),
        ("1.2.3.256:80", "bind host must be an IP address, localhost or *, got '1.2.3.256'"),
        ("127.1:80", "bind host must be an IP address, localhost or *, got '127.1'"),
        ("fe80::1:80", "IPv6 addresses need brackets, like [::1]:8080, got 'fe80::1:80'"),
    ],
)
def test_parse_bind_address_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_bind_address(text)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("text", "host", "family"),
    [
        ("app.example.com:80", "app.example.com", socket.AF_INET),
        ("db-1:5432", "db-1", socket.AF_INET),
        ("my_service:8000", "my_service", socket.AF_INET),
        ("localhost:80", "localhost", socket.AF_INET),
        ("example.com.:80", "example.com.", socket.AF_INET),
        ("10.0.0.5:80", "10.0.0.5", socket.AF_INET),
        ("[2001:db8::1]:443", "2001:db8::1", socket.AF_INET6),
    ],
)
def test_parse_server_address(text: str, host: str, family: socket.AddressFamily) -> None:
    address = parse_server_address(text)
    assert address.host == host
    assert address.family == family


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("*:80", "a server address needs a host, got '*:80'"),
        (":80", "a server address needs a host, got ':80'"),
        ("-bad:80", "invalid host name '-bad'"),
        ("a..b:80", "invalid host name 'a..b'"),
        ("x" * 64 + ".com:80", f"invalid host name '{'x' * 64}.com'"),
        ("300.1.1.1:80", "invalid IPv4 address '300.1.1.1'"),
        ("app:0", "invalid port '0' in 'app:0' (expected 1 to 65535)"),
    ],
)
def test_parse_server_address_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_server_address(text)
    assert str(info.value) == message


def test_bind_lists() -> None:
    text = MINIMAL.replace(
        "    bind: 127.0.0.1:8080\n", "    bind:\n      - 127.0.0.1:8080\n      - '[::1]:8080'\n"
    )
    assert loads(text).frontends["web"].binds == (
        Address("127.0.0.1", 8080),
        Address("::1", 8080),
    )
    text = MINIMAL.replace("    bind: 127.0.0.1:8080\n", "    bind:\n      - :80\n      - 80\n")
    assert error_of(text) == (
        "t.cfg:5: frontends.web.bind: expected HOST:PORT like 127.0.0.1:8080, [::1]:8080 or "
        "*:8080, got '80'"
    )
    assert error_of(MINIMAL.replace("127.0.0.1:8080", "[]")) == (
        "t.cfg:3: frontends.web.bind: expected at least one address"
    )


@pytest.mark.parametrize(
    ("written", "mode"), [('"660"', 0o660), ("660", 0o660), ("0660", 0o660), ("'0o640'", 0o640),
                          ("0", 0), ("777", 0o777)]
)
def test_stats_socket_mode_is_octal(written: str, mode: int) -> None:
    cfg = loads(f"global:\n  stats:\n    socket: /tmp/s\n    mode: {written}\n" + MINIMAL)
    assert cfg.global_.stats is not None
    assert cfg.global_.stats.mode == mode


def test_stats_socket_defaults_and_options() -> None:
    cfg = loads("global: {stats: {socket: run/x.sock}}\n" + MINIMAL)
    assert cfg.global_.stats == StatsSocket(
        "run/x.sock", 0o600, None, None, "operator", False, 10.0
    )
    text = (
        "global:\n  stats: {socket: /run/lb.sock, user: haproxy, group: 1000, level: user,\n"
        "          expose-fd: listeners, timeout: 1m}\n"
    )
    cfg = loads(text + MINIMAL)
    assert cfg.global_.stats == StatsSocket("/run/lb.sock", 0o600, "haproxy", "1000", "user",
                                            True, 60.0)
    assert error_of("global: {stats: {level: admin}}\n" + MINIMAL) == (
        "t.cfg:1: global.stats: missing required key socket"
    )


@pytest.mark.parametrize(
    ("written", "log"), [("stderr", "stderr"), ("/var/log/pylb.log", "/var/log/pylb.log"),
                         ("'udp@127.0.0.1:514'", "udp@127.0.0.1:514"),
                         ("'udp@logs.internal:514'", "udp@logs.internal:514"),
                         ("unix@/dev/log", "unix@/dev/log"), ("log/pylb.log", "log/pylb.log")]
)
def test_log_targets(written: str, log: str) -> None:
    assert loads(f"global: {{log: {written}}}\n" + MINIMAL).global_.log == log


def test_balance_and_cookie() -> None:
    text = MINIMAL.replace("  app:\n", "  app:\n    balance: hdr(X-User)\n")
    app = loads(text).backends["app"]
    assert (app.balance, app.balance_arg) == ("hdr", "X-User")
    text = MINIMAL.replace("  app:\n", "  app:\n    balance: static-rr\n    cookie: {name: SRV}\n")
    app = loads(text).backends["app"]
    assert (app.balance, app.balance_arg) == ("static-rr", None)
    assert app.cookie == Cookie("SRV", "insert", False, False)
    assert error_of(MINIMAL.replace("  app:\n", "  app:\n    cookie: {mode: prefix}\n")) == (
        "t.cfg:7: backends.app.cookie: missing required key name"
    )
    assert error_of(MINIMAL.replace("  app:\n", "  app:\n    balance: hdr(X User)\n")) == (
        "t.cfg:7: backends.app.balance: expected a header name in hdr(NAME), got 'hdr(X User)'"
    )


def test_server_cookie_and_options() -> None:
    text = MINIMAL.replace(
        "        address: 127.0.0.1:9001\n",
        "        address: 127.0.0.1:9001\n        cookie: 1\n        backup: yes\n"
        "        maxconn: 50\n        maxqueue: 10\n        weight: 0\n        fall: 1\n",
    )
    (s1,) = loads(text).backends["app"].servers
    assert (s1.cookie, s1.backup, s1.maxconn, s1.maxqueue, s1.weight, s1.fall) == (
        "1", True, 50, 10, 0, 1
    )
    bad = MINIMAL.replace("127.0.0.1:9001\n", "127.0.0.1:9001\n        cookie: 'a;b'\n")
    assert error_of(bad) == (
        "t.cfg:10: backends.app.servers.s1.cookie: expected a cookie value "
        "(no spaces, quotes, commas, semicolons or \\), got 'a;b'"
    )


def test_request_log_target_per_frontend() -> None:
    assert loads(MINIMAL).frontends["web"].log is None
    text = MINIMAL.replace("backends:", "  api:\n    bind: ':81'\n    log: ~\nbackends:")
    cfg = loads("defaults:\n  log: /var/log/pylb/access.log\n" + text)
    assert cfg.frontends["web"].log == "/var/log/pylb/access.log"  # from defaults
    assert cfg.frontends["api"].log is None  # null turns it off
    assert cfg.global_.log == "stderr"  # the process log is separate
    for written, log in [("stderr", "stderr"), ("'udp@127.0.0.1:514'", "udp@127.0.0.1:514"),
                         ("'udp@[::1]:514'", "udp@[::1]:514"), ("unix@/dev/log", "unix@/dev/log"),
                         ("log/access.log", "log/access.log")]:
        text = MINIMAL.replace("    default_backend", f"    log: {written}\n    default_backend")
        assert loads(text).frontends["web"].log == log
    # a tcp frontend logs too (tcplog format)
    text = "defaults: {mode: tcp, log: stderr}\n" + MINIMAL
    assert loads(text).frontends["web"].log == "stderr"


def test_stick_table_defaults_and_values() -> None:
    cfg = loads(MINIMAL.replace("  app:\n", "  app:\n    stick-table: {}\n"))
    assert cfg.backends["app"].stick_table == StickTable(type="ip", size=102400, expire=None)
    assert cfg.backends["app"].stick_on is None  # a table alone is allowed
    for written, size in [("100k", 102400), ("1m", 1048576), ("5000", 5000), ("2K", 2048)]:
        text = MINIMAL.replace(
            "  app:\n", f"  app:\n    stick-table: {{type: string, size: {written}, "
            "expire: 30m}\n")
        assert loads(text).backends["app"].stick_table == StickTable("string", size, 1800.0)


@pytest.mark.parametrize(
    ("written", "parsed"),
    [("src", ("src", None)), ("req.cook(SESSIONID)", ("cookie", "SESSIONID")),
     ("req.hdr(X-User)", ("hdr", "x-user")), ("'req.hdr(x-api-key)'", ("hdr", "x-api-key"))],
)
def test_stick_on(written: str, parsed: tuple[str, str | None]) -> None:
    text = MINIMAL.replace(
        "  app:\n", f"  app:\n    stick-table: {{type: string}}\n    stick-on: {written}\n"
    )
    assert loads(text).backends["app"].stick_on == parsed


def test_stick_table_and_stick_on_from_defaults() -> None:
    text = (
        "defaults:\n  stick-table: {size: 1k, expire: 1h}\n  stick-on: src\n" + MINIMAL
        + "  other:\n    stick-table: {type: string}\n    stick-on: req.cook(S)\n"
        "    servers: {s1: {address: '127.0.0.1:9002'}}\n"
    )
    cfg = loads(text)
    app, other = cfg.backends["app"], cfg.backends["other"]
    assert (app.stick_table, app.stick_on) == (StickTable("ip", 1024, 3600.0), ("src", None))
    # a backend's own stick-table replaces the one of defaults as a whole (no merging)
    assert (other.stick_table, other.stick_on) == (StickTable("string", 102400, None),
                                                   ("cookie", "S"))
    # stick-on src in tcp mode is fine
    cfg = loads("defaults: {mode: tcp, stick-table: {}, stick-on: src}\n" + MINIMAL)
    assert cfg.backends["app"].stick_on == ("src", None)
    # stick-on: ~ in a backend cancels the one of defaults
    text = "defaults: {stick-table: {}, stick-on: src}\n" + MINIMAL.replace(
        "  app:\n", "  app:\n    stick-on: ~\n")
    assert loads(text).backends["app"].stick_on is None


# -- cross checks -----------------------------------------------------------------------------


def test_duplicate_binds() -> None:
    text = MINIMAL.replace(
        "backends:",
        "  other:\n    bind: ['127.0.0.2:80', '*:8080']\n    default_backend: app\nbackends:",
    ).replace("127.0.0.1:8080", "0.0.0.0:8080")
    assert error_of(text) == (
        "t.cfg:6: frontends.other.bind: 0.0.0.0:8080 is already bound by frontends.web (line 3)"
    )
    text = MINIMAL.replace(
        "    bind: 127.0.0.1:8080\n",
        "    bind:\n      - 127.0.0.1:8080\n      - '[::1]:80'\n      - localhost:8080\n",
    )
    assert error_of(text) == (
        "t.cfg:6: frontends.web.bind: 127.0.0.1:8080 is already bound by frontends.web (line 4)"
    )
    text = MINIMAL.replace(
        "    bind: 127.0.0.1:8080\n", "    bind: ['[::1]:80', '[0:0::1]:80']\n"
    )
    assert error_of(text) == (
        "t.cfg:3: frontends.web.bind: [::1]:80 is already bound by frontends.web (line 3)"
    )
    # same port on different addresses, or IPv4 and IPv6 wildcards, is allowed
    text = MINIMAL.replace(
        "    bind: 127.0.0.1:8080\n", "    bind: ['127.0.0.1:80', '127.0.0.2:80', '[::]:80']\n"
    )
    assert len(loads(text).frontends["web"].binds) == 3


def test_default_backend_must_exist() -> None:
    assert error_of(MINIMAL.replace("default_backend: app", "default_backend: ap")) == (
        "t.cfg:4: frontends.web.default_backend: no backend named 'ap' (did you mean app?)"
    )
    assert error_of(MINIMAL.replace("default_backend: app", "default_backend: static")) == (
        "t.cfg:4: frontends.web.default_backend: no backend named 'static'"
    )
    # no default_backend at all is allowed (requests get a 503)
    cfg = loads(MINIMAL.replace("    default_backend: app\n", ""))
    assert cfg.frontends["web"].default_backend is None


def test_frontend_and_backend_modes_must_match() -> None:
    tcp_backend = MINIMAL.replace("  app:\n", "  app:\n    mode: tcp\n")
    assert error_of(tcp_backend) == (
        "t.cfg:4: frontends.web.default_backend: "
        "backend 'app' is mode tcp but frontend 'web' is mode http"
    )
    tcp_frontend = MINIMAL.replace("    default_backend: app\n", "    default_backend: app\n"
                                   "    mode: tcp\n")
    assert error_of(tcp_frontend) == (
        "t.cfg:4: frontends.web.default_backend: "
        "backend 'app' is mode http but frontend 'web' is mode tcp"
    )
    both_tcp = "defaults:\n  mode: tcp\n" + MINIMAL
    cfg = loads(both_tcp)
    assert cfg.frontends["web"].mode == cfg.backends["app"].mode == "tcp"


def test_http_only_backend_features_need_http_mode() -> None:
    text = "defaults: {mode: tcp, balance: uri}\n" + MINIMAL
    assert error_of(text) == (
        "t.cfg:1: defaults.balance: balance uri needs mode http (backend 'app' is mode tcp)"
    )
    text = "defaults: {mode: tcp}\n" + MINIMAL.replace("  app:\n", "  app:\n    cookie:\n"
                                                        "      name: S\n")
    assert error_of(text) == (
        "t.cfg:9: backends.app.cookie: cookie needs mode http (backend 'app' is mode tcp)"
    )


def test_stick_on_checks() -> None:
    # stick-on needs a stick-table
    text = MINIMAL.replace("  app:\n", "  app:\n    balance: source\n    stick-on: src\n")
    assert error_of(text) == (
        "t.cfg:8: backends.app.stick-on: stick-on needs a stick-table (backend 'app' has none)"
    )
    # ... also when it comes from defaults, and the backend cancels the table
    text = "defaults:\n  stick-table: {}\n  stick-on: src\n" + MINIMAL.replace(
        "  app:\n", "  app:\n    stick-table: ~\n")
    assert error_of(text) == (
        "t.cfg:3: defaults.stick-on: stick-on needs a stick-table (backend 'app' has none)"
    )
    # cookies and headers need HTTP
    text = "defaults: {mode: tcp}\n" + MINIMAL.replace(
        "  app:\n", "  app:\n    stick-table: {type: string}\n    stick-on: req.cook(SID)\n")
    assert error_of(text) == (
        "t.cfg:9: backends.app.stick-on: stick-on req.cook(SID) needs mode http "
        "(backend 'app' is mode tcp)"
    )
    text = "defaults: {mode: tcp, stick-table: {type: string}, stick-on: req.hdr(X-User)}\n"
    assert error_of(text + MINIMAL) == (
        "t.cfg:1: defaults.stick-on: stick-on req.hdr(X-User) needs mode http "
        "(backend 'app' is mode tcp)"
    )
    # ... and a string table: their values are not addresses
    text = MINIMAL.replace(
        "  app:\n", "  app:\n    stick-table:\n      size: 10k\n    stick-on: req.hdr(X-User)\n")
    assert error_of(text) == (
        "t.cfg:9: backends.app.stick-on: stick-on req.hdr(X-User) needs a stick-table of "
        "type string (backend 'app' has type ip)"
    )
    # src with a string table stores the address as text: allowed
    text = MINIMAL.replace(
        "  app:\n", "  app:\n    stick-table: {type: string}\n    stick-on: src\n")
    assert loads(text).backends["app"].stick_on == ("src", None)


# -- the objects ------------------------------------------------------------------------------


def test_objects_are_frozen_and_errors_pickle() -> None:
    cfg = loads(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.frontends["web"].maxconn = 1  # type: ignore[misc]
    err = ConfigError("unknown key", path="a.cfg", line=3, key="x.y")
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == "a.cfg:3: x.y: unknown key"
    assert (copy.path, copy.line, copy.key, copy.message) == ("a.cfg", 3, "x.y", "unknown key")
    assert str(ConfigError("plain")) == "plain"
    assert str(ConfigError("m", path="p")) == "p: m"


# -- the documentation ------------------------------------------------------------------------


def _yaml_blocks() -> list[str]:
    text = (ROOT / "docs" / "configuration.md").read_text()
    return [block.split("```", 1)[0] for block in text.split("```yaml\n")[1:]]


def test_docs_show_the_example_file_and_a_loadable_second_example() -> None:
    blocks = _yaml_blocks()  # fragments in the text, then the two complete examples
    first, second = blocks[-2:]
    assert first == example_text()
    cfg = loads(second, "docs")
    assert cfg.frontends["pg"].binds == (Address("10.0.0.1", 5432), Address("2001:db8::1", 5432))
    assert cfg.frontends["pg"].timeouts.client == 3600.0
    assert [(s.name, s.check, s.inter, s.fall, s.backup) for s in cfg.backends["pg"].servers] == [
        ("db1", True, 5.0, 2, False),
        ("db2", True, 5.0, 2, True),
    ]


def test_docs_mention_every_key() -> None:
    from lb.config import schema

    docs = (ROOT / "docs" / "configuration.md").read_text()
    tables = [schema.ROOT, schema.GLOBAL, schema.STATS, schema.DEFAULTS, schema.TIMEOUT,
              schema.FRONTEND, schema.BACKEND, schema.HTTP_CHECK, schema.COOKIE, schema.SERVER,
              schema.STICK_TABLE, schema.STATS_PAGE, schema.PROMETHEUS_PAGE]
    missing = sorted({key for table in tables for key in table if f"| `{key}`" not in docs})
    assert missing == []


# -- HTTP rules: acl, http-request, use_backend, monitor, errorfile, maps ---------------------

RULES = """\
frontends:
  web:
    bind: 127.0.0.1:8080
    default_backend: app
    acl:
      is_api: path_beg /api
      maint: var(proc.maintenance_mode) -m str on
    http-request:
      - deny if maint !is_api
    use_backend:
      - api if is_api
    monitor-uri: /alive
    monitor-fail: maint
backends:
  app:
    servers:
      s1:
        address: 127.0.0.1:9001
  api:
    servers:
      s1:
        address: 127.0.0.1:9002
"""


@pytest.fixture
def rule_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Map and error files, relative to the current directory as pylb reads them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "hosts.map").write_text("www.example.com app\n")
    (tmp_path / "errors").mkdir()
    (tmp_path / "errors" / "503.http").write_text("HTTP/1.1 503 Sorry\n\ndown\n")
    (tmp_path / "errors" / "maint.html").write_text("<h1>maintenance</h1>\n")
    (tmp_path / "errors" / "bad.http").write_text("<h1>not a response</h1>\n")
    return tmp_path


def test_rules_load_into_the_model() -> None:
    from lb.config.model import Acl, AclTest, AclUse, Condition, DenyRule, Sample, UseBackend

    cfg = loads(RULES)
    web = cfg.frontends["web"]
    maint = AclTest(
        Sample("var", ("proc.maintenance_mode",), (), "var(proc.maintenance_mode)"),
        "str", False, "eq", ("on",), "var(proc.maintenance_mode) -m str on", 7,
    )
    is_api = AclTest(Sample("path", (), (), "path_beg"), "beg", False, "eq", ("/api",),
                     "path_beg /api", 6)
    assert web.acl == (Acl("is_api", (is_api,), 6), Acl("maint", (maint,), 7))
    assert web.http_request == (
        DenyRule(web.http_request[0].payload,  # type: ignore[union-attr]
                 Condition(False, ((AclUse("maint", None, False), AclUse("is_api", None, True)),),
                           "if maint !is_api"), 9),
    )
    assert web.http_request[0].payload.status == 403  # type: ignore[union-attr]
    assert web.use_backend == (
        UseBackend("api", None, Condition(False, ((AclUse("is_api", None, False),),),
                                          "if is_api"), 11),
    )
    assert web.monitor_uri == "/alive"
    assert web.monitor_fail == Condition(False, ((AclUse("maint", None, False),),), "if maint")
    assert (web.errorfiles, cfg.maps) == ((), {})
    assert hash(web)  # still a plain frozen value
    plain = loads(MINIMAL).frontends["web"]
    assert (plain.acl, plain.http_request, plain.use_backend) == ((), (), ())
    assert (plain.monitor_uri, plain.monitor_fail, plain.errorfiles) == (None, None, ())


def test_rules_with_files(rule_files: Path) -> None:
    text = RULES.replace("    monitor-fail: maint\n", """\
    monitor-fail: maint
    errorfile:
      503: errors/503.http
""").replace("      - deny if maint !is_api\n", """\
      - return status 503 content-type text/html file errors/maint.html if maint !is_api
""").replace("      - api if is_api\n", """\
      - api if is_api
      - "%[hdr(host),lower,map(hosts,app)]"
""") + "maps:\n  hosts: maps/hosts.map\n"
    cfg = loads(text)
    web = cfg.frontends["web"]
    assert cfg.maps == {"hosts": "maps/hosts.map"}
    (errorfile,) = web.errorfiles
    assert (errorfile.status, errorfile.path) == (503, "errors/503.http")
    assert errorfile.response == (
        b"HTTP/1.1 503 Sorry\r\nContent-Length: 5\r\nConnection: close\r\n\r\ndown\n"
    )
    rule = web.http_request[0]
    assert rule.payload.body == b"<h1>maintenance</h1>\n"  # type: ignore[union-attr]
    assert rule.payload.content_type == "text/html"  # type: ignore[union-attr]
    dynamic = web.use_backend[1]
    assert (dynamic.backend, dynamic.cond) == ("%[hdr(host),lower,map(hosts,app)]", None)
    assert dynamic.dynamic is not None and dynamic.dynamic[0].converters == (  # type: ignore[union-attr]
        ("lower", ()), ("map", ("hosts", "app"))
    )
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_a_single_rule_may_be_a_string_and_acl_lines_a_list() -> None:
    text = RULES.replace("      is_api: path_beg /api\n",
                         "      is_api:\n        - path_beg /api\n        - path_end .json\n")
    text = text.replace("    use_backend:\n      - api if is_api\n",
                        "    use_backend: api if is_api\n")
    web = loads(text).frontends["web"]
    assert [(t.match, t.values, t.line) for t in web.acl[0].tests] == [
        ("beg", ("/api",), 7), ("end", (".json",), 8)
    ]
    assert [u.backend for u in web.use_backend] == ["api"]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # unknown fetches, matchers, converters, flags and actions
        ("is_api: path_beg /api", "is_api: pth_beg /api",
         "t.cfg:6: frontends.web.acl.is_api: unknown fetch 'pth_beg' (did you mean path_beg?)"),
        ("-m str on", "-m exact on",
         "t.cfg:7: frontends.web.acl.maint: unknown match method 'exact'; expected str, beg, "
         "end, sub, reg, len, found, bool, int or ip"),
        ("is_api: path_beg /api", "is_api: hdr(host),lowercase x",
         "t.cfg:6: frontends.web.acl.is_api: unknown converter 'lowercase' (did you mean "
         "lower?); expected lower, upper, map, map_str, map_beg, map_dom or map_ip"),
        ("is_api: path_beg /api", "is_api: path -x /a",
         "t.cfg:6: frontends.web.acl.is_api: unknown ACL flag '-x' (write -- before a value "
         "that starts with -)"),
        ("is_api: path_beg /api", "is_api: path -f list.acl",
         "t.cfg:6: frontends.web.acl.is_api: ACL flag -f is not supported by pylb"),
        ("- deny if maint !is_api", "- block if maint",
         "t.cfg:9: frontends.web.http-request: unknown action 'block'; expected deny, "
         "redirect, return, set-header, add-header, del-header, track-sc0, track-sc1, "
         "track-sc2, sc-inc-gpc0 or disable-l7-retry"),
        ("- deny if maint !is_api", "- deny when maint",
         "t.cfg:9: frontends.web.http-request: unknown deny option 'when'; expected status, "
         "content-type, default-errorfiles, errorfile, file, string, hdr or deny_status, then "
         "if or unless"),
        ("- deny if maint !is_api", "- redirect location /x cod 301",
         "t.cfg:9: frontends.web.http-request: unknown redirect option 'cod' (did you mean "
         "code?); expected code, drop-query or append-slash, then if or unless"),
        ("- deny if maint !is_api", "- redirect location /x set-cookie A=1",
         "t.cfg:9: frontends.web.http-request: redirect option set-cookie is not supported "
         "by pylb"),
        # references to ACLs, backends and maps
        ("- deny if maint !is_api", "- deny if mant",
         "t.cfg:9: frontends.web.http-request: no ACL named 'mant' (did you mean maint?)"),
        ("- api if is_api", "- api if is_ap1",
         "t.cfg:11: frontends.web.use_backend: no ACL named 'is_ap1' (did you mean is_api?)"),
        ("monitor-fail: maint", "monitor-fail: site_dead || maint",
         "t.cfg:13: frontends.web.monitor-fail: no ACL named 'site_dead'"),
        ("- api if is_api", "- apii if is_api",
         "t.cfg:11: frontends.web.use_backend: no backend named 'apii' (did you mean api?)"),
        ("maint: var(proc.maintenance_mode) -m str on", "maint: nbsrv(ap) lt 1",
         "t.cfg:7: frontends.web.acl.maint: no backend named 'ap' (did you mean app?)"),
        ("- deny if maint !is_api", "- deny if { nbsrv(db) lt 1 }",
         "t.cfg:9: frontends.web.http-request: no backend named 'db'"),
        ("is_api: path_beg /api", "is_api: hdr(host),map(hosts) -m found",
         "t.cfg:6: frontends.web.acl.is_api: no map named 'hosts' in the maps section"),
        ("- deny if maint !is_api", "- set-header X-B %[hdr(host),map(hosts)]",
         "t.cfg:9: frontends.web.http-request: no map named 'hosts' in the maps section"),
        # ACL syntax
        ("is_api: path_beg /api", "is_api: path_beg",
         "t.cfg:6: frontends.web.acl.is_api: expected at least one value to match after "
         "path_beg (or -m found to test presence)"),
        ("is_api: path_beg /api", "is_api: hdr(x) -m found yes",
         "t.cfg:6: frontends.web.acl.is_api: -m found takes no values, got 'yes'"),
        ("is_api: path_beg /api", "is_api: path_beg -m sub /api",
         "t.cfg:6: frontends.web.acl.is_api: path_beg already means -m beg; write path -m sub"),
        ("is_api: path_beg /api", "is_api: hdr_beg(x_y) -m sub /api",
         "t.cfg:6: frontends.web.acl.is_api: hdr_beg already means -m beg; write hdr(x_y) "
         "-m sub"),
        ("is_api: path_beg /api", "is_api: path_beg,lower /api",
         "t.cfg:6: frontends.web.acl.is_api: path_beg cannot be followed by converters; write "
         "path,lower -m beg"),
        ("is_api: path_beg /api", "is_api: nbsrv(app) -i lt 1",
         "t.cfg:6: frontends.web.acl.is_api: -i only applies to string matches, not -m int"),
        ("is_api: path_beg /api", "is_api: src -m int 1",
         "t.cfg:6: frontends.web.acl.is_api: -m int cannot match src, which gives an ip"),
        ("is_api: path_beg /api", "is_api: path_reg ^/(api",
         "t.cfg:6: frontends.web.acl.is_api: invalid regex '^/(api': missing ), unterminated "
         "subpattern at position 2"),
        ("is_api: path_beg /api", "is_api: src 10.0.0.0/33",
         "t.cfg:6: frontends.web.acl.is_api: invalid netmask '33' in '10.0.0.0/33'"),
        ("is_api: path_beg /api", "is_api: src example.com",
         "t.cfg:6: frontends.web.acl.is_api: expected an IP address or network like "
         "10.0.0.0/8, got 'example.com' (host names are not supported)"),
        ("maint: var(proc.maintenance_mode) -m str on", "maint: nbsrv(app) lt x",
         "t.cfg:7: frontends.web.acl.maint: expected an integer or a range like 10:20, got 'x'"),
        ("maint: var(proc.maintenance_mode) -m str on", "maint: nbsrv(app) lt 1:3",
         "t.cfg:7: frontends.web.acl.maint: lt cannot be used with a range ('1:3')"),
        ("maint: var(proc.maintenance_mode) -m str on", "maint: var(txn.x) on",
         "t.cfg:7: frontends.web.acl.maint: only proc.NAME variables exist in pylb (set with "
         "'set var' on the stats socket), got 'txn.x'"),
        ("is_api: path_beg /api", "is_api: hdr(host,1) a",
         "t.cfg:6: frontends.web.acl.is_api: hdr takes one argument, a header name"),
        ("is_api: path_beg /api", "is_api: nbsrv lt 1",
         "t.cfg:6: frontends.web.acl.is_api: nbsrv needs a backend name: nbsrv(NAME)"),
        ("is_api: path_beg /api", "is_api:",
         "t.cfg:6: frontends.web.acl.is_api: expected an ACL like path_beg /api, got null"),
        ("is_api: path_beg /api", "'is api': path_beg /api",
         "t.cfg:6: frontends.web.acl.is api: invalid ACL name (use letters, digits and - _ . :)"),
        # conditions
        ("- deny if maint !is_api", "- deny if",
         "t.cfg:9: frontends.web.http-request: if needs a condition"),
        ("- deny if maint !is_api", "- deny if maint ||",
         "t.cfg:9: frontends.web.http-request: || needs an ACL on each side"),
        ("- deny if maint !is_api", "- deny if { path_beg /x",
         "t.cfg:9: frontends.web.http-request: missing } after {"),
        ("- deny if maint !is_api", "- deny if {path_beg /x }",
         "t.cfg:9: frontends.web.http-request: braces must be separate words: { path_beg /x }"),
        ("- deny if maint !is_api", "- deny if a/b",
         "t.cfg:9: frontends.web.http-request: expected an ACL name, got 'a/b'"),
        ("monitor-fail: maint", "monitor-fail: !maint",
         't.cfg:13: frontends.web.monitor-fail: YAML reads a leading ! as a tag: quote the '
         'value, like "!maint"'),
        ("- deny if maint !is_api", "- deny if maint\n      - 42",
         "t.cfg:10: frontends.web.http-request: unknown action '42'; expected deny, redirect, "
         "return, set-header, add-header, del-header, track-sc0, track-sc1, track-sc2, "
         "sc-inc-gpc0 or disable-l7-retry"),
        ("- deny if maint !is_api", "- {deny: maint}",
         "t.cfg:9: frontends.web.http-request: expected a rule like deny if blocked, "
         "got a mapping"),
        # actions' arguments
        ("- deny if maint !is_api", "- deny deny_status 418",
         "t.cfg:9: frontends.web.http-request: default-errorfiles needs a status pylb has an "
         "error page for (200, 400, 401, 403, 404, 405, 407, 408, 410, 413, 414, 425, 429, "
         "431, 500, 501, 502, 503 or 504), got 418"),
        ("- deny if maint !is_api", "- redirect location /x code 304",
         "t.cfg:9: frontends.web.http-request: expected a redirect code (301, 302, 303, 307 "
         "or 308), got '304'"),
        ("- deny if maint !is_api", "- redirect to /x",
         "t.cfg:9: frontends.web.http-request: expected redirect location|prefix|scheme VALUE "
         "[code N]"),
        ("- deny if maint !is_api", "- return string hello",
         "t.cfg:9: frontends.web.http-request: string needs content-type, like content-type "
         "text/html"),
        ("- deny if maint !is_api", "- return status 700",
         "t.cfg:9: frontends.web.http-request: expected a status from 200 to 599, got '700'"),
        ("- deny if maint !is_api", "- set-header X-Time %T",
         "t.cfg:9: frontends.web.http-request: unsupported %T in '%T': only %[sample] and %% "
         "(a literal %) are supported"),
        ("- deny if maint !is_api", "- set-header X-Path",
         "t.cfg:9: frontends.web.http-request: expected set-header NAME VALUE"),
        ("- deny if maint !is_api", "- del-header X:Y",
         "t.cfg:9: frontends.web.http-request: expected a header name, got 'X:Y'"),
        ("- api if is_api", "- '%[path_beg]'",
         "t.cfg:11: frontends.web.use_backend: path_beg is an ACL keyword; write path here"),
        ("- api if is_api", "- '%[hdr(host)'",
         "t.cfg:11: frontends.web.use_backend: missing ] after %[ in '%[hdr(host)'"),
        ("- api if is_api", "- 'a b'",
         "t.cfg:11: frontends.web.use_backend: unexpected 'b' (expected if or unless)"),
        ("monitor-uri: /alive", "monitor-uri: /a b",
         "t.cfg:12: frontends.web.monitor-uri: expected a URI like /site_alive, got '/a b'"),
        ("    monitor-uri: /alive\n", "",
         "t.cfg:12: frontends.web.monitor-fail: monitor-fail needs monitor-uri"),
        ("    monitor-uri: /alive\n", "    monitor-uri: /alive\n    errorfile: {418: x.http}\n",
         "t.cfg:13: frontends.web.errorfile.418: expected one of 200, 400, 401, 403, 404, 405, "
         "407, 408, 410, 413, 414, 425, 429, 431, 500, 501, 502, 503 or 504, got '418'"),
        # rules live in frontends only
        ("frontends:", "defaults:\n  acl: {a: path /}\nfrontends:",
         "t.cfg:2: defaults.acl: unknown key (did you mean backlog?)"),
        ("  app:\n", "  app:\n    http-request: [deny]\n",
         "t.cfg:16: backends.app.http-request: unknown key"),
    ],
)
def test_rule_errors(old: str, new: str, expected: str) -> None:
    assert old in RULES
    assert error_of(RULES.replace(old, new, 1)) == expected


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("    monitor-uri: /alive\n",
         "    monitor-uri: /alive\n    errorfile:\n      503: errors/nope.http\n",
         "t.cfg:14: frontends.web.errorfile.503: cannot read errorfile 'errors/nope.http': "
         "No such file or directory"),
        ("    monitor-uri: /alive\n",
         "    monitor-uri: /alive\n    errorfile:\n      503: errors/bad.http\n",
         "t.cfg:14: frontends.web.errorfile.503: errorfile 'errors/bad.http' has no empty line "
         "after its headers"),
        ("    monitor-uri: /alive\n",
         "    monitor-uri: /alive\n    errorfile:\n      503: errors\n",
         "t.cfg:14: frontends.web.errorfile.503: cannot read errorfile 'errors': Is a directory"),
        ("backends:", "maps:\n  hosts: maps/nope.map\nbackends:",
         "t.cfg:15: maps.hosts: cannot read map file 'maps/nope.map': No such file or directory"),
        ("backends:", "maps:\n  'host map': maps/hosts.map\nbackends:",
         "t.cfg:15: maps.host map: invalid map name (use letters, digits and - _ . :)"),
        ("- deny if maint !is_api", "- return status 200 content-type text/html file nope.html",
         "t.cfg:9: frontends.web.http-request: cannot read file 'nope.html': No such file or "
         "directory"),
        ("- deny if maint !is_api", "- deny errorfile errors/bad.http",
         "t.cfg:9: frontends.web.http-request: errorfile 'errors/bad.http' has no empty line "
         "after its headers"),
        ("- api if is_api", "- '%[hdr(host),map(hosts,nope)]'",
         "t.cfg:11: frontends.web.use_backend: no backend named 'nope'"),
    ],
)
def test_rule_file_errors(rule_files: Path, old: str, new: str, expected: str) -> None:
    text = RULES + "maps:\n  hosts: maps/hosts.map\n" if "maps:" not in new else RULES
    assert old in text
    assert error_of(text.replace(old, new, 1)) == expected


def test_map_files_are_checked_for_utf8(rule_files: Path) -> None:
    (rule_files / "maps" / "bin.map").write_bytes(b"a b\n\xff c\n")
    assert error_of(RULES + "maps:\n  bin: maps/bin.map\n") == (
        "t.cfg:24: maps.bin: map file 'maps/bin.map' line 2 is not valid UTF-8"
    )


def test_http_rules_need_mode_http() -> None:
    tcp = """\
frontends:
  pg:
    bind: 127.0.0.1:5432
    mode: tcp
    default_backend: db
    {key}
backends:
  db:
    mode: tcp
    servers:
      s1:
        address: 127.0.0.1:5433
"""
    for key, written in [
        ("http-request", "http-request: [deny]"),
        ("use_backend", "use_backend: [db]"),
        ("monitor-uri", "monitor-uri: /alive"),
    ]:
        assert error_of(tcp.replace("{key}", written)) == (
            f"t.cfg:6: frontends.pg.{key}: {key} needs mode http (frontend 'pg' is mode tcp)"
        )
    assert loads(tcp.replace("{key}", "maxconn: 5")).frontends["pg"].acl == ()
    # ACLs work in tcp mode (for tcp-request connection), with fetches that need no request
    assert loads(tcp.replace("{key}", "acl: {local: src 127.0.0.1}")).frontends["pg"].acl
    assert error_of(tcp.replace("{key}", "acl: {api: path_beg /api}")) == (
        "t.cfg:6: frontends.pg.acl.api: path_beg needs an HTTP request (frontend 'pg' is "
        "mode tcp)"
    )


def test_use_backend_modes_must_match() -> None:
    text = RULES + "  db:\n    mode: tcp\n    servers:\n      s1:\n        address: 127.0.0.1:5\n"
    assert error_of(text.replace("- api if is_api", "- db if is_api")) == (
        "t.cfg:11: frontends.web.use_backend: backend 'db' is mode tcp but frontend 'web' is "
        "mode http"
    )


def test_docs_rules_example_loads(rule_files: Path) -> None:
    """The example of the HTTP rules section of docs/configuration.md is valid."""
    docs = (ROOT / "docs" / "configuration.md").read_text()
    marker = "<!-- rules example -->\n```\n"
    assert marker in docs
    example = docs.split(marker, 1)[1].split("```", 1)[0]
    cfg = loads(example, "docs")
    www = cfg.frontends["www"]
    assert [a.name for a in www.acl][:3] == ["is_api", "old_host", "blocked"]
    assert (www.monitor_uri, cfg.maps) == ("/site_alive", {"hosts": "maps/hosts.map"})
    assert [e.status for e in www.errorfiles] == [503]


def test_docs_mention_every_rule_option() -> None:
    from lb.rules import syntax

    docs = (ROOT / "docs" / "configuration.md").read_text()
    words = [*syntax.FETCHES, *syntax.CONVERTERS, *syntax.MATCHES, *syntax.OPERATORS,
             *syntax.ACTIONS, "deny_status", "drop-query", "append-slash",
             "default-errorfiles", "content-type"]
    assert sorted({w for w in words if f"`{w}" not in docs}) == []
