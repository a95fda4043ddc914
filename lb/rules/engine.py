"""Evaluate a frontend's HTTP rules for one request, sans IO.

Everything is compiled once, at configuration time, into closures: patterns parsed,
regexes compiled, responses rendered when they do not depend on the request. Evaluating a
request then only fetches samples and compares them. The proxy supplies the request and the
runtime state (servers up, variables, maps, stick tables) through small protocols.

Stick counters (track-sc) live in a StickCounters per connection that the proxy keeps:
``connect`` makes it from the tcp-request connection rules, ``evaluate`` adds what the
request's rules track, and the proxy calls its begin_request / error / end_request / close
as the request and the connection go, so every counter is counted and released once.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from lb import errors
from lb.config.model import (
    Acl,
    AclTest,
    Condition,
    ConnectionRule,
    DenyRule,
    DisableL7RetryRule,
    Frontend,
    HeaderRule,
    HttpRequestRule,
    IncGpc0Rule,
    Payload,
    RedirectRule,
    ReturnRule,
    Sample,
    TcpConnectionRule,
    Template,
    TrackRule,
    UseBackend,
)
from lb.tls import sni_of

from . import syntax


class Request(Protocol):
    """What a rule can look at, provided by the proxy."""

    client_ip: str
    method: str
    target: str  # as received, e.g. "/api/x?y=1"
    ssl: ssl.SSLObject | None  # the client connection's TLS; None: a plain connection

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (given in lower case), None if absent."""
        ...

    def cookie(self, name: str) -> str | None:
        """The value of request cookie ``name``, None if absent."""
        ...


class Map(Protocol):
    """A map's lookups, by match kind (see lb.mapstore)."""

    def get(self, key: str, default: str | None = None) -> str | None: ...

    def prefixes(self, key: str) -> str | None: ...

    def domain(self, key: str) -> str | None: ...

    def ip(self, key: str) -> str | None: ...


class Runtime(Protocol):
    """Runtime state shared by pylb as a whole."""

    def nbsrv(self, backend: str) -> int:
        """Usable servers of ``backend``."""
        ...

    def var(self, name: str) -> str | None:
        """A runtime variable by full name, like "proc.maintenance_mode"."""
        ...

    def map(self, name: str) -> Map:
        """A named map as it is now (lb.mapstore.SharedMap)."""
        ...

    def table(self, name: str) -> Table | None:
        """A stick table by name (its proxy's); only track-sc and sc_/src_ ask."""
        ...


class Table(Protocol):
    """A stick table, as lb.sticktable.StickTable offers it (shared by every worker)."""

    type: str
    stored: tuple[str, ...]  # the data names the table keeps per entry

    def key_of(self, text: str) -> bytes | None:
        """A sample's text as the table's key; None if it cannot be one."""
        ...

    def key_text(self, key: bytes) -> str:
        ...

    def count(self, key: bytes, counts: dict[str, int]) -> None:
        """Add to the entry's counters (creating the entry); unstored names are ignored."""
        ...

    def data(self, key: bytes, name: str) -> int | None:
        """A counter or rate now; None if not stored or there is no entry."""
        ...

    def set_data(self, key: bytes, server: str | None, sets: dict[str, int]) -> None:
        """Set counters (creating the entry); ``server`` None keeps the entry's."""
        ...


# -- stick counters (track-sc) --------------------------------------------------------------

SC_COUNT = syntax.SC_COUNT
_TRACK_CONNECTION = {"conn_cur": 1, "conn_cnt": 1, "conn_rate": 1}
_TRACK_REQUEST = {**_TRACK_CONNECTION, "http_req_cnt": 1, "http_req_rate": 1}
_RETRACK = {"conn_cur": 1}  # a connection handed over by an older generation
_REQUEST = {"http_req_cnt": 1, "http_req_rate": 1}
_ERROR = {"http_err_cnt": 1, "http_err_rate": 1}
_RELEASE = {"conn_cur": -1}
_INC_GPC0 = {"gpc0": 1, "gpc0_rate": 1}


def _add(table: Table, key: bytes, counts: dict[str, int]) -> None:
    """``table.count`` when the table stores any of ``counts`` (no lock otherwise)."""
    stored = table.stored
    for name in counts:
        if name in stored:
            table.count(key, counts)
            return


