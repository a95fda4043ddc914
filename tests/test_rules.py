"""Tests for lb.rules: HAProxy-style ACLs, http-request, use_backend, monitor-uri and
errorfiles, compiled from configuration and evaluated on fake requests. Pure: no sockets."""

from __future__ import annotations

import dataclasses
import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb.config import Frontend, loads
from lb.config.model import Acl
from lb.rules import Decision, FrontendRules, engine, load_map, syntax

BACKENDS = """\
backends:
  app: {servers: {s1: {address: "127.0.0.1:9001"}}}
  api: {servers: {s1: {address: "127.0.0.1:9002"}}}
  maintenance: {servers: {s1: {address: "127.0.0.1:9003"}}}
  static: {servers: {s1: {address: "127.0.0.1:9004"}}}
"""


@dataclasses.dataclass
class Req:
    """A request as the proxy would present it."""

    target: str = "/"
    method: str = "GET"
    client_ip: str = "127.0.0.1"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    cookies: dict[str, str] = dataclasses.field(default_factory=dict)

    def header(self, name: str) -> str | None:
        assert name == name.lower(), "the engine asks for lower-case names"
        return self.headers.get(name)

    def cookie(self, name: str) -> str | None:
        return self.cookies.get(name)


class Runtime:
    """Runtime state: usable servers, variables and maps, changed by the tests."""

    def __init__(self) -> None:
        self.up: dict[str, int] = {"app": 2, "api": 1, "maintenance": 1, "static": 1}
        self.vars: dict[str, str] = {}
        self.maps: dict[str, dict[str, str]] = {}

    def nbsrv(self, backend: str) -> int:
        return self.up[backend]

    def var(self, name: str) -> str | None:
        return self.vars.get(name)

    def map(self, name: str) -> dict[str, str]:
        return self.maps[name]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Rules read files relative to the current directory, as pylb does."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "hosts.map").write_text(
        "# host -> backend\nwww.example.com app\n  api.example.com\tapi  \n"
    )
    (tmp_path / "errors").mkdir()
    yield tmp_path


def _yaml(value: str | list[str] | dict[str, str]) -> str:
    """A JSON value is YAML: the rule strings need no further quoting."""
    return json.dumps(value)


def frontend(
    *,
    acl: dict[str, str | list[str]] | None = None,
    http_request: list[str] | None = None,
    use_backend: list[str] | None = None,
    extra: str = "",
    maps: str = "maps:\n  hosts: maps/hosts.map\n",
) -> Frontend:
    lines = ["frontends:", "  www:", "    bind: 127.0.0.1:8080", "    default_backend: app"]
    if acl is not None:
        lines.append(f"    acl: {json.dumps(acl)}")
    if http_request is not None:
        lines.append(f"    http-request: {_yaml(http_request)}")
    if use_backend is not None:
        lines.append(f"    use_backend: {_yaml(use_backend)}")
    text = "\n".join(lines) + "\n" + extra + maps + BACKENDS
    return loads(text, "t.cfg").frontends["www"]


def compile_rules(**kw: object) -> FrontendRules:
    cfg = frontend(**kw)  # type: ignore[arg-type]
    return FrontendRules.compile(cfg, {"hosts": "maps/hosts.map"},
                                 backends=("app", "api", "maintenance", "static"))


def matches(acl: str | list[str], req: Req | None = None, rt: Runtime | None = None) -> bool:
    """Whether ACL ``t`` (one line or several) holds for the request."""
    rules = compile_rules(acl={"t": acl}, use_backend=["api if t"])
    return rules.evaluate(req or Req(), rt or Runtime()).backend == "api"


def host(name: str, **kw: object) -> Req:
    return Req(headers={"host": name}, **kw)  # type: ignore[arg-type]


# -- fetches ----------------------------------------------------------------------------------


def test_src_matches_addresses_and_networks() -> None:
    acl = "src 10.0.0.0/8 192.168.1.7 172.16.0.0/255.240.0.0 2001:db8::/32"
    assert matches(acl, Req(client_ip="10.20.30.40"))
    assert matches(acl, Req(client_ip="192.168.1.7"))
    assert not matches(acl, Req(client_ip="192.168.1.8"))
    assert matches(acl, Req(client_ip="172.31.255.1"))
    assert not matches(acl, Req(client_ip="172.32.0.1"))
    assert matches(acl, Req(client_ip="2001:db8::1"))
    assert not matches(acl, Req(client_ip="2001:db9::1"))
    assert not matches(acl, Req(client_ip="not-an-ip"))


