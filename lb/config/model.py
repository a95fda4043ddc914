"""The validated configuration, as the rest of pylb sees it: frozen dataclasses."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from lb.tls.certs import Certificate


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP endpoint. ``host`` is ``0.0.0.0`` for ``*``, and IPv6 without brackets."""

    host: str
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        """AF_INET6 for IPv6 literals, AF_INET otherwise (also for host names)."""
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TlsBind:
    """A bind with ``ssl: true``: what its handshakes offer (lb.tls.context builds it)."""

    address: Address
    certificates: tuple[Certificate, ...]  # read and checked; the first is the default
    alpn: tuple[str, ...] | None  # None only while loading (then the mode's default)
    min_version: str  # TLSv1.2 or TLSv1.3
    ciphers: str | None  # TLS 1.2 cipher list (OpenSSL's words)
    ciphersuites: str | None  # TLS 1.3 cipher suites
    ca: bytes | None  # PEM of the CAs that client certificates must chain to
    verify: str  # none, optional or required: client certificates
    strict_sni: bool  # refuse a handshake whose server name no certificate has
    line: int


@dataclass(frozen=True, slots=True)
class Timeouts:
    """All in seconds."""

    connect: float
    client: float
    server: float
    queue: float
    http_request: float
    http_keep_alive: float
    check: float
    tunnel: float


@dataclass(frozen=True, slots=True)
class StatsSocket:
    path: str
    mode: int
    user: str | None
    group: str | None
    level: str
    expose_fd: bool
    timeout: float


@dataclass(frozen=True, slots=True)
class Global:
    workers: int
    maxconn: int
    pidfile: str | None
    daemon: bool
    hard_stop_after: float | None
    log: str
    max_header_size: int
    stats: StatsSocket | None
    spread_checks: int = 0  # percent of random jitter on health check intervals
    tls_ticket_rotate: float = 3600.0  # seconds between new session ticket keys
    # who workers run as, and where (lb.privileges): HAProxy's user, group and chroot
    user: str | None = None
    group: str | None = None  # None: the user's own group
    chroot: str | None = None


# -- HTTP rules: HAProxy's words, parsed (by lb.rules.syntax) but not compiled -------------
# lb.rules.FrontendRules compiles these into the per-request evaluator. Plain data, so the
# configuration still pickles and compares.


@dataclass(frozen=True, slots=True)
class Sample:
    """A fetch and its converters, as in ``hdr(host),lower,map(hosts,app)``.

    ``fetch`` is the canonical name (src path url method hdr cook host nbsrv var sc
    src_table); ``args`` its arguments (a header name in lower case, a cookie name, a
    backend, ``proc.NAME`` and an optional default; for ``sc``: what to fetch (a stored
    data name, inc_gpc0, clr_gpc0 or tracked), the counter number and a table name or "";
    for ``src_table`` the same without the number); ``converters`` pairs of
    (lower|upper|map, arguments)."""

    fetch: str
    args: tuple[str, ...]
    converters: tuple[tuple[str, tuple[str, ...]], ...]
    text: str


# Literal text and samples, for values that may contain %[...] (set-header, redirect, ...).
Template = tuple[str | Sample, ...]


@dataclass(frozen=True, slots=True)
class AclTest:
    """One ACL line: a sample, a match method and the patterns, any of which may match.

    ``match`` is str beg end sub reg len found bool int ip; ``operator`` is eq ne lt le gt
    ge for int and len (eq otherwise); ``values`` are the patterns as written."""

    sample: Sample
    match: str
    icase: bool
    operator: str
    values: tuple[str, ...]
    text: str
    line: int


@dataclass(frozen=True, slots=True)
class Acl:
    """A named ACL: its lines are OR'ed, as when HAProxy repeats an ``acl`` name."""

    name: str
    tests: tuple[AclTest, ...]
    line: int


@dataclass(frozen=True, slots=True)
class AclUse:
    """One word of a condition: a named ACL (``anonymous`` None) or ``{ ... }``."""

    name: str | None
    anonymous: AclTest | None
    negate: bool