class StickCounters:
    """The stick counters sc0, sc1 and sc2 of one client connection, as HAProxy's: each
    is a table and a key, tracked for the whole connection (``tcp-request connection
    track-scN``) or for the current request only (``http-request track-scN``).

    The proxy calls ``begin_request`` when a request starts (its head is read, or it
    fails before), ``error`` when its answer is a 4xx, ``end_request`` when it is over
    and ``close`` when the connection is; each is safe to call again."""

    __slots__ = ("tables", "keys", "per_request", "active")

    def __init__(self, active: bool = False) -> None:
        self.tables: list[Table | None] = [None] * SC_COUNT
        self.keys: list[bytes] = [b""] * SC_COUNT
        self.per_request = 0  # bit N: scN was tracked by the current request
        self.active = active  # a request is under way, and counted

    def tracked(self, sc: int) -> bool:
        return self.tables[sc] is not None

    def track(self, sc: int, table: Table, key: bytes, counts: dict[str, int],
              per_request: bool) -> None:
        """Track ``key`` of ``table`` as scN, counting ``counts`` on its entry now (the
        entry is created even when the table stores none of them)."""
        self.tables[sc] = table
        self.keys[sc] = key
        if per_request:
            self.per_request |= 1 << sc
        table.count(key, counts)

    def begin_request(self) -> None:
        """A request starts: it counts on the counters the connection tracks."""
        if self.active:
            return
        self.active = True
        for table, key in zip(self.tables, self.keys, strict=True):
            if table is not None:
                _add(table, key, _REQUEST)

    def error(self) -> None:
        """The request's answer is a 4xx: an HTTP error on every counter it tracks."""
        for table, key in zip(self.tables, self.keys, strict=True):
            if table is not None:
                _add(table, key, _ERROR)

    def end_request(self) -> None:
        """The request is over: the counters it tracked itself let go of their entries."""
        self.active = False
        mask = self.per_request
        if not mask:
            return
        self.per_request = 0
        for sc in range(SC_COUNT):
            table = self.tables[sc]
            if mask & (1 << sc) and table is not None:
                self.tables[sc] = None
                _add(table, self.keys[sc], _RELEASE)

    def close(self) -> None:
        """The connection is over (or goes to another process): let go of everything."""
        self.end_request()
        for sc in range(SC_COUNT):
            table = self.tables[sc]
            if table is not None:
                self.tables[sc] = None
                _add(table, self.keys[sc], _RELEASE)

    def __repr__(self) -> str:
        tracked = [f"sc{n}={t.key_text(k)}" for n, (t, k) in
                   enumerate(zip(self.tables, self.keys, strict=True)) if t is not None]
        return f"StickCounters({', '.join(tracked)})"


@dataclass(slots=True)
class Decision:
    """What to do with one request.

    ``response``: a whole HTTP/1.1 response to send instead of forwarding (it has
    Content-Length and ``Connection: close``); ``b""`` when an empty errorfile says to close
    without answering. Otherwise ``backend`` is the backend use_backend chose (None: the
    default_backend). To edit the request, first remove every header whose lower-case name
    is in ``del_headers``, then append ``set_headers`` in order. ``counters``: the stick
    counters the connection and this request track (those passed in, or new ones when a
    track-sc rule started tracking), for the proxy to finish counting.
    ``disable_l7_retry``: never replay this request once it reached a server.
    """

    backend: str | None = None
    response: bytes | None = None
    set_headers: list[tuple[str, str]] = field(default_factory=list)
    del_headers: list[str] = field(default_factory=list)
    counters: StickCounters | None = None
    disable_l7_retry: bool = False  # http-request disable-l7-retry


_UNSET = object()


class _Eval:
    """One evaluation: the request, the runtime, the decision being built, the path once
    computed and the headers as earlier rules changed them (HAProxy applies header edits
    at once, so a later rule sees them), the stick counters tracked so far, the
    frontend's own stick table (its name; None without one)."""

    __slots__ = ("request", "runtime", "decision", "_path", "edited", "counters",
                 "own_table", "adopted")

    def __init__(self, request: Request, runtime: Runtime,
                 counters: StickCounters | None = None, own_table: str | None = None,
                 adopted: bool = False) -> None:
        self.request = request
        self.runtime = runtime
        self.decision = Decision()
        self._path: object = _UNSET
        self.edited: dict[str, str | None] | None = None
        self.counters = counters
        self.own_table = own_table
        self.adopted = adopted  # connection rules for a connection handed over

    def path(self) -> str | None:
        path = self._path
        if path is _UNSET:
            path = self._path = path_of(self.request.target)
        return path  # type: ignore[return-value]

    def header(self, name: str) -> str | None:
        edited = self.edited
        if edited is not None and name in edited:
            return edited[name]
        return self.request.header(name)


Fn = Callable[[_Eval], object]
Test = Callable[[_Eval], bool]