def test_src_compares_ipv4_and_ipv6_like_haproxy() -> None:
    assert matches("src 10.0.0.0/8", Req(client_ip="::ffff:10.1.2.3"))  # mapped
    assert matches("src 10.0.0.0/8", Req(client_ip="2002:0a01:0203::1"))  # 6to4
    assert not matches("src 10.0.0.0/8", Req(client_ip="2001:db8::10.1.2.3"))
    assert matches("src ::ffff:10.0.0.0/104", Req(client_ip="10.9.9.9"))
    assert matches("src 127.1", Req(client_ip="127.0.0.1"))  # inet_aton short form


def test_path_url_and_method() -> None:
    assert matches("path /a/b", Req("/a/b?x=1"))
    assert not matches("path /a/b", Req("/a/bc"))
    assert matches("path /a", Req("http://example.com/a?q"))  # absolute-form
    assert not matches("path -m found", Req("*"))  # "*" has no path
    assert matches("url /a/b?x=1", Req("/a/b?x=1"))
    assert not matches("url /a/b", Req("/a/b?x=1"))
    assert matches("method POST PUT", Req(method="PUT"))
    assert matches("method post", Req(method="POST"))  # method patterns ignore case
    assert not matches("method POST", Req(method="GET"))


def test_path_derivatives() -> None:
    assert matches("path_beg /api /v2", Req("/v2/users"))
    assert not matches("path_beg /api /v2", Req("/apx"))
    assert matches("path_end .png .jpg", Req("/img/a.jpg?size=2"))
    assert not matches("path_end .png", Req("/a.png/x"))
    assert matches("path_sub /admin/", Req("/x/admin/y"))
    assert not matches("path_sub /admin/", Req("/x/admin"))
    assert matches(r"path_reg ^/img/[0-9]+\.png$", Req("/img/12.png"))
    assert not matches(r"path_reg ^/img/[0-9]+\.png$", Req("/img/x.png"))
    assert matches("path_len gt 5", Req("/abcdef"))
    assert not matches("path_len gt 5", Req("/abcd"))
    assert matches("url_beg /a?", Req("/a?b"))


def test_headers() -> None:
    assert matches("hdr(Host) www.example.com", host("www.example.com"))
    assert not matches("hdr(host) www.example.com", host("WWW.example.com"))
    assert matches("req.hdr(x-a) 1", Req(headers={"x-a": "1"}))
    assert not matches("hdr(x-a) 1", Req())  # absent: no match
    assert matches("hdr_beg(host) www.", host("www.x"))
    assert matches("hdr_end(host) .example.com", host("a.example.com"))
    assert matches("hdr_sub(user-agent) Firefox", Req(headers={"user-agent": "Moz Firefox/1"}))
    assert matches("hdr_reg(host) ^a[0-9]\\.", host("a1.x"))
    assert not matches("hdr_reg(host) ^a[0-9]\\.", host("ab.x"))


def test_host_is_the_host_header_without_port() -> None:
    assert matches("host example.com", host("example.com:8080"))
    assert matches("host example.com", host("example.com"))
    assert matches("host [::1]", host("[::1]:80"))
    assert not matches("host example.com", Req())


def test_cookies() -> None:
    assert matches("req.cook(SID) abc", Req(cookies={"SID": "abc"}))
    assert not matches("req.cook(SID) abc", Req(cookies={"sid": "abc"}))  # case-sensitive
    assert matches("cook(SID) -m found", Req(cookies={"SID": ""}))  # empty but present
    assert not matches("req.cook(SID) -m found", Req())
    assert matches("req.cook_beg(SID) ab", Req(cookies={"SID": "abc"}))


def test_nbsrv_and_integer_operators() -> None:
    rt = Runtime()
    rt.up["app"] = 2
    for acl, expected in [
        ("nbsrv(app) eq 2", True), ("nbsrv(app) 2", True), ("nbsrv(app) 3", False),
        ("nbsrv(app) ne 2", False), ("nbsrv(app) ne 1", True),
        ("nbsrv(app) lt 2", False), ("nbsrv(app) lt 3", True),
        ("nbsrv(app) le 2", True), ("nbsrv(app) le 1", False),
        ("nbsrv(app) gt 1", True), ("nbsrv(app) gt 2", False),
        ("nbsrv(app) ge 2", True), ("nbsrv(app) ge 3", False),
        ("nbsrv(app) 1:3", True), ("nbsrv(app) 3:", False), ("nbsrv(app) :1", False),
        ("nbsrv(app) 5 2", True),  # any value
        ("nbsrv(app) -m bool", True),
    ]:
        assert matches(acl, rt=rt) is expected, acl
    rt.up["app"] = 0
    assert not matches("nbsrv(app) -m bool", rt=rt)
    assert matches("nbsrv(app) lt 1", rt=rt)