@dataclass(frozen=True, slots=True)
class Condition:
    """``if``/``unless`` followed by OR'ed groups of AND'ed ACL uses."""

    unless: bool
    any_of: tuple[tuple[AclUse, ...], ...]
    text: str


@dataclass(frozen=True, slots=True)
class Payload:
    """What ``deny`` and ``return`` send: an errorfile (``errorfile`` path or the frontend's
    for the status) or a body with a content type and extra headers."""

    status: int
    errorfile: bytes | None  # a whole response, already normalised
    default_errorfile: bool  # the frontend's errorfile for ``status``, else pylb's page
    content_type: str | None
    body: bytes
    headers: tuple[tuple[str, Template], ...]


@dataclass(frozen=True, slots=True)
class DenyRule:
    payload: Payload
    cond: Condition | None
    line: int


@dataclass(frozen=True, slots=True)
class ReturnRule:
    payload: Payload
    cond: Condition | None
    line: int


@dataclass(frozen=True, slots=True)
class RedirectRule:
    """``kind`` is location, prefix or scheme; ``value`` may contain %[...]."""

    kind: str
    value: Template
    code: int
    drop_query: bool
    append_slash: bool
    cond: Condition | None
    line: int


@dataclass(frozen=True, slots=True)
class HeaderRule:
    """set-header / add-header (``value`` set) or del-header (``value`` None)."""

    action: str
    name: str
    value: Template | None
    cond: Condition | None
    line: int


@dataclass(frozen=True, slots=True)
class TrackRule:
    """``track-sc0|1|2 SAMPLE [table NAME]``: start tracking stick counter ``sc`` with the
    sample's value as the key, in table ``table`` (None: the frontend's own table)."""

    sc: int
    sample: Sample
    table: str | None
    cond: Condition | None
    line: int


@dataclass(frozen=True, slots=True)
class IncGpc0Rule:
    """``sc-inc-gpc0(N)``: add one to gpc0 (and gpc0_rate) of tracked counter ``sc``."""

    sc: int
    cond: Condition | None
    line: int


@dataclass(frozen=True, slots=True)
class DisableL7RetryRule:
    """``disable-l7-retry``: this request is not replayed after it reached a server."""

    cond: Condition | None
    line: int


@dataclass(frozen=True, slots=True)
class ConnectionRule:
    """``accept`` or ``reject`` of ``tcp-request connection``."""

    action: str
    cond: Condition | None
    line: int


HttpRequestRule = (
    DenyRule | ReturnRule | RedirectRule | HeaderRule | TrackRule | IncGpc0Rule
    | DisableL7RetryRule
)
# One ``tcp-request connection`` rule: evaluated once per connection, before any byte is read.
TcpConnectionRule = ConnectionRule | TrackRule | IncGpc0Rule


@dataclass(frozen=True, slots=True)
class UseBackend:
    """A backend by name (``dynamic`` None) or by ``%[...]`` evaluated per request."""

    backend: str
    dynamic: Template | None
    cond: Condition | None
    line: int


@dataclass(frozen=True, slots=True)
class ErrorFile:
    """``errorfile STATUS PATH``: the file's response, normalised (Content-Length and
    Connection: close); empty when the file is (close without answering)."""

    status: int
    path: str
    response: bytes