def path_of(target: str) -> str | None:
    """The path of a request target: from the first / to before the ?. Absolute-form
    targets lose their scheme and authority; ``*`` has no path."""
    if not target.startswith("/"):
        start = target.find("://")
        if start < 0:
            return None
        slash = target.find("/", start + 3)
        target = target[slash:] if slash >= 0 else ""
    query = target.find("?")
    return target if query < 0 else target[:query]


def _uri_of(target: str) -> str:
    """Path and query, for redirects; "/" when the target has no path (or is ``*``)."""
    if target.startswith("/"):
        return target
    start = target.find("://")
    slash = target.find("/", start + 3) if start >= 0 else -1
    return target[slash:] if slash >= 0 else "/"


def _host(ev: _Eval) -> str | None:
    """The Host header without its port ("[::1]:80" gives "[::1]")."""
    host = ev.header("host")
    if host is None:
        return None
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end >= 0 else host
    name, colon, port = host.rpartition(":")
    return name if colon and (port.isdigit() or not port) else host


# -- samples --------------------------------------------------------------------------------


def _fetch_var(args: tuple[str, ...]) -> Fn:
    name = args[0]
    default = args[1] if len(args) > 1 else None
    if default is None:
        return lambda ev: ev.runtime.var(name)

    def fetch(ev: _Eval) -> object:
        value = ev.runtime.var(name)
        return default if value is None else value

    return fetch


def _fetch_hdr(args: tuple[str, ...]) -> Fn:
    name = args[0]
    return lambda ev: ev.header(name)


def _fetch_cook(args: tuple[str, ...]) -> Fn:
    name = args[0]
    return lambda ev: ev.request.cookie(name)


def _fetch_nbsrv(args: tuple[str, ...]) -> Fn:
    backend = args[0]
    return lambda ev: ev.runtime.nbsrv(backend)


# -- the client connection's TLS: ssl_fc and friends ------------------------------------


def _ssl_fc(ev: _Eval) -> object:
    return int(ev.request.ssl is not None)


def _ssl_fc_is_resumed(ev: _Eval) -> object:
    tls = ev.request.ssl
    return int(tls is not None and tls.session_reused)


def _ssl_fc_has_sni(ev: _Eval) -> object:
    tls = ev.request.ssl
    return int(tls is not None and sni_of(tls) is not None)


def _cipher(tls: ssl.SSLObject) -> str | None:
    cipher = tls.cipher()
    return cipher[0] if cipher else None


def _tls(get: Callable[[ssl.SSLObject], object]) -> Callable[[tuple[str, ...]], Fn]:
    """A fetch of the connection's TLS: no sample on a plain connection, or when ``get``
    has none (no SNI, no ALPN protocol agreed)."""

    def build(args: tuple[str, ...]) -> Fn:
        def fetch(ev: _Eval) -> object:
            tls = ev.request.ssl
            return None if tls is None else get(tls)

        return fetch

    return build


# Canonical fetch (Sample.fetch) -> builder from its arguments.
FETCHERS: dict[str, Callable[[tuple[str, ...]], Fn]] = {
    "src": lambda args: lambda ev: ev.request.client_ip,
    "path": lambda args: _Eval.path,
    "url": lambda args: lambda ev: ev.request.target,
    "method": lambda args: lambda ev: ev.request.method,
    "host": lambda args: _host,
    "hdr": _fetch_hdr,
    "cook": _fetch_cook,
    "nbsrv": _fetch_nbsrv,
    "var": _fetch_var,
    # booleans as HAProxy gives them: 0 or 1, and 0 on a plain connection
    "ssl_fc": lambda args: _ssl_fc,
    "ssl_fc_has_sni": lambda args: _ssl_fc_has_sni,
    "ssl_fc_is_resumed": lambda args: _ssl_fc_is_resumed,
    "ssl_fc_sni": _tls(sni_of),
    "ssl_fc_protocol": _tls(lambda tls: tls.version()),
    "ssl_fc_cipher": _tls(_cipher),
    "ssl_fc_alpn": _tls(lambda tls: tls.selected_alpn_protocol()),
    "ssl_c_used": _tls(lambda tls: int(tls.getpeercert(True) is not None)),
}


# -- stick counter fetches: sc_*, scN_*, src_* ----------------------------------------------

# Where an sc_ or src_ fetch looks: (table, key, whether the entry may be created), or None
# when there is nothing to look at (the counter is not tracked, no such table...).
Where = Callable[[_Eval], "tuple[Table, bytes, bool] | None"]