def test_var_reads_the_runtime_variable() -> None:
    rt = Runtime()
    assert not matches("var(proc.mode) -m found", rt=rt)
    assert matches("var(proc.mode,none) none", rt=rt)  # the default when unset
    rt.vars["proc.mode"] = "on"
    assert matches("var(proc.mode) -m str on", rt=rt)
    assert matches("var(proc.mode) on", rt=rt)  # str is the default for var
    assert not matches("var(proc.mode,none) none", rt=rt)
    rt.vars["proc.n"] = "12"
    assert matches("var(proc.n) -m int gt 10", rt=rt)
    rt.vars["proc.n"] = "x"
    assert not matches("var(proc.n) -m int gt 10", rt=rt)


# -- matchers and converters ------------------------------------------------------------------


def test_string_matchers_and_case() -> None:
    h = host("Api.Example.COM")
    assert not matches("hdr(host) api.example.com", h)
    assert matches("hdr(host) -i api.example.com", h)
    assert matches("hdr(host) -m beg -i api.", h)
    assert not matches("hdr(host) -m beg api.", h)
    assert matches("hdr(host) -m end -i .com", h)
    assert matches("hdr(host) -m sub -i example", h)
    assert not matches("hdr(host) -m sub example", h)
    assert matches("hdr(host) -m reg -i ^api\\.", h)
    assert not matches("hdr(host) -m reg ^api\\.", h)
    assert matches("hdr(host) -m len 15", h)
    assert matches("hdr(host) -m str Api.Example.COM", h)


def test_found_matches_empty_values_and_values_after_double_dash() -> None:
    assert matches("hdr(x-debug) -m found", Req(headers={"x-debug": ""}))
    assert not matches("hdr(x-debug) -m found", Req())
    assert matches("hdr(x-a) -- -i", Req(headers={"x-a": "-i"}))
    assert matches('hdr(x-a) "two words"', Req(headers={"x-a": "two words"}))


def test_ip_match_on_a_string_sample() -> None:
    assert matches("hdr(x-real-ip) -m ip 10.0.0.0/8", Req(headers={"x-real-ip": "10.0.0.9"}))
    assert not matches("hdr(x-real-ip) -m ip 10.0.0.0/8", Req(headers={"x-real-ip": "junk"}))


def test_converters() -> None:
    rt = Runtime()
    rt.maps["hosts"] = {"www.example.com": "app", "api.example.com": "api"}
    assert matches("hdr(host),lower www.example.com", host("WWW.Example.com"))
    assert matches("hdr(host),upper WWW.EXAMPLE.COM", host("www.example.com"))
    assert matches("hdr(host),lower,map(hosts) api", host("API.example.com"), rt)
    assert matches("hdr(host),map(hosts) -m found", host("www.example.com"), rt)
    assert not matches("hdr(host),map(hosts) -m found", host("other"), rt)  # miss: no sample
    assert matches("hdr(host),map(hosts,none) none", host("other"), rt)
    assert matches("path,lower -m beg /api", Req("/API/x"))


# -- conditions -------------------------------------------------------------------------------


def route(use: list[str], req: Req, acl: dict[str, str | list[str]] | None = None) -> str | None:
    acls: dict[str, str | list[str]] = {
        "api": "path_beg /api",
        "post": "method POST",
        "local": "src 127.0.0.1",
        **(acl or {}),
    }
    return compile_rules(acl=acls, use_backend=use).evaluate(req, Runtime()).backend


def test_and_or_not() -> None:
    assert route(["api if api post"], Req("/api", "POST")) == "api"
    assert route(["api if api post"], Req("/api", "GET")) is None
    assert route(["api if api || post"], Req("/x", "POST")) == "api"
    assert route(["api if api or post"], Req("/x", "POST")) == "api"
    assert route(["api if api or post"], Req("/x", "GET")) is None
    assert route(["api if !api"], Req("/x")) == "api"
    assert route(["api if ! api"], Req("/x")) == "api"
    assert route(["api if !!api"], Req("/x")) is None
    assert route(["api unless api"], Req("/x")) == "api"
    assert route(["api unless api"], Req("/api")) is None
    # AND binds tighter than OR: (api and post) or local
    assert route(["api if api post || local"], Req("/x", client_ip="127.0.0.1")) == "api"
    assert route(["api if api post || local"], Req("/api", client_ip="10.0.0.1")) is None
    assert route(["api if api !post"], Req("/api", "GET")) == "api"