@dataclass(frozen=True, slots=True)
class StickTable:
    """``type`` is "ip", "ipv6", "integer" or "string" (keys of at most ``key_len``
    bytes); ``size`` is a number of entries; ``expire`` in seconds, None when entries only
    leave to make room for new ones; ``store``: the data kept per entry, as (name, period
    in ms, 0 for counters), like ("http_req_rate", 10000)."""

    type: str
    size: int
    expire: float | None
    key_len: int = 32
    store: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Frontend:
    name: str
    binds: tuple[Address, ...]
    mode: str
    maxconn: int
    backlog: int
    default_backend: str | None
    timeouts: Timeouts
    forwardfor: bool
    log: str | None
    line: int
    # HTTP rules (mode http only); see lb.rules for what they do.
    acl: tuple[Acl, ...] = ()
    http_request: tuple[HttpRequestRule, ...] = ()
    use_backend: tuple[UseBackend, ...] = ()
    monitor_uri: str | None = None
    monitor_fail: Condition | None = None
    errorfiles: tuple[ErrorFile, ...] = ()
    stick_table: StickTable | None = None  # for track-sc rules
    tcp_request_connection: tuple[TcpConnectionRule, ...] = ()
    httpclose: bool = False  # close the client connection after each response
    http_server_close: bool = False  # close the server connection after each response
    tls: tuple[TlsBind, ...] = ()  # the binds with ssl: true
    httpslog: bool = False  # HAProxy's option httpslog: TLS fields end the request log line
    stats: StatsPage | None = None  # answered by pylb itself (mode http)
    prometheus: PrometheusPage | None = None


@dataclass(frozen=True, slots=True)
class StatsPage:
    """A frontend's stats page: HAProxy's `stats uri`, `refresh`, `admin`, `auth` and
    `realm` (lb.statspage serves it)."""

    uri: str = "/stats"
    refresh: float | None = None  # seconds between automatic reloads; None: none
    admin: bool = False  # buttons to set servers ready, drain or maint
    auth: tuple[tuple[str, str], ...] = ()  # (user, password); none: no authentication
    realm: str = "pylb"


@dataclass(frozen=True, slots=True)
class PrometheusPage:
    """A frontend's Prometheus endpoint (lb.promex)."""

    uri: str = "/metrics"


@dataclass(frozen=True, slots=True)
class HttpCheck:
    method: str
    path: str
    expect: tuple[int, int]
    host: str | None


@dataclass(frozen=True, slots=True)
class Cookie:
    name: str
    mode: str
    indirect: bool
    nocache: bool


@dataclass(frozen=True, slots=True)
class Server:
    name: str
    address: Address
    weight: int
    maxconn: int
    maxqueue: int
    backup: bool
    cookie: str | None
    check: bool
    inter: float
    rise: int
    fall: int
    fastinter: float | None = None  # None: inter
    downinter: float | None = None  # None: inter
    # TLS to the server (HAProxy's ssl, verify, ca-file, sni, verifyhost; lb.tls.client)
    ssl: bool = False
    verify: str = "required"  # none or required: the server's certificate must verify
    ca: bytes | None = None  # PEM of ca-file, read by the master; None: the system's CAs
    sni: str | None = None  # the name sent in the handshake
    verifyhost: str | None = None  # the name checked in the certificate (else sni)


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    mode: str
    balance: str
    balance_arg: str | None
    servers: tuple[Server, ...]
    timeouts: Timeouts
    retries: int
    redispatch: int  # 0: never; -1: on the last retry; N > 0: every Nth; N < 0: Nth before last
    http_check: HttpCheck | None
    cookie: Cookie | None
    stick_table: StickTable | None
    # ("src", None), ("cookie", NAME) or ("hdr", lower-case name); None: no stick-on
    stick_on: tuple[str, str | None] | None
    line: int
    # What a failed request may be retried on: words of HAProxy's retry-on, statuses as ints
    retry_on: tuple[str | int, ...] = ("conn-failure",)
    retry_buffer: int = 16 * 1024  # request body bytes kept for a replay
    retry_non_idempotent: bool = False  # replay POST & co. even once wholly sent
    hold_when_down: bool = False  # wait in the queue while no server is usable
    maxqueue: int = 0  # requests waiting in the backend's own queue; 0: no limit
    abortonclose: bool = False
    httpclose: bool = False
    http_server_close: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    text: str
    global_: Global
    frontends: dict[str, Frontend]
    backends: dict[str, Backend]
    maps: dict[str, str] = field(default_factory=dict)  # map name -> file path