def _table_operation(operation: str, where: Where) -> Fn:
    """A data name (the value now, 0 without an entry, not found when the table does not
    store it), inc_gpc0 (the new gpc0) or clr_gpc0 (the old gpc0, set to 0)."""
    if operation == "inc_gpc0":

        def inc(ev: _Eval) -> object:
            found = where(ev)
            if found is None:
                return None
            table, key, create = found
            stored = table.stored
            if "gpc0" not in stored and "gpc0_rate" not in stored:
                return 0
            if not create and table.data(key, "gpc0" if "gpc0" in stored else "gpc0_rate") is None:
                return 0  # no entry in that table, and an sc_ fetch creates none
            table.count(key, _INC_GPC0)
            value = table.data(key, "gpc0")
            return value if value is not None else 0

        return inc
    if operation == "clr_gpc0":

        def clear(ev: _Eval) -> object:
            found = where(ev)
            if found is None:
                return None
            table, key, create = found
            if "gpc0" not in table.stored:
                return 0
            old = table.data(key, "gpc0")
            if old is None and not create:
                return 0
            table.set_data(key, None, {"gpc0": 0})
            return old or 0

        return clear

    def get(ev: _Eval) -> object:
        found = where(ev)
        if found is None:
            return None
        table, key, _create = found
        if operation not in table.stored:
            return None
        value = table.data(key, operation)
        return 0 if value is None else value

    return get


def _fetch_sc(args: tuple[str, ...]) -> Fn:
    """``sc_<data>(N[,TABLE])``: the entry stick counter N tracks; with TABLE, the same key
    looked up in TABLE instead (HAProxy's "alternate table"). Not found when not tracked."""
    operation, sc, other = args[0], int(args[1]), args[2]
    if operation == "tracked":

        def tracked(ev: _Eval) -> object:
            counters = ev.counters
            return int(counters is not None and counters.tables[sc] is not None)

        return tracked

    def where(ev: _Eval) -> tuple[Table, bytes, bool] | None:
        counters = ev.counters
        if counters is None:
            return None
        table = counters.tables[sc]
        if table is None:
            return None
        key = counters.keys[sc]
        if not other:
            return table, key, True
        alternate = ev.runtime.table(other)
        if alternate is None:
            return None
        if alternate is not table:
            converted = alternate.key_of(table.key_text(key))
            if converted is None:
                return None
            key = converted
        return alternate, key, False

    return _table_operation(operation, where)


def _fetch_src_table(args: tuple[str, ...]) -> Fn:
    """``src_<data>([TABLE])``: the client address looked up in TABLE (default: the
    frontend's own); only src_inc_gpc0 and src_clr_gpc0 create an entry."""
    operation, name = args

    def where(ev: _Eval) -> tuple[Table, bytes, bool] | None:
        table_name = name or ev.own_table
        table = ev.runtime.table(table_name) if table_name else None
        if table is None:
            return None
        key = table.key_of(ev.request.client_ip)
        return (table, key, True) if key is not None else None

    return _table_operation(operation, where)


FETCHERS["sc"] = _fetch_sc
FETCHERS["src_table"] = _fetch_src_table

Converter = Callable[[_Eval, str], "str | None"]


def _map_converter(args: tuple[str, ...]) -> Converter:
    name = args[0]
    default = args[1] if len(args) > 1 else None
    return lambda ev, value: ev.runtime.map(name).get(value, default)


def _map_match(lookup: Callable[[Map, str], str | None]) -> Callable[[tuple[str, ...]], Converter]:
    """map_beg, map_dom, map_ip: the value of the pattern that matches the sample."""

    def build(args: tuple[str, ...]) -> Converter:
        name = args[0]
        default = args[1] if len(args) > 1 else None

        def convert(ev: _Eval, value: str) -> str | None:
            found = lookup(ev.runtime.map(name), value)
            return default if found is None else found

        return convert

    return build


CONVERTERS: dict[str, Callable[[tuple[str, ...]], Converter]] = {
    "lower": lambda args: lambda ev, value: value.lower(),
    "upper": lambda args: lambda ev, value: value.upper(),
    "map": _map_converter,
    "map_str": _map_converter,
    "map_beg": _map_match(lambda m, value: m.prefixes(value)),
    "map_dom": _map_match(lambda m, value: m.domain(value)),
    "map_ip": _map_match(lambda m, value: m.ip(value)),
}


def compile_sample(sample: Sample) -> Fn:
    """The sample as a function of the evaluation: None when it cannot be fetched (no such
    header, variable unset, map miss without default)."""
    fetch = FETCHERS[sample.fetch](sample.args)
    if not sample.converters:
        return fetch
    converters = [CONVERTERS[name](args) for name, args in sample.converters]

    def run(ev: _Eval) -> object:
        value = fetch(ev)
        if value is None:
            return None
        text = value if isinstance(value, str) else str(value)
        for convert in converters:
            converted = convert(ev, text)
            if converted is None:
                return None
            text = converted
        return text

    return run