def test_anonymous_acls() -> None:
    assert route(["api if { path_beg /api }"], Req("/api/x")) == "api"
    assert route(["api if { path_beg /api }"], Req("/x")) is None
    assert route(["api if !{ path_beg /api } post"], Req("/x", "POST")) == "api"
    assert route(["api if { hdr(host) -i a.com } || { path /b }"], Req("/b")) == "api"
    assert route(["api unless { src 10.0.0.0/8 }"], Req(client_ip="10.1.1.1")) is None


def test_acl_lines_with_the_same_name_are_ored() -> None:
    acl: dict[str, str | list[str]] = {"static": ["path_beg /static", "path_end .css"]}
    assert route(["static if static"], Req("/static/x"), acl) == "static"
    assert route(["static if static"], Req("/a.css"), acl) == "static"
    assert route(["static if static"], Req("/a.js"), acl) is None


# -- http-request -----------------------------------------------------------------------------


def evaluate(http_request: list[str], req: Req | None = None, **kw: object) -> Decision:
    acls = {"api": "path_beg /api", "blocked": "src 10.0.0.0/8"}
    rules = compile_rules(acl=acls, http_request=http_request, **kw)
    return rules.evaluate(req or Req(), Runtime())


def status_of(decision: Decision) -> int | None:
    if decision.response is None:
        return None
    return int(decision.response.split(b" ", 2)[1])


def test_deny_default_and_deny_status() -> None:
    d = evaluate(["deny if blocked"], Req(client_ip="10.0.0.1"))
    assert d.response is not None and d.response.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"Connection: close\r\n" in d.response
    assert evaluate(["deny if blocked"], Req(client_ip="1.2.3.4")).response is None
    assert status_of(evaluate(["deny deny_status 429"])) == 429
    assert status_of(evaluate(["deny status 404 if api"], Req("/api"))) == 404


def test_rules_run_in_order_and_the_first_terminal_one_ends_them() -> None:
    rules = ["set-header X-A 1", "deny deny_status 404 if api", "deny deny_status 429",
             "set-header X-B 2"]
    assert status_of(evaluate(rules, Req("/api"))) == 404
    assert status_of(evaluate(rules, Req("/x"))) == 429
    d = evaluate(["set-header X-A 1", "deny if api", "set-header X-B 2"], Req("/x"))
    assert d.response is None
    assert d.set_headers == [("X-A", "1"), ("X-B", "2")]


def test_redirect_location_and_codes() -> None:
    d = evaluate(["redirect location https://new.example.com code 301"])
    assert d.response == (b"HTTP/1.1 301 Moved Permanently\r\nLocation: https://new.example.com"
                          b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert status_of(evaluate(["redirect location /x"])) == 302  # the default
    for code in (303, 307, 308):
        assert status_of(evaluate([f"redirect location /x code {code}"])) == code
    d = evaluate(["redirect location https://x.com%[path]?from=%[hdr(host)]"],
                 host("a", target="/p?q"))
    assert b"\r\nLocation: https://x.com/p?from=a\r\n" in (d.response or b"")


def location(rule: str, req: Req) -> str:
    response = evaluate([rule], req).response or b""
    for line in response.split(b"\r\n"):
        if line.startswith(b"Location: "):
            return line[10:].decode()
    raise AssertionError(response)


def test_redirect_prefix_and_scheme() -> None:
    req = host("www.example.com:8080", target="/a/b?x=1")
    assert location("redirect prefix https://new.example.com", req) == (
        "https://new.example.com/a/b?x=1"
    )
    assert location("redirect prefix /old drop-query", req) == "/old/a/b"
    assert location("redirect prefix / append-slash", req) == "/a/b/?x=1"
    assert location("redirect prefix / drop-query append-slash", req) == "/a/b/"
    assert location("redirect scheme https", req) == "https://www.example.com:8080/a/b?x=1"
    assert location("redirect scheme https drop-query", req) == "https://www.example.com:8080/a/b"
    assert location("redirect scheme https", Req("*")) == "https:///"  # no host, no path
    assert location("redirect scheme https", host("a", target="http://a/z")) == "https://a/z"


def test_return_with_string_file_and_headers(in_tmp: Path) -> None:
    (in_tmp / "errors" / "maint.html").write_bytes(b"<h1>maintenance</h1>\n")
    d = evaluate(["return status 503 content-type text/html file errors/maint.html"])
    assert d.response == (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html\r\n"
                          b"Content-Length: 21\r\nConnection: close\r\n\r\n"
                          b"<h1>maintenance</h1>\n")
    d = evaluate(['return content-type text/plain string "all good" hdr X-Src %[src]'])
    assert d.response == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Src: 127.0.0.1\r\n"
                          b"Content-Length: 8\r\nConnection: close\r\n\r\nall good")
    d = evaluate(["return status 204"])
    assert d.response == (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n"
                          b"Connection: close\r\n\r\n")


