"""Stick counters, sans IO: track-sc (http-request and tcp-request connection), the sc_*,
scN_* and src_* fetches, sc-inc-gpc0, accept/reject, and their configuration errors.
Rules are compiled from configuration text and evaluated on fake requests, against real
shared-memory stick tables (lb.sticktable) in this one process."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pytest

from lb.config import ConfigError, loads
from lb.config.model import Config, IncGpc0Rule, TrackRule
from lb.rules import FrontendRules, StickCounters, syntax
from lb.sticktable import StickTable

STORE = ["conn_cur", "conn_cnt", "conn_rate(10s)", "http_req_cnt", "http_req_rate(10s)",
         "http_err_cnt", "http_err_rate(10s)", "gpc0", "gpc0_rate(10s)"]
BACKENDS = """\
backends:
  app:
    stick-table: {type: ip, store: [gpc0, http_req_cnt]}
    servers: {s1: {address: "127.0.0.1:9001"}}
  users:
    stick-table: {type: string, store: [http_req_cnt, conn_cur]}
    servers: {s1: {address: "127.0.0.1:9002"}}
"""


def config(*, http_request: list[str] | None = None, connection: list[str] | None = None,
           acl: dict[str, str] | None = None, store: list[str] | None = None,
           table: bool = True, use_backend: list[str] | None = None, mode: str = "http"
           ) -> Config:
    lines = ["frontends:", "  www:", "    bind: 127.0.0.1:8080", f"    mode: {mode}",
             "    default_backend: app"]
    if table:
        stored = json.dumps(STORE if store is None else store)
        lines.append(f"    stick-table: {{type: ip, size: 1k, store: {stored}}}")
    if acl is not None:
        lines.append(f"    acl: {json.dumps(acl)}")
    if connection is not None:
        lines.append(f"    tcp-request connection: {json.dumps(connection)}")
    if http_request is not None:
        lines.append(f"    http-request: {json.dumps(http_request)}")
    if use_backend is not None:
        lines.append(f"    use_backend: {json.dumps(use_backend)}")
    text = "\n".join(lines) + "\n" + BACKENDS
    if mode == "tcp":
        text = text.replace("  app:\n", "  app:\n    mode: tcp\n")
    return loads(text, "t.cfg")


@dataclasses.dataclass
class Req:
    client_ip: str = "10.0.0.1"
    target: str = "/"
    method: str = "GET"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def cookie(self, name: str) -> str | None:
        return None


class Runtime:
    """The worker as rules see it: real stick tables, one per proxy that declares one."""

    def __init__(self, cfg: Config) -> None:
        self.tables: dict[str, StickTable] = {}
        for name, proxy in [*cfg.backends.items(), *cfg.frontends.items()]:
            if proxy.stick_table is not None:
                self.tables[name] = StickTable.create(name, proxy.stick_table)

    def nbsrv(self, backend: str) -> int:
        return 1

    def var(self, name: str) -> str | None:
        return None

    def map(self, name: str) -> Any:
        raise KeyError(name)

    def table(self, name: str) -> StickTable | None:
        return self.tables.get(name)

    def data(self, table: str, key: str, name: str) -> int | None:
        found = self.tables[table]
        return found.data(found.key_of(key), name)  # type: ignore[arg-type]

    def close(self) -> None:
        for table in self.tables.values():
            table.close()


@pytest.fixture
def runtimes() -> Iterator[list[Runtime]]:
    made: list[Runtime] = []
    yield made
    for rt in made:
        rt.close()


@pytest.fixture
def setup(runtimes: list[Runtime]) -> Any:
    """``setup(**config)`` -> (compiled rules, runtime with fresh tables)."""

    def make(**kw: Any) -> tuple[FrontendRules, Runtime]:
        cfg = config(**kw)
        rt = Runtime(cfg)
        runtimes.append(rt)
        return FrontendRules.compile(cfg.frontends["www"], cfg.maps, backends=cfg.backends), rt

    return make


def request(rules: FrontendRules, rt: Runtime, req: Req | None = None,
            counters: StickCounters | None = None, end: bool = True) -> tuple[int, Any]:
    """One request as the proxy runs it: (status, the decision); a rule's answer counts
    as a 4xx error when it is one; ``end`` finishes the request."""
    if counters is not None:
        counters.begin_request()
    decision = rules.evaluate(req or Req(), rt, counters)
    status = int(decision.response[9:12]) if decision.response else 200
    if decision.counters is not None:
        if 400 <= status < 500:
            decision.counters.error()
        if end:
            decision.counters.end_request()
    return status, decision


# -- parsing ----------------------------------------------------------------------------------


def test_track_and_inc_rules_parse() -> None:
    cfg = config(http_request=["track-sc0 src", "track-sc1 hdr(x-user),lower table users "
                               "if { src 10.0.0.0/8 }", "sc-inc-gpc0(0) unless { src 1.2.3.4 }"],
                 connection=["track-sc2 src", "reject if { sc_conn_cur(2) gt 10 }", "accept"])
    www = cfg.frontends["www"]
    first, second, inc = www.http_request
    assert isinstance(first, TrackRule) and (first.sc, first.table, first.cond) == (0, None, None)
    assert first.sample.fetch == "src"
    assert isinstance(second, TrackRule) and (second.sc, second.table) == (1, "users")
    assert second.sample.converters == (("lower", ()),) and second.cond is not None
    assert isinstance(inc, IncGpc0Rule) and inc.sc == 0 and inc.cond is not None
    assert inc.cond.unless
    assert [type(r).__name__ for r in www.tcp_request_connection] == [
        "TrackRule", "ConnectionRule", "ConnectionRule"]
    assert [getattr(r, "action", None) for r in www.tcp_request_connection] == [
        None, "reject", "accept"]


@pytest.mark.parametrize(("text", "args", "kind"), [
    ("sc_http_req_rate(0)", ("http_req_rate", "0", ""), "int"),
    ("sc_http_req_rate(2,app)", ("http_req_rate", "2", "app"), "int"),
    ("sc1_conn_cur", ("conn_cur", "1", ""), "int"),
    ("sc1_conn_cur()", ("conn_cur", "1", ""), "int"),
    ("sc0_gpc0_rate(users)", ("gpc0_rate", "0", "users"), "int"),
    ("sc_get_gpc0(0)", ("gpc0", "0", ""), "int"),
    ("sc2_inc_gpc0", ("inc_gpc0", "2", ""), "int"),
    ("sc_clr_gpc0(1)", ("clr_gpc0", "1", ""), "int"),
    ("sc_tracked(1)", ("tracked", "1", ""), "bool"),
    ("sc0_tracked", ("tracked", "0", ""), "bool"),
    ("src_http_err_rate", ("http_err_rate", ""), "int"),
    ("src_conn_cnt(app)", ("conn_cnt", "app"), "int"),
    ("src_get_gpc0", ("gpc0", ""), "int"),
    ("src_inc_gpc0(app)", ("inc_gpc0", "app"), "int"),
])
def test_counter_fetches_parse(text: str, args: tuple[str, ...], kind: str) -> None:
    sample, spec = syntax.parse_sample(text)
    assert sample.fetch == ("src_table" if text.startswith("src") else "sc")
    assert (sample.args, spec.type) == (args, kind)


def test_counter_fetches_default_matches() -> None:
    assert syntax.parse_acl("sc_http_req_rate(0) gt 10", 1).match == "int"
    assert syntax.parse_acl("sc0_tracked", 1).match == "bool"
    assert syntax.parse_acl("src_gpc0 -m int 0:3", 1).match == "int"
    with pytest.raises(ValueError, match="-m ip cannot match sc_tracked"):
        syntax.parse_acl("sc_tracked(0) -m ip 10.0.0.1", 1)


@pytest.mark.parametrize(("text", "message"), [
    ("sc_http_req_rate", "sc_http_req_rate needs a stick counter number: sc_http_req_rate(0)"),
    ("sc_http_req_rate(3)", "no stick counter '3'; expected 0, 1 or 2"),
    ("sc3_http_req_rate", "sc3_http_req_rate: no stick counter '3'"),
    ("sc0_http_req_rate(a,b)", "sc0_http_req_rate takes an optional table name"),
    ("sc_conn_cur(0,a,b)", "takes a stick counter number and an optional table name"),
    ("src_tracked", "unknown fetch 'src_tracked'"),
    ("sc_http_req_rat(0)", "did you mean sc_http_req_rate"),
    ("sc0_bytes_in_rate", "unknown fetch 'sc0_bytes_in_rate'"),
    ("src_conn_cur(a/b)", "expected a table name in src_conn_cur()"),
])
def test_counter_fetch_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        syntax.parse_sample(text)


# -- configuration errors (file:line: key: message) -------------------------------------------

RULE_ERRORS = [
    (dict(http_request=["track-sc3 src"]),
     "t.cfg:7: frontends.www.http-request: track-sc3: no stick counter '3'; expected 0, 1 "
     "or 2 (pylb has sc0, sc1 and sc2)"),
    (dict(http_request=["track-sc0"]),
     "t.cfg:7: frontends.www.http-request: track-sc0 needs a sample to track, like "
     "track-sc0 src"),
    (dict(http_request=["track-sc0 src table"]),
     "t.cfg:7: frontends.www.http-request: table needs a table name"),
    (dict(http_request=["track-sc0 src table nope"]),
     "t.cfg:7: frontends.www.http-request: no stick table named 'nope'"),
    (dict(http_request=["track-sc0 src table ap"]),
     "t.cfg:7: frontends.www.http-request: no stick table named 'ap' (did you mean app?)"),
    (dict(http_request=["track-sc0 src if"]),
     "t.cfg:7: frontends.www.http-request: if needs a condition"),
    (dict(http_request=["track-sc0 src tabel app"]),
     "t.cfg:7: frontends.www.http-request: unexpected 'tabel' (expected table NAME, if or "
     "unless)"),
    (dict(http_request=["track-sc0 src"], table=False),
     "t.cfg:6: frontends.www.http-request: track-sc0 needs a stick table: frontend 'www' "
     "has no stick-table (declare one, or name a table: track-sc0 src table NAME)"),
    (dict(http_request=["track-sc0 src", "deny if { sc_http_req_rate(1) gt 5 }"]),
     "t.cfg:7: frontends.www.http-request: sc_http_req_rate(1): no track-sc1 rule in "
     "frontend 'www', so stick counter 1 is never tracked"),
    (dict(http_request=["track-sc0 src", "deny if { sc0_http_req_rate gt 5 }"],
          store=["conn_cur"]),
     "t.cfg:7: frontends.www.http-request: sc0_http_req_rate: table 'www' does not store "
     "http_req_rate (add it to the stick-table's store)"),
    (dict(http_request=["track-sc0 src", "deny if { sc0_conn_cur(app) gt 5 }"]),
     "t.cfg:7: frontends.www.http-request: sc0_conn_cur(app): table 'app' does not store "
     "conn_cur (add it to the stick-table's store)"),
    (dict(http_request=["track-sc0 src", "deny if { sc0_conn_cur(db) gt 5 }"]),
     "t.cfg:7: frontends.www.http-request: no stick table named 'db'"),
    (dict(http_request=["track-sc0 src", "sc-inc-gpc0(0)"], store=["conn_cur"]),
     "t.cfg:7: frontends.www.http-request: sc-inc-gpc0(0): table 'www' does not store gpc0 "
     "or gpc0_rate (add it to the stick-table's store)"),
    (dict(http_request=["track-sc0 src", "sc-inc-gpc0(1)"]),
     "t.cfg:7: frontends.www.http-request: sc-inc-gpc0(1): no track-sc1 rule in frontend "
     "'www', so stick counter 1 is never tracked"),
    (dict(http_request=["track-sc0 src", "sc-inc-gpc0"]),
     "t.cfg:7: frontends.www.http-request: expected sc-inc-gpc0(N), N the stick counter: "
     "0, 1 or 2"),
    (dict(http_request=["track-sc0 src", "sc-inc-gpc0(5)"]),
     "t.cfg:7: frontends.www.http-request: sc-inc-gpc0: no stick counter '5'; expected 0, "
     "1 or 2 (pylb has sc0, sc1 and sc2)"),
    (dict(http_request=["track-sc0 src", "sc-set-gpt0(0) 1"]),
     "t.cfg:7: frontends.www.http-request: action sc-set-gpt0(0) is not supported by pylb "
     "(only sc-inc-gpc0)"),
    (dict(http_request=["deny if { src_conn_cur gt 5 }"], table=False),
     "t.cfg:6: frontends.www.http-request: src_conn_cur needs a stick table: frontend 'www' "
     "has no stick-table (declare one, or name a table: src_conn_cur(NAME))"),
    (dict(acl={"busy": "src_http_req_rate(users) gt 5"}),
     "t.cfg:7: frontends.www.acl.busy: src_http_req_rate(users): table 'users' does not "
     "store http_req_rate (add it to the stick-table's store)"),
    (dict(connection=["track-sc0 hdr(x-user)"]),
     "t.cfg:7: frontends.www.tcp-request connection: hdr(x-user) needs an HTTP request, and "
     "tcp-request connection rules run before anything is read (use src, nbsrv, var or the "
     "sc_ and src_ fetches)"),
    (dict(connection=["reject if { path_beg /x }"]),
     "t.cfg:7: frontends.www.tcp-request connection: path_beg needs an HTTP request, and "
     "tcp-request connection rules run before anything is read (use src, nbsrv, var or the "
     "sc_ and src_ fetches)"),
    (dict(acl={"api": "path_beg /api"}, connection=["reject if api"]),
     "t.cfg:8: frontends.www.tcp-request connection: ACL 'api' uses path_beg, which needs "
     "an HTTP request; tcp-request connection rules run before anything is read"),
    (dict(connection=["drop"]),
     "t.cfg:7: frontends.www.tcp-request connection: unknown action 'drop'; expected "
     "accept, reject, track-sc0, track-sc1, track-sc2 or sc-inc-gpc0"),
    (dict(connection=["reject when x"]),
     "t.cfg:7: frontends.www.tcp-request connection: unexpected 'when' (expected if or "
     "unless)"),
    (dict(connection=["reject if blocked"]),
     "t.cfg:7: frontends.www.tcp-request connection: no ACL named 'blocked'"),
]


@pytest.mark.parametrize(("kw", "message"), RULE_ERRORS)
def test_configuration_errors(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config(**kw)
    assert str(info.value) == message


def test_table_of_type_integer_cannot_hold_addresses() -> None:
    text = """\