# -- matching -------------------------------------------------------------------------------


def _text(value: object) -> str:
    return value if isinstance(value, str) else str(value)


def _as_int(value: object) -> int | None:
    if isinstance(value, int):
        return value
    text = _text(value)
    return int(text) if text.isascii() and text.isdigit() else None


def _in_ranges(ranges: list[tuple[int | None, int | None, bool]]) -> Callable[[int], bool]:
    if len(ranges) == 1:
        low, high, outside = ranges[0]
        return lambda n: ((low is None or n >= low) and (high is None or n <= high)) != outside

    def check(n: int) -> bool:
        for low, high, outside in ranges:
            if ((low is None or n >= low) and (high is None or n <= high)) != outside:
                return True
        return False

    return check


def _ip_key(text: str) -> tuple[int, int] | None:
    family, version = (socket.AF_INET6, 6) if ":" in text else (socket.AF_INET, 4)
    try:
        return version, int.from_bytes(socket.inet_pton(family, text), "big")
    except OSError:
        return None


def _embedded_v4(address: int) -> int | None:
    """The IPv4 address inside ::ffff:a.b.c.d, ::a.b.c.d or 2002:AABB:CCDD::."""
    if address >> 32 in (0, 0xFFFF):
        return address & 0xFFFFFFFF
    if address >> 112 == 0x2002:
        return (address >> 80) & 0xFFFFFFFF
    return None


def _ip_matcher(values: tuple[str, ...]) -> Callable[[object], bool]:
    """IPv4 and IPv6 compared across families as HAProxy does (section 7.1.6)."""
    nets = [syntax.parse_ip_pattern(v) for v in values]
    v4 = [(net, mask) for version, net, mask in nets if version == 4]
    v6 = [(net, mask) for version, net, mask in nets if version == 6]

    def match(value: object) -> bool:
        key = _ip_key(_text(value))
        if key is None:
            return False
        version, address = key
        if version == 4:
            if any(address & mask == net for net, mask in v4):
                return True
            mapped = (0xFFFF << 32) | address
            return any(mapped & mask == net for net, mask in v6)
        if any(address & mask == net for net, mask in v6):
            return True
        inner = _embedded_v4(address) if v4 else None
        return inner is not None and any(inner & mask == net for net, mask in v4)

    return match


def _matcher(test: AclTest) -> Callable[[object], bool]:
    """A predicate on a fetched (not None) sample, for the test's method and patterns."""
    match, icase = test.match, test.icase
    values = tuple(v.lower() for v in test.values) if icase else test.values
    fold: Callable[[object], str] = (lambda v: _text(v).lower()) if icase else _text
    if match == "found":
        return lambda value: True
    if match == "bool":
        return lambda value: bool(_as_int(value))
    if match == "str":
        wanted = frozenset(values)
        return lambda value: fold(value) in wanted
    if match == "beg":
        return lambda value: fold(value).startswith(values)
    if match == "end":
        return lambda value: fold(value).endswith(values)
    if match == "sub":
        return lambda value: any(v in fold(value) for v in values)
    if match == "reg":
        regexes = [syntax.compile_regex(v, icase) for v in test.values]
        return lambda value: any(r.search(_text(value)) for r in regexes)
    if match in ("int", "len"):
        check = _in_ranges([syntax.parse_int_pattern(v, test.operator) for v in values])
        if match == "len":
            return lambda value: check(len(_text(value)))

        def integer(value: object) -> bool:
            n = _as_int(value)
            return n is not None and check(n)

        return integer
    if match == "ip":
        return _ip_matcher(values)
    raise ValueError(f"unknown match method {match!r}")


def compile_test(test: AclTest) -> Test:
    sample = compile_sample(test.sample)
    if test.match == "found":
        return lambda ev: sample(ev) is not None
    match = _matcher(test)

    def run(ev: _Eval) -> bool:
        value = sample(ev)
        return value is not None and match(value)

    return run


def _any(tests: list[Test]) -> Test:
    if len(tests) == 1:
        return tests[0]
    return lambda ev: any(t(ev) for t in tests)


def _all(tests: list[Test]) -> Test:
    if len(tests) == 1:
        return tests[0]
    if len(tests) == 2:
        first, second = tests
        return lambda ev: first(ev) and second(ev)
    return lambda ev: all(t(ev) for t in tests)