def test_deny_and_return_use_errorfiles(in_tmp: Path) -> None:
    (in_tmp / "errors" / "403.http").write_bytes(b"HTTP/1.0 403 Go away\nX-Why: rules\n\nno\n")
    (in_tmp / "errors" / "custom.http").write_bytes(b"HTTP/1.1 200 OK\r\n\r\nhi")
    extra = "    errorfile: {403: errors/403.http}\n"
    d = evaluate(["deny"], extra=extra)
    assert d.response == (b"HTTP/1.1 403 Go away\r\nX-Why: rules\r\nContent-Length: 3\r\n"
                          b"Connection: close\r\n\r\nno\n")
    d = evaluate(["return status 403 default-errorfiles"], extra=extra)
    assert d.response is not None and d.response.startswith(b"HTTP/1.1 403 Go away\r\n")
    d = evaluate(["return status 200 errorfile errors/custom.http"])
    assert d.response == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"


def test_set_add_and_del_header_decisions() -> None:
    d = evaluate(["set-header X-Forwarded-Proto https", "del-header X-Debug"])
    assert d.set_headers == [("X-Forwarded-Proto", "https")]
    assert d.del_headers == ["x-forwarded-proto", "x-debug"]
    # a later rule on the same header wins; add-header keeps what is there
    d = evaluate(["set-header X-A 1", "set-header X-A 2", "add-header X-A 3",
                  "add-header X-B 1", "del-header X-B", "add-header X-C %[method]"])
    assert d.set_headers == [("X-A", "2"), ("X-A", "3"), ("X-C", "GET")]
    assert d.del_headers == ["x-a", "x-b"]
    d = evaluate(["del-header X-A", "set-header X-A v if api"], Req("/api"))
    assert (d.set_headers, d.del_headers) == ([("X-A", "v")], ["x-a"])
    d = evaluate(["del-header X-A", "set-header X-A v if api"], Req("/x"))
    assert (d.set_headers, d.del_headers) == ([], ["x-a"])


def test_later_rules_see_earlier_header_edits() -> None:
    rules = ["set-header X-Tier gold if api", "deny deny_status 429 if { hdr(x-tier) gold }"]
    assert status_of(evaluate(rules, Req("/api"))) == 429
    assert status_of(evaluate(rules, Req("/x", headers={"x-tier": "silver"}))) is None
    rules = ["del-header X-Tier", "deny if { hdr(x-tier) -m found }"]
    assert status_of(evaluate(rules, Req(headers={"x-tier": "gold"}))) is None
    rules = ["add-header X-Tier new", "deny if { hdr(x-tier) old }"]
    assert status_of(evaluate(rules, Req(headers={"x-tier": "old"}))) == 403  # first value
    assert status_of(evaluate(["add-header X-T new", "deny if { hdr(x-t) new }"])) == 403
    # the value is computed before the old header goes, as in HAProxy
    d = evaluate(["set-header X-Path %[hdr(x-path)]/more"], Req(headers={"x-path": "/a"}))
    assert d.set_headers == [("X-Path", "/a/more")]


# -- use_backend ------------------------------------------------------------------------------


def test_use_backend_static_conditional_and_first_match() -> None:
    assert route(["static"], Req()) == "static"
    use = ["api if api", "static if api", "static if post"]
    assert route(use, Req("/api", "POST")) == "api"
    assert route(use, Req("/x", "POST")) == "static"
    assert route(use, Req("/x")) is None  # default_backend


def test_use_backend_dynamic_with_map_and_default() -> None:
    rules = compile_rules(use_backend=["%[hdr(host),lower,map(hosts,app)]"])
    rt = Runtime()
    rt.maps["hosts"] = load_map("maps/hosts.map")
    assert rules.evaluate(host("API.example.com"), rt).backend == "api"
    assert rules.evaluate(host("www.example.com"), rt).backend == "app"
    assert rules.evaluate(host("unknown.example.com"), rt).backend == "app"  # map default
    assert rules.evaluate(Req(), rt).backend is None  # no Host: no name, default_backend