frontends:
  www:
    bind: 127.0.0.1:8080
    stick-table: {type: integer, store: [conn_cur]}
    http-request: [track-sc0 src]
"""
    with pytest.raises(ConfigError) as info:
        loads(text, "t.cfg")
    assert str(info.value) == ("t.cfg:5: frontends.www.http-request: track-sc0 src: table "
                               "'www' is of type integer, which cannot hold addresses")


def test_tcp_mode_takes_connection_rules_and_acls() -> None:
    cfg = config(mode="tcp", acl={"many": "sc0_conn_cur gt 3"},
                 connection=["track-sc0 src", "reject if many"])
    assert len(cfg.frontends["www"].tcp_request_connection) == 2
    with pytest.raises(ConfigError, match="http-request needs mode http"):
        config(mode="tcp", http_request=["track-sc0 src"])


# -- http-request track-sc --------------------------------------------------------------------


def test_rate_limit_recipe(setup: Any) -> None:
    rules, rt = setup(http_request=["track-sc0 src",
                                    "deny deny_status 429 if { sc_http_req_rate(0) gt 3 }"])
    statuses = [request(rules, rt)[0] for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]  # the request is counted before the check
    assert request(rules, rt, Req(client_ip="10.0.0.2"))[0] == 200
    assert rt.data("www", "10.0.0.1", "http_req_rate") == 5
    assert rt.data("www", "10.0.0.1", "http_req_cnt") == 5
    assert rt.data("www", "10.0.0.1", "conn_cnt") == 5
    assert rt.data("www", "10.0.0.1", "conn_rate") == 5
    assert rt.data("www", "10.0.0.1", "http_err_cnt") == 2  # the two 429s
    assert rt.data("www", "10.0.0.1", "http_err_rate") == 2
    assert rt.data("www", "10.0.0.1", "conn_cur") == 0
    assert rt.data("www", "10.0.0.2", "http_req_cnt") == 1


def test_conn_cur_counts_requests_in_flight_and_is_released_once(setup: Any) -> None:
    rules, rt = setup(http_request=["track-sc0 src"])
    open_ = [request(rules, rt, end=False)[1].counters for _ in range(3)]
    assert rt.data("www", "10.0.0.1", "conn_cur") == 3
    for counters in open_:
        counters.end_request()
        counters.end_request()  # again: nothing more
        counters.close()
    assert rt.data("www", "10.0.0.1", "conn_cur") == 0


def test_a_tracked_counter_is_not_tracked_again(setup: Any) -> None:
    rules, rt = setup(http_request=["track-sc0 src", "track-sc0 hdr(x-ip)",
                                    "track-sc1 hdr(x-ip)"])
    _, decision = request(rules, rt, Req(headers={"x-ip": "10.9.9.9"}), end=False)
    counters = decision.counters
    assert counters.tracked(0) and counters.tracked(1) and not counters.tracked(2)
    assert rt.data("www", "10.0.0.1", "http_req_cnt") == 1  # sc0 stayed on src
    assert rt.data("www", "10.9.9.9", "http_req_cnt") == 1  # sc1
    counters.end_request()
    assert not counters.tracked(0) and not counters.tracked(1)
    assert rt.data("www", "10.9.9.9", "conn_cur") == 0


def test_samples_that_are_no_key_track_nothing(setup: Any) -> None:
    rules, rt = setup(http_request=["track-sc0 hdr(x-ip)",
                                    "deny if { sc_tracked(0) }"])
    assert request(rules, rt)[0] == 200  # no header
    assert request(rules, rt, Req(headers={"x-ip": "not-an-address"}))[0] == 200
    assert request(rules, rt, Req(headers={"x-ip": "10.1.1.1"}))[0] == 403
    assert rt.tables["www"].used == 1


def test_other_tables_and_string_keys(setup: Any) -> None:
    rules, rt = setup(http_request=["track-sc0 src", "track-sc1 hdr(x-user) table users",
                                    "set-header X-Users %[sc_http_req_cnt(1)]",
                                    "set-header X-Again %[sc1_http_req_cnt(users)]",
                                    "set-header X-App %[sc0_http_req_cnt(app)]"])
    for n in (1, 2):
        _, decision = request(rules, rt, Req(headers={"x-user": "alice"}))
        assert decision.set_headers == [("X-Users", str(n)), ("X-Again", str(n)),
                                        ("X-App", "0")]
    # an sc_ fetch naming another table looks the key up there, without creating it
    assert rt.tables["app"].used == 0
    assert rt.data("users", "alice", "conn_cur") == 0


def test_untracked_counters_are_not_found(setup: Any) -> None:
    rules, rt = setup(http_request=["track-sc1 src if { hdr(x-track) -m found }",
                                    "deny if { sc1_http_req_cnt ge 0 }"],
                      use_backend=["users if !{ sc1_tracked }"])
    status, decision = request(rules, rt)
    assert status == 200 and decision.backend == "users"  # not tracked: no match
    assert request(rules, rt, Req(headers={"x-track": "1"}))[0] == 403


def test_sc_fetches_in_acls_and_use_backend(setup: Any) -> None:
    rules, rt = setup(acl={"busy": "sc0_http_req_rate gt 1"},
                      http_request=["track-sc0 src"], use_backend=["users if busy"])
    assert request(rules, rt)[1].backend is None
    assert request(rules, rt)[1].backend == "users"


def test_gpc0_fetches_and_action(setup: Any) -> None:
    rules, rt = setup(http_request=[
        "track-sc0 src",
        "set-header X-Before %[sc_get_gpc0(0)]",
        "sc-inc-gpc0(0) if { hdr(x-bad) -m found }",
        "set-header X-After %[sc0_get_gpc0]",
    ])
    _, decision = request(rules, rt)
    assert decision.set_headers == [("X-Before", "0"), ("X-After", "0")]
    _, decision = request(rules, rt, Req(headers={"x-bad": "1"}))
    assert decision.set_headers == [("X-Before", "0"), ("X-After", "1")]
    assert rt.data("www", "10.0.0.1", "gpc0_rate") == 1
    rules, rt = setup(http_request=["track-sc0 src",
                                    "set-header X-Inc %[sc_inc_gpc0(0)]",
                                    "set-header X-Clr %[sc0_clr_gpc0]",
                                    "set-header X-Get %[sc0_get_gpc0]"])
    _, decision = request(rules, rt)
    assert decision.set_headers == [("X-Inc", "1"), ("X-Clr", "1"), ("X-Get", "0")]
    assert rt.data("www", "10.0.0.1", "gpc0_rate") == 1


def test_abuser_flag_recipe(setup: Any) -> None:
    rules, rt = setup(http_request=["track-sc0 src",
                                    "sc-inc-gpc0(0) if { sc_http_err_rate(0) gt 2 }",
                                    "deny if { sc_get_gpc0(0) gt 0 }"])
    statuses = []
    for _ in range(3):  # three 404s from the server
        counters = rules.evaluate(Req(), rt).counters
        statuses.append(200)
        counters.error()
        counters.end_request()
    statuses += [request(rules, rt)[0] for _ in range(2)]
    assert statuses == [200, 200, 200, 403, 403]
    assert request(rules, rt, Req(client_ip="10.0.0.2"))[0] == 200
    rt.tables["www"].set_data(rt.tables["www"].key_of("10.0.0.1"), None, {"gpc0": 0,
                                                                          "http_err_rate": 0})
    assert request(rules, rt)[0] == 200  # the operator cleared the flag


# -- src_ fetches -------------------------------------------------------------------------------


def test_src_fetches_look_up_without_creating(setup: Any) -> None:
    rules, rt = setup(http_request=["set-header X-Rate %[src_http_req_rate]",
                                    "set-header X-Gpc %[src_get_gpc0]",
                                    "set-header X-App %[src_gpc0(app)]"])
    _, decision = request(rules, rt)
    assert decision.set_headers == [("X-Rate", "0"), ("X-Gpc", "0"), ("X-App", "0")]
    assert rt.tables["www"].used == 0 and rt.tables["app"].used == 0
    table = rt.tables["www"]
    table.count(table.key_of("10.0.0.1"), {"http_req_rate": 7, "gpc0": 2})  # type: ignore[arg-type]
    _, decision = request(rules, rt)
    assert decision.set_headers == [("X-Rate", "7"), ("X-Gpc", "2"), ("X-App", "0")]


def test_src_inc_and_clr_gpc0_create_the_entry(setup: Any) -> None:
    rules, rt = setup(http_request=["set-header X-Inc %[src_inc_gpc0(app)]",
                                    "set-header X-Inc2 %[src_inc_gpc0(app)]",
                                    "set-header X-Clr %[src_clr_gpc0]"])
    _, decision = request(rules, rt)
    assert decision.set_headers == [("X-Inc", "1"), ("X-Inc2", "2"), ("X-Clr", "0")]
    assert rt.tables["app"].used == 1 and rt.tables["www"].used == 1


def test_src_fetch_of_an_ipv6_client_in_an_ip_table_is_not_found(setup: Any) -> None:
    rules, rt = setup(http_request=["deny if { src_conn_cnt ge 0 }"])
    assert request(rules, rt, Req(client_ip="2001:db8::1"))[0] == 200
    assert request(rules, rt, Req(client_ip="::ffff:10.0.0.1"))[0] == 403


# -- tcp-request connection -----------------------------------------------------------------


def test_connection_tracking_counts_connections_and_requests(setup: Any) -> None:
    rules, rt = setup(connection=["track-sc0 src"],
                      http_request=["track-sc0 hdr(x-ip)", "track-sc1 src"])
    assert rules.has_connection_rules
    accepted, counters = rules.connect("10.0.0.1", rt)
    assert accepted and counters is not None and counters.tracked(0)
    assert (rt.data("www", "10.0.0.1", "conn_cur"), rt.data("www", "10.0.0.1", "conn_cnt"),
            rt.data("www", "10.0.0.1", "http_req_cnt")) == (1, 1, 0)
    for _ in range(3):  # keep-alive requests: sc0 is the connection's, sc1 each request's
        request(rules, rt, Req(headers={"x-ip": "10.9.9.9"}), counters)
    assert rt.data("www", "10.9.9.9", "http_req_cnt") is None  # sc0 was taken
    assert rt.data("www", "10.0.0.1", "http_req_cnt") == 6  # sc0 (connection) and sc1
    assert rt.data("www", "10.0.0.1", "conn_cnt") == 4  # the connection, three sc1 tracks
    assert rt.data("www", "10.0.0.1", "conn_cur") == 1
    counters.begin_request()
    counters.error()  # a request that failed (400) before any rule
    counters.end_request()
    assert rt.data("www", "10.0.0.1", "http_req_cnt") == 7
    assert rt.data("www", "10.0.0.1", "http_err_cnt") == 1
    counters.close()
    counters.close()
    assert rt.data("www", "10.0.0.1", "conn_cur") == 0


def test_connection_cap_recipe(setup: Any) -> None:
    rules, rt = setup(connection=["track-sc0 src", "reject if { sc_conn_cur(0) gt 2 }"])
    results = [rules.connect("10.0.0.1", rt) for _ in range(4)]
    assert [accepted for accepted, _ in results] == [True, True, False, False]
    assert [c is None for _, c in results] == [False, False, True, True]
    assert rt.data("www", "10.0.0.1", "conn_cur") == 2  # the rejected ones let go at once
    assert rt.data("www", "10.0.0.1", "conn_cnt") == 4
    assert rules.connect("10.0.0.2", rt)[0]
    results[0][1].close()
    assert rules.connect("10.0.0.1", rt)[0]


def test_accept_and_reject_end_the_list(setup: Any) -> None:
    rules, rt = setup(connection=["accept if { src 10.0.0.1 }", "reject",
                                  "track-sc0 src"])
    assert rules.connect("10.0.0.1", rt) == (True, None)
    assert rules.connect("10.0.0.2", rt) == (False, None)
    assert rt.tables["www"].used == 0


def test_connection_inc_gpc0_and_src_fetches(setup: Any) -> None:
    rules, rt = setup(connection=["track-sc0 src",
                                  "sc-inc-gpc0(0) if { sc0_conn_rate gt 2 }",
                                  "reject if { src_get_gpc0 gt 0 }"])
    results = [rules.connect("10.0.0.1", rt)[0] for _ in range(4)]
    assert results == [True, True, False, False]
    assert rt.data("www", "10.0.0.1", "gpc0") == 2


def test_adopted_connections_track_again_without_counting_a_new_one(setup: Any) -> None:
    rules, rt = setup(connection=["track-sc0 src", "sc-inc-gpc0(0)", "reject"])
    accepted, counters = rules.connect("10.0.0.1", rt, adopted=True)
    assert accepted and counters is not None
    assert (rt.data("www", "10.0.0.1", "conn_cur"), rt.data("www", "10.0.0.1", "conn_cnt"),
            rt.data("www", "10.0.0.1", "gpc0")) == (1, 0, 0)
    counters.close()
    assert rt.data("www", "10.0.0.1", "conn_cur") == 0


def test_frontends_without_connection_rules(setup: Any) -> None:
    rules, rt = setup(http_request=["track-sc0 src"])
    assert not rules.has_connection_rules
    assert rules.connect("10.0.0.1", rt) == (True, None)
    rules, rt = setup(http_request=["deny if { src 10.0.0.9 }"])
    assert request(rules, rt)[1].counters is None  # nothing tracked: nothing to count