def _not(test: Test) -> Test:
    return lambda ev: not test(ev)


def compile_acls(acls: tuple[Acl, ...]) -> dict[str, Test]:
    """Named ACLs: each true when any of its lines matches."""
    return {acl.name: _any([compile_test(t) for t in acl.tests]) for acl in acls}


def compile_condition(cond: Condition, acls: Mapping[str, Test]) -> Test:
    groups: list[Test] = []
    for group in cond.any_of:
        uses: list[Test] = []
        for use in group:
            if use.anonymous is not None:
                test = compile_test(use.anonymous)
            elif use.name in acls:
                test = acls[use.name]
            else:
                raise ValueError(f"no ACL named {use.name!r}")
            uses.append(_not(test) if use.negate else test)
        groups.append(_all(uses))
    either = _any(groups)
    return _not(either) if cond.unless else either


# -- values and responses -------------------------------------------------------------------

_NO_CONTROLS = dict.fromkeys(map(ord, "\r\n\0"))


def compile_template(template: Template) -> Callable[[_Eval], str]:
    """The template's text for a request; samples that cannot be fetched give nothing, and
    CR, LF and NUL are dropped from fetched text so it cannot break a header."""
    static = syntax.static_text(template)
    if static is not None:
        return lambda ev: static
    parts: list[str | Fn] = [p if isinstance(p, str) else compile_sample(p) for p in template]

    def render(ev: _Eval) -> str:
        out: list[str] = []
        for part in parts:
            if isinstance(part, str):
                out.append(part)
            else:
                value = part(ev)
                if value is not None:
                    out.append(_text(value).translate(_NO_CONTROLS))
        return "".join(out)

    return render


def _head(status: int, headers: list[tuple[str, str]], length: int) -> bytes:
    lines = [f"HTTP/1.1 {status} {syntax.reason(status)}".rstrip()]
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [f"Content-Length: {length}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1", "replace")


def _payload(payload: Payload, errorfiles: Mapping[int, bytes]) -> Callable[[_Eval], bytes]:
    """deny / return: an errorfile, pylb's page for the status, or status + body."""
    if payload.errorfile is not None:
        response = payload.errorfile
        return lambda ev: response
    if payload.default_errorfile:
        status = payload.status
        response = errorfiles[status] if status in errorfiles else errors.page(status)
        return lambda ev: response
    body = payload.body
    fixed = [("Content-Type", payload.content_type)] if payload.content_type and body else []
    statics = [(name, syntax.static_text(value)) for name, value in payload.headers]
    if all(text is not None for _, text in statics):
        rendered = fixed + [(name, text or "") for name, text in statics]
        response = _head(payload.status, rendered, len(body)) + body
        return lambda ev: response
    values = [(name, compile_template(value)) for name, value in payload.headers]
    status = payload.status
    return lambda ev: (
        _head(status, fixed + [(name, value(ev)) for name, value in values], len(body)) + body
    )


def _redirect(rule: RedirectRule) -> Callable[[_Eval], bytes]:
    code, kind = rule.code, rule.kind
    value = compile_template(rule.value)
    static = syntax.static_text(rule.value)
    if kind == "location" and static is not None:
        response = _head(code, [("Location", static)], 0)
        return lambda ev: response
    drop_query, append_slash = rule.drop_query, rule.append_slash

    def uri(ev: _Eval) -> str:
        target = _uri_of(ev.request.target)
        path, mark, query = target.partition("?")
        if append_slash and not path.endswith("/"):
            path += "/"
        return path if drop_query or not mark else f"{path}?{query}"

    def respond(ev: _Eval) -> bytes:
        if kind == "location":
            location = value(ev)
        elif kind == "prefix":
            prefix = value(ev)
            location = uri(ev) if prefix == "/" else prefix + uri(ev)
        else:
            host = (ev.header("host") or "").translate(_NO_CONTROLS)
            location = f"{value(ev)}://{host}{uri(ev)}"
        return _head(code, [("Location", location)], 0)

    return respond


def _header_action(rule: HeaderRule) -> Callable[[_Eval], None]:
    """set-header, add-header and del-header: recorded in the decision, and visible to
    the rules after them."""
    name, key, action = rule.name, rule.name.lower(), rule.action
    value = compile_template(rule.value) if rule.value is not None else None

    def apply(ev: _Eval) -> None:
        decision = ev.decision
        text = value(ev) if value is not None else None  # before removal, as HAProxy
        if action != "add-header":
            if decision.set_headers:
                decision.set_headers = [h for h in decision.set_headers if h[0].lower() != key]
            if key not in decision.del_headers:
                decision.del_headers.append(key)
        if ev.edited is None:
            ev.edited = {}
        if text is None:
            ev.edited[key] = None
            return
        decision.set_headers.append((name, text))
        if action == "set-header" or ev.header(key) is None:
            ev.edited[key] = text

    return apply