def test_dynamic_use_backend_naming_no_backend_gives_the_default() -> None:
    rules = compile_rules(use_backend=["%[hdr(x-be)] if { hdr(x-be) -m found }", "static"])
    rt = Runtime()
    assert rules.evaluate(Req(headers={"x-be": "api"}), rt).backend == "api"
    # no such backend: default_backend, and no later rule, as HAProxy does
    assert rules.evaluate(Req(headers={"x-be": "nope"}), rt).backend is None
    assert rules.evaluate(Req(), rt).backend == "static"
    # without the backend list the engine cannot tell, and returns the name
    unchecked = FrontendRules.compile(
        frontend(use_backend=["%[hdr(x-be)]"]), {"hosts": "maps/hosts.map"}
    )
    assert unchecked.evaluate(Req(headers={"x-be": "nope"}), rt).backend == "nope"


def test_a_map_changed_at_runtime_changes_the_routing() -> None:
    rules = compile_rules(use_backend=["%[hdr(host),lower,map(hosts,app)]"])
    rt = Runtime()
    rt.maps["hosts"] = load_map("maps/hosts.map")
    req = host("shop.example.com")
    assert rules.evaluate(req, rt).backend == "app"
    rt.maps["hosts"]["shop.example.com"] = "static"  # `add map hosts ...` on the socket
    assert rules.evaluate(req, rt).backend == "static"
    rt.maps["hosts"] = {}  # `clear map hosts`
    assert rules.evaluate(host("api.example.com"), rt).backend == "app"


# -- the seed scenario: a runtime variable flips the decision --------------------------------

SEED = """\
frontends:
  www:
    bind: 127.0.0.1:8080
    acl:
      maint: var(proc.maintenance_mode) -m str on
      is_api: path_beg /api
    use_backend:
      - maintenance if maint
      - api if is_api
    default_backend: app
"""


def test_maintenance_variable_routes_to_maintenance_and_back() -> None:
    cfg = loads(SEED + BACKENDS, "seed.cfg")
    rules = FrontendRules.compile(cfg.frontends["www"], cfg.maps, backends=cfg.backends)
    rt = Runtime()
    assert rules.evaluate(Req("/api/x"), rt).backend == "api"
    assert rules.evaluate(Req("/"), rt).backend is None
    rt.vars["proc.maintenance_mode"] = "on"
    assert rules.evaluate(Req("/api/x"), rt).backend == "maintenance"
    assert rules.evaluate(Req("/"), rt).backend == "maintenance"
    rt.vars["proc.maintenance_mode"] = "off"
    assert rules.evaluate(Req("/api/x"), rt).backend == "api"
    assert rules.evaluate(Req("/"), rt).backend is None


# -- monitor-uri and errorfiles ---------------------------------------------------------------

MONITOR = """\
    acl: {site_dead: nbsrv(app) lt 1, blocked: src 127.0.0.1}
    http-request: [deny if blocked]
    monitor-uri: /site_alive
    monitor-fail: if site_dead
"""


def test_monitor_uri_answers_200_or_503_before_any_rule() -> None:
    rules = FrontendRules.compile(frontend(extra=MONITOR))
    rt = Runtime()
    d = rules.evaluate(Req("/site_alive"), rt)  # the client is "blocked": monitor comes first
    assert d.response is not None and d.response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close\r\n" in d.response
    assert status_of(rules.evaluate(Req("/site_alive?full=1"), rt)) == 200  # path compared
    assert status_of(rules.evaluate(Req("/site_alive/x"), rt)) == 403  # not the URI
    rt.up["app"] = 0
    assert status_of(rules.evaluate(Req("/site_alive"), rt)) == 503
    rt.up["app"] = 1
    assert status_of(rules.evaluate(Req("/site_alive"), rt)) == 200


def test_monitor_uri_without_slash_compares_the_whole_target() -> None:
    rules = FrontendRules.compile(frontend(extra="    monitor-uri: '*'\n"))
    assert status_of(rules.evaluate(Req("*"), Runtime())) == 200
    assert rules.evaluate(Req("/"), Runtime()).response is None


def test_monitor_and_error_pages_use_errorfiles(in_tmp: Path) -> None:
    (in_tmp / "errors" / "503.http").write_bytes(
        b"HTTP/1.1 503 Sorry\r\nContent-Type: text/plain\r\nContent-Length: 999\r\n"
        b"Connection: keep-alive\r\n\r\nback soon\n"
    )
    (in_tmp / "errors" / "200.http").write_bytes(b"HTTP/1.1 200 OK\n\nalive\n")
    (in_tmp / "errors" / "408.http").write_bytes(b"")
    extra = MONITOR + ("    errorfile:\n      503: errors/503.http\n      200: errors/200.http\n"
                       "      408: errors/408.http\n")
    rules = FrontendRules.compile(frontend(extra=extra))
    sorry = (b"HTTP/1.1 503 Sorry\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n"
             b"Connection: close\r\n\r\nback soon\n")
    assert rules.error_page(503) == sorry
    assert rules.error_page(408) == b""  # close without answering
    assert rules.error_page(504) is None
    rt = Runtime()
    assert rules.evaluate(Req("/site_alive"), rt).response == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nalive\n"
    )
    rt.up["app"] = 0
    assert rules.evaluate(Req("/site_alive"), rt).response == sorry