Action = Callable[[_Eval], "bytes | None"]


def _action(rule: HttpRequestRule, errorfiles: Mapping[int, bytes],
            own_table: str | None = None) -> Action:
    """The rule as a function returning a response (terminal rules) or None."""
    if isinstance(rule, DenyRule | ReturnRule):
        return _payload(rule.payload, errorfiles)
    if isinstance(rule, RedirectRule):
        return _redirect(rule)
    if isinstance(rule, TrackRule | IncGpc0Rule):
        return _counter_action(rule, own_table, per_request=True)  # type: ignore[return-value]
    if isinstance(rule, DisableL7RetryRule):
        return _disable_l7_retry
    return _header_action(rule)


def _disable_l7_retry(ev: _Eval) -> None:
    ev.decision.disable_l7_retry = True


def _counter_action(rule: TrackRule | IncGpc0Rule, own_table: str | None,
                    per_request: bool) -> Callable[[_Eval], None]:
    """track-scN (http-request: for this request; tcp-request connection: for the
    connection) and sc-inc-gpc0(N). Tracking a counter already tracked does nothing, as
    in HAProxy; a sample that cannot be fetched, or cannot be a key of the table, tracks
    nothing."""
    sc = rule.sc
    if isinstance(rule, IncGpc0Rule):

        def inc_gpc0(ev: _Eval) -> None:
            counters = ev.counters
            if counters is not None and not ev.adopted:
                table = counters.tables[sc]
                if table is not None:
                    table.count(counters.keys[sc], _INC_GPC0)

        return inc_gpc0
    name = rule.table or own_table
    sample = compile_sample(rule.sample)
    counts = _TRACK_REQUEST if per_request else _TRACK_CONNECTION

    def track(ev: _Eval) -> None:
        counters = ev.counters
        if counters is not None and counters.tables[sc] is not None:
            return
        table = ev.runtime.table(name) if name else None
        if table is None:
            return
        value = sample(ev)
        if value is None:
            return
        key = table.key_of(_text(value))
        if key is None:
            return
        if counters is None:
            counters = ev.counters = StickCounters(active=per_request)
        counters.track(sc, table, key, _RETRACK if ev.adopted else counts, per_request)

    return track


class _Client:
    """A connection as tcp-request connection rules see it: an address, no request."""

    __slots__ = ("client_ip",)
    method = ""
    target = ""
    ssl = None  # never asked: lb.rules.syntax keeps TLS fetches out of these rules

    def __init__(self, client_ip: str) -> None:
        self.client_ip = client_ip

    def header(self, name: str) -> str | None:
        return None

    def cookie(self, name: str) -> str | None:
        return None


def _connection_action(rule: TcpConnectionRule, own_table: str | None
                       ) -> Callable[[_Eval], bool | None]:
    """True: accept, False: reject, None: go on with the next rule."""
    if isinstance(rule, ConnectionRule):
        verdict = rule.action == "accept"
        return lambda ev: verdict
    return _counter_action(rule, own_table, per_request=False)


# -- the frontend ---------------------------------------------------------------------------