# -- building blocks --------------------------------------------------------------------------


def test_words_quotes_and_escapes() -> None:
    assert syntax.words('a  "b c" \'d "e\' f\\ g') == ["a", "b c", 'd "e', "f g"]
    assert syntax.words(r"path_reg ^/a\.png$ \\x") == ["path_reg", r"^/a\.png$", "\\x"]
    assert syntax.words('string "" x') == ["string", "", "x"]
    assert syntax.words(r'"a \"q\" b"') == ['a "q" b']
    with pytest.raises(ValueError, match="missing closing"):
        syntax.words('string "open')


def test_load_map(in_tmp: Path) -> None:
    (in_tmp / "m.map").write_text(
        "# comment\n\n  key1   value one  \nkey2\tv2\nkey1 second\n  # indented comment\nalone\n"
    )
    assert load_map("m.map") == {"key1": "value one", "key2": "v2", "alone": ""}
    (in_tmp / "bad.map").write_bytes(b"a b\nc \xff\n")
    with pytest.raises(ValueError, match="line 2 is not valid UTF-8"):
        load_map("bad.map")
    with pytest.raises(OSError):
        load_map("missing.map")


def test_errorfile_normalisation() -> None:
    out = syntax.parse_errorfile(b"HTTP/1.0 503\nTransfer-Encoding: chunked\nX: y\n\nbody", "f")
    assert out == (b"HTTP/1.1 503 Service Unavailable\r\nX: y\r\nContent-Length: 4\r\n"
                   b"Connection: close\r\n\r\nbody")
    for bad in (b"oops\n\n", b"HTTP/1.1 503 x\nno colon\n\n", b"HTTP/1.1 503 x"):
        with pytest.raises(ValueError):
            syntax.parse_errorfile(bad, "f")


def test_fetch_and_converter_tables_agree() -> None:
    assert set(engine.FETCHERS) == {spec.fetch for spec in syntax.FETCHES.values()} | set(
        syntax.COUNTER_FETCHES
    )
    assert set(engine.CONVERTERS) == set(syntax.CONVERTERS)


def test_compile_checks_maps_and_acls() -> None:
    cfg = frontend(acl={"known": "hdr(host),map(hosts) -m found"},
                   use_backend=["api if known"])
    with pytest.raises(ValueError, match="no map named 'hosts'"):
        FrontendRules.compile(cfg, {})
    broken = dataclasses.replace(cfg, acl=(Acl("other", cfg.acl[0].tests, 1),))
    with pytest.raises(ValueError, match="no ACL named 'known'"):
        FrontendRules.compile(broken)


def test_config_with_rules_pickles_and_compiles_the_same() -> None:
    cfg = frontend(acl={"api": "path_beg /api"}, http_request=["set-header X-A %[src]"],
                   use_backend=["api if api"], extra="    monitor-uri: /alive\n")
    copy = pickle.loads(pickle.dumps(cfg))
    assert copy == cfg
    d = FrontendRules.compile(copy).evaluate(Req("/api"), Runtime())
    assert (d.backend, d.set_headers) == ("api", [("X-A", "127.0.0.1")])


# -- the client connection's TLS: ssl_fc and friends ------------------------------------------


class FakeTls:
    """What the engine reads of an ssl.SSLObject (and lb.tls.context's SNI)."""

    def __init__(self, sni: str | None = "www.example.com", resumed: bool = False,
                 alpn: str | None = "http/1.1", cert: bytes | None = None) -> None:
        self.pylb_sni = sni
        self.session_reused = resumed
        self.alpn = alpn
        self.cert = cert

    def version(self) -> str:
        return "TLSv1.3"

    def cipher(self) -> tuple[str, str, int]:
        return ("TLS_AES_256_GCM_SHA384", "TLSv1.3", 256)

    def selected_alpn_protocol(self) -> str | None:
        return self.alpn

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        return self.cert


@dataclasses.dataclass
class TlsReq(Req):
    ssl: FakeTls | None = None