class FrontendRules:
    """A frontend's acl, tcp-request connection, http-request, use_backend, monitor-uri and
    errorfile, compiled."""

    def __init__(self) -> None:
        self._own_table: str | None = None  # the frontend's stick table (its name)
        self._connection: list[tuple[Test | None, Callable[[_Eval], bool | None]]] = []
        self._rules: list[tuple[Test | None, Action]] = []
        self._use_backend: list[tuple[Test | None, Callable[[_Eval], str | None]]] = []
        self._monitor_uri: str | None = None
        self._monitor_by_path = False
        self._monitor_fail: Test | None = None
        self._monitor_ok = b""
        self._monitor_failed = b""
        self._errorfiles: dict[int, bytes] = {}

    @classmethod
    def compile(
        cls,
        cfg: Frontend,
        maps: Mapping[str, object] | None = None,
        *,
        backends: Collection[str] | None = None,
    ) -> FrontendRules:
        """Compile ``cfg``'s rules. ``maps`` (Config.maps) and ``backends`` (the backend
        names), when given, are checked against what the rules name; with ``backends``, a
        dynamic use_backend naming no backend gives the default_backend, as in HAProxy.
        Raises ValueError for rules lb.config would have refused."""
        self = cls()
        self._errorfiles = {e.status: e.response for e in cfg.errorfiles}
        acls = compile_acls(cfg.acl)
        if maps is not None:
            _check_maps(cfg, maps)

        def condition(cond: Condition | None) -> Test | None:
            return None if cond is None else compile_condition(cond, acls)

        own = self._own_table = cfg.name if cfg.stick_table is not None else None
        self._connection = [(condition(r.cond), _connection_action(r, own))
                            for r in cfg.tcp_request_connection]
        self._rules = [(condition(r.cond), _action(r, self._errorfiles, own))
                       for r in cfg.http_request]
        self._use_backend = [(condition(u.cond), _chooser(u, backends))
                             for u in cfg.use_backend]
        if cfg.monitor_uri is not None:
            self._monitor_uri = cfg.monitor_uri
            self._monitor_by_path = cfg.monitor_uri.startswith("/")
            self._monitor_fail = condition(cfg.monitor_fail)
            self._monitor_ok = self._errorfiles.get(200, errors.page(200, "Service ready."))
            self._monitor_failed = self._errorfiles.get(503, errors.page(503))
        return self

    def evaluate(self, request: Request, runtime: Runtime,
                 counters: StickCounters | None = None) -> Decision:
        """monitor-uri first (before any rule, as in HAProxy), then http-request rules in
        order until one answers, then the first use_backend that matches. ``counters``:
        the stick counters the connection tracks (its request already begun); the
        decision's ``counters`` are those plus what this request's rules tracked."""
        ev = _Eval(request, runtime, counters, self._own_table)
        decision = ev.decision
        if self._monitor_uri is not None:
            probe = ev.path() if self._monitor_by_path else request.target
            if probe == self._monitor_uri:
                failed = self._monitor_fail is not None and self._monitor_fail(ev)
                decision.response = self._monitor_failed if failed else self._monitor_ok
                decision.counters = ev.counters
                return decision
        for cond, action in self._rules:
            if cond is None or cond(ev):
                response = action(ev)
                if response is not None:
                    decision.response = response
                    decision.counters = ev.counters
                    return decision
        for cond, choose in self._use_backend:
            if cond is None or cond(ev):
                decision.backend = choose(ev)
                break
        decision.counters = ev.counters
        return decision

    @property
    def has_connection_rules(self) -> bool:
        return bool(self._connection)

    def connect(self, client_ip: str, runtime: Runtime,
                adopted: bool = False) -> tuple[bool, StickCounters | None]:
        """``tcp-request connection`` rules for a new connection, in order until accept or
        reject: (accepted, the stick counters it tracks). A rejected connection tracks
        nothing (what its rules tracked is let go at once). ``adopted``: a connection that
        an older generation accepted and handed over: its counters are tracked again
        (conn_cur only: it is not a new connection), and it is not rejected."""
        ev = _Eval(_Client(client_ip), runtime, None, self._own_table, adopted)
        accepted = True
        for cond, action in self._connection:
            if cond is None or cond(ev):
                verdict = action(ev)
                if verdict is not None:
                    accepted = verdict or adopted
                    break
        counters = ev.counters
        if not accepted and counters is not None:
            counters.close()
            counters = None
        return accepted, counters

    def error_page(self, status: int) -> bytes | None:
        """The errorfile response for ``status``, if the frontend has one (b"": close
        without answering)."""
        return self._errorfiles.get(status)


def _chooser(rule: UseBackend, backends: Collection[str] | None) -> Callable[[_Eval], str | None]:
    if rule.dynamic is None:
        name = rule.backend
        return lambda ev: name
    render = compile_template(rule.dynamic)

    def choose(ev: _Eval) -> str | None:
        name = render(ev)
        if not name or (backends is not None and name not in backends):
            return None
        return name

    return choose


def _check_maps(cfg: Frontend, maps: Mapping[str, object]) -> None:
    tests: list[AclTest] = [t for acl in cfg.acl for t in acl.tests]
    samples = [t.sample for t in tests]
    for rule in (*cfg.tcp_request_connection, *cfg.http_request, *cfg.use_backend):
        samples.extend(syntax.rule_samples(rule))
    samples.extend(u.anonymous.sample for u in syntax.condition_uses(cfg.monitor_fail)
                   if u.anonymous is not None)
    for sample in samples:
        for kind, name in syntax.references(sample):
            if kind == "map" and name not in maps:
                raise ValueError(f"no map named {name!r}")


def load_map(path: str) -> dict[str, str]:
    """A map file's content (see lb.rules.syntax.load_map)."""
    return syntax.load_map(path)