def test_ssl_fc_booleans_in_anonymous_acls() -> None:
    rules = compile_rules(http_request=["redirect scheme https code 301 unless { ssl_fc }",
                                        "set-header X-Forwarded-Proto https if { ssl_fc }"])
    plain = rules.evaluate(TlsReq(headers={"host": "a.example"}), Runtime())
    assert plain.response is not None and b"Location: https://a.example/" in plain.response
    tls = rules.evaluate(TlsReq(ssl=FakeTls()), Runtime())
    assert tls.response is None and tls.set_headers == [("X-Forwarded-Proto", "https")]
    for acl in ("ssl_fc", "ssl_fc_has_sni", "ssl_fc_is_resumed", "ssl_c_used"):
        assert not matches(acl, TlsReq())
    assert matches("ssl_fc", TlsReq(ssl=FakeTls()))
    assert matches("ssl_fc_has_sni", TlsReq(ssl=FakeTls()))
    assert not matches("ssl_fc_has_sni", TlsReq(ssl=FakeTls(sni=None)))
    assert matches("ssl_fc_is_resumed", TlsReq(ssl=FakeTls(resumed=True)))
    assert not matches("ssl_fc_is_resumed", TlsReq(ssl=FakeTls()))
    assert matches("ssl_c_used", TlsReq(ssl=FakeTls(cert=b"DER")))
    assert not matches("ssl_c_used", TlsReq(ssl=FakeTls()))


def test_ssl_string_fetches_and_sni_derivatives() -> None:
    tls = TlsReq(ssl=FakeTls(sni="WWW.Example.com"))
    assert matches("ssl_fc_sni -i www.example.com", tls)
    assert not matches("ssl_fc_sni www.example.com", tls)
    assert matches("ssl_fc_sni_end -i .example.com", tls)
    assert matches(r"ssl_fc_sni_reg ^WWW\.", tls)
    assert matches("ssl_fc_protocol TLSv1.3", tls)
    assert matches("ssl_fc_cipher -m beg TLS_AES", tls)
    assert matches("ssl_fc_alpn http/1.1", tls)
    assert not matches("ssl_fc_alpn -m found", TlsReq(ssl=FakeTls(alpn=None)))
    assert not matches("ssl_fc_sni -m found", TlsReq(ssl=FakeTls(sni=None)))
    for acl in ("ssl_fc_sni", "ssl_fc_protocol", "ssl_fc_cipher", "ssl_fc_alpn"):
        assert not matches(f"{acl} -m found", TlsReq())


def test_ssl_fetches_in_values() -> None:
    rules = compile_rules(http_request=[
        "set-header X-SNI %[ssl_fc_sni]",
        "set-header X-TLS %[ssl_fc]/%[ssl_fc_protocol]/%[ssl_fc_cipher]/%[ssl_fc_alpn]/"
        "%[ssl_fc_is_resumed]/%[ssl_c_used]/%[ssl_fc_has_sni]",
    ])
    tls = rules.evaluate(TlsReq(ssl=FakeTls(resumed=True)), Runtime())
    assert tls.set_headers == [
        ("X-SNI", "www.example.com"),
        ("X-TLS", "1/TLSv1.3/TLS_AES_256_GCM_SHA384/http/1.1/1/0/1"),
    ]
    plain = rules.evaluate(TlsReq(), Runtime())
    assert plain.set_headers == [("X-SNI", ""), ("X-TLS", "0////0//0")]


def test_ssl_fetch_syntax_errors() -> None:
    with pytest.raises(ValueError, match="ssl_fc takes no arguments"):
        syntax.parse_acl("ssl_fc(x)", 1)
    with pytest.raises(ValueError, match="-m bool takes no values"):
        syntax.parse_acl("ssl_fc 1", 1)
    with pytest.raises(ValueError, match="ssl_fc_sni_end is an ACL keyword; write ssl_fc_sni"):
        syntax.parse_template("%[ssl_fc_sni_end]")
    with pytest.raises(ValueError, match="unknown fetch 'ssl_fc_snii' .did you mean ssl_fc_sni"):
        syntax.parse_acl("ssl_fc_snii x", 1)


def test_ssl_fetches_are_refused_where_no_tls_is_known() -> None:
    from lb.config import ConfigError

    with pytest.raises(ValueError, match="ssl_fc cannot be used in tcp-request connection"):
        syntax.parse_tcp_connection("reject unless { ssl_fc }", 1)
    text = ("frontends:\n  www:\n    bind: 127.0.0.1:8080\n    default_backend: app\n"
            "    acl: {tls: ssl_fc}\n    tcp-request connection: [reject unless tls]\n"
            + BACKENDS)
    with pytest.raises(ConfigError, match="ACL 'tls' uses ssl_fc"):
        loads(text, "t.cfg")
