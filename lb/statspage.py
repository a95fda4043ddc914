"""The stats web page (HAProxy's `stats uri`) and the Prometheus endpoint: a sans-IO dispatcher.

A frontend with `stats:` and/or `prometheus:` answers some of its HTTP requests itself. The
worker asks `matches()` on every request of such a frontend (cheap, no I/O); a matching
request goes to the master, which calls `serve()` with a `Site` (its view of every
worker's counters and the runtime API's server states) and sends the `Response` back.
Here is only protocol logic, in the h11 style: requests in, responses out, no sockets, so
that every rule below is tested without a process (tests/test_statspage.py).

What an operator who knows HAProxy finds:

* `stats uri` is a prefix (HAProxy's rule): any target starting with it is a stats
  request. HAProxy's options follow it anywhere in the rest of the target: `;csv` (the
  `show stat` CSV as text/plain), `;norefresh` (no automatic reload), `;st=<CODE>` (the
  notice after an admin action: DONE, NONE, PART, ERRP, EXCD, DENY, IVAL, UNKN).
* `stats auth`: HTTP Basic, any configured pair; 401 with the realm otherwise. It
  protects the page, the CSV and the admin POST, not the Prometheus uri (in HAProxy that
  is a separate service).
* `stats admin`: buttons per server (ready, drain, maint) posting `b`, `s`, `action`
  and `csrf` as a form; the answer is `303 See Other` to `<uri>;st=<CODE>`. Scripts may
  post several `s` at once (one backend). Cross-site requests are refused (403): the token
  must be HMAC-SHA256(secret, user) (user "" without auth), and a present Origin (else a
  present Referer) must be this Host's, over http or https (the request does not say
  which one it came over: both are accepted).
* the Prometheus uri is matched on the path only (HAProxy's `path` ACL); its query may
  hold `scope=` parameters, as HAProxy's exporter reads them (in order; `*` all, empty:
  none, unknown: 400). Other parameters are ignored.

Every answer has Content-Type and Cache-Control: no-cache, and the headers that keep the
page out of frames and scripts (CSP, X-Frame-Options, nosniff). Content-Length is the
transport's job: it is not set here; for HEAD the body is empty and the transport must
not send Content-Length: 0 (RFC 9110: omit it, or give the GET's length).

Hooks for browser tests (ids and classes, see lb/statshtml.py): server row
`tr#server-<backend>-<server>` (also `tr[data-backend=..][data-server=..]`), its status
cell `td.status` with an `st-up|st-down|st-drain|st-maint|st-nocheck|...` class, admin
buttons `button[name=action][value=drain]` inside that row.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qsl, urlsplit

from lb.statshtml import ACTIONS, NOTICES, render_page

MAX_BODY = 64 * 1024  # admin POST bodies; the transport may stop reading past this
MAX_FIELDS = 1000  # form fields / query parameters
PROMETHEUS_SCOPES = frozenset({"global", "frontend", "backend", "server"})
FORM = "application/x-www-form-urlencoded"

# The page has no script, so none may run; and it is never framed (clickjacking).
CSP = ("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
TEXT = "text/plain; charset=utf-8"
HTML = "text/html; charset=utf-8"


@dataclass(frozen=True)
class StatsOptions:
    """The frontend's `stats:` mapping, already validated by the config loader."""

    uri: str = "/stats"
    refresh: float | None = None  # seconds; None = no auto-refresh
    admin: bool = False
    auth: tuple[tuple[str, str], ...] = ()  # (user, password) pairs; empty = no authentication
    realm: str = "pylb"


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]  # names as received
    body: bytes


@dataclass(frozen=True)
class Response:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


class Site(Protocol):
    """What the master provides (async: it may ask the workers)."""

    secret: bytes  # per-pylb random secret for CSRF tokens

    async def info(self) -> dict[str, object]: ...  # show info fields (HAProxy names)

    async def rows(self) -> list[dict[str, object]]: ...  # show stat rows by CSV column

    async def csv(self) -> str: ...  # the exact `show stat` CSV text

    async def metrics(self, scopes: set[str] | None) -> tuple[bytes, str]: ...  # body, type

    async def apply(self, backend: str, server: str, action: str) -> str: ...  # "" or error


class _Refused(Exception):
    """A request answered with an error status; caught in serve(), never escapes."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# --- routing ------------------------------------------------------------------------------

def _origin_form(target: str) -> str:
    """The path and query of a target; absolute-form (`http://host/path`) too."""
    if target.startswith("/"):
        return target
    scheme, sep, rest = target.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        slash = rest.find("/")
        query = rest.find("?")
        if slash < 0 or 0 <= query < slash:
            return "/" + rest[query:] if query >= 0 else "/"
        return rest[slash:]
    return target  # "*" or garbage: matches nothing


def _is_prometheus(target: str, prometheus_uri: str | None) -> bool:
    return prometheus_uri is not None and target.partition("?")[0] == prometheus_uri


def matches(target: str, stats: StatsOptions | None, prometheus_uri: str | None) -> bool:
    """Is this request for the stats page or the Prometheus endpoint? Cheap: the worker
    asks it on every request of a frontend that has either."""
    target = _origin_form(target)
    return _is_prometheus(target, prometheus_uri) or (
        stats is not None and target.startswith(stats.uri))


async def serve(request: Request, site: Site, stats: StatsOptions | None,
                prometheus_uri: str | None) -> Response:
    """The answer to one request. Bad input gets a 4xx; what `site` raises propagates."""
    target = _origin_form(request.target)
    try:
        # the exact Prometheus path wins over a stats prefix such as "/"
        if _is_prometheus(target, prometheus_uri):
            return await _serve_metrics(request, site, target)
        if stats is not None and target.startswith(stats.uri):
            return await _serve_stats(request, site, stats, target)
        raise _Refused(404, "Not Found")
    except _Refused as refused:
        return _text(refused.status, refused.message, refused.headers)


# --- responses ----------------------------------------------------------------------------

def _response(status: int, body: bytes, content_type: str,
              extra: tuple[tuple[str, str], ...] = ()) -> Response:
    headers = (
        ("Content-Type", content_type),
        ("Cache-Control", "no-cache"),
        ("X-Content-Type-Options", "nosniff"),
        ("X-Frame-Options", "DENY"),
        ("Content-Security-Policy", CSP),
        ("Referrer-Policy", "same-origin"),
    )
    return Response(status, headers + extra, body)


def _text(status: int, message: str, extra: tuple[tuple[str, str], ...] = ()) -> Response:
    return _response(status, f"{status} {message}\n".encode(), TEXT, extra)


def _headless(request: Request, response: Response) -> Response:
    """HEAD: the GET's status and headers, no body."""
    if request.method != "HEAD":
        return response
    return Response(response.status, response.headers, b"")


def _check_method(request: Request, allowed: tuple[str, ...]) -> None:
    if request.method not in allowed:
        raise _Refused(405, "Method Not Allowed", (("Allow", ", ".join(allowed)),))


def _header(request: Request, name: str) -> str | None:
    """A header's value, None when absent; a repeated one is refused (ambiguous)."""
    values = [value for key, value in request.headers if key.lower() == name]
    if len(values) > 1:
        raise _Refused(400, f"Bad Request: more than one {name} header")
    return values[0].strip() if values else None


# --- query strings and forms --------------------------------------------------------------

_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def form_pairs(text: str, *, strict: bool) -> list[tuple[str, str]]:
    """Decoded name=value pairs. ValueError when malformed: a bad %-escape (which
    parse_qsl would keep as is), not UTF-8, too many fields, or (strict) a field
    without "=" or an empty one."""
    if _BAD_PERCENT.search(text):
        raise ValueError("bad percent-encoding")
    return parse_qsl(text, keep_blank_values=True, strict_parsing=strict,
                     errors="strict", max_num_fields=MAX_FIELDS)  # UnicodeDecodeError too


# --- Prometheus ---------------------------------------------------------------------------

def parse_scopes(query: str) -> set[str] | None:
    """HAProxy's exporter rules: None without any `scope`; in order, `*` adds every
    scope, an empty one resets the set. ValueError: an unknown scope, a bad query."""
    scopes: set[str] | None = None
    for name, value in form_pairs(query, strict=False):  # `no-maint` has no "="
        if name != "scope":
            continue
        if value == "":
            scopes = set()
        elif value == "*":
            scopes = set(PROMETHEUS_SCOPES)
        elif value in PROMETHEUS_SCOPES:
            scopes = (scopes or set()) | {value}
        else:
            raise ValueError(f"unknown scope {value[:40]!r}")
    return scopes


async def _serve_metrics(request: Request, site: Site, target: str) -> Response:
    _check_method(request, ("GET", "HEAD"))
    try:
        scopes = parse_scopes(target.partition("?")[2])
    except ValueError as error:
        raise _Refused(400, f"Bad Request: {error}") from None
    body, content_type = await site.metrics(scopes)
    return _headless(request, _response(200, body, content_type))


# --- the stats page -----------------------------------------------------------------------

_OPTION = re.compile(r";([a-z]+)(?:=([A-Za-z]*))?")


@dataclass(frozen=True)
class PageOptions:
    """HAProxy's `;` options found after the stats uri."""

    csv: bool = False
    norefresh: bool = False
    status: str | None = None  # a known `;st=` code


def parse_options(rest: str) -> PageOptions:
    csv = norefresh = False
    status = None
    for name, value in _OPTION.findall(rest):
        if name == "csv":
            csv = True
        elif name == "norefresh":
            norefresh = True
        elif name == "st" and value in NOTICES:
            status = value
    return PageOptions(csv, norefresh, status)


async def _serve_stats(request: Request, site: Site, stats: StatsOptions,
                       target: str) -> Response:
    if request.method != "POST":  # POST without admin is refused below, with a 403
        _check_method(request, ("GET", "HEAD", "POST") if stats.admin else ("GET", "HEAD"))
    user = authenticate(request, stats)
    if user is None:
        raise _Refused(401, "Unauthorized", _challenge(stats.realm))
    options = parse_options(target[len(stats.uri):])
    if request.method == "POST":
        return await _admin_post(request, site, stats, user, options)
    if options.csv:
        text = await site.csv()
        return _headless(request, _response(200, text.encode(), TEXT))
    info, rows = await site.info(), await site.rows()
    page = render_page(
        info, rows, uri=stats.uri,
        refresh=stats.refresh if stats.refresh and stats.refresh > 0 else None,
        norefresh=options.norefresh, notice=options.status,
        csrf=csrf_token(site.secret, user) if stats.admin else None)
    return _headless(request, _response(200, page.encode(), HTML))


# --- authentication -----------------------------------------------------------------------

def _challenge(realm: str) -> tuple[tuple[str, str], ...]:
    # a quoted-string of printable ASCII: header values are no place for control bytes
    safe = "".join(c if " " <= c <= "~" else "?" for c in realm)
    quoted = safe.replace("\\", "\\\\").replace('"', '\\"')
    return (("WWW-Authenticate", f'Basic realm="{quoted}"'),)


def _credentials(value: str | None) -> tuple[bytes, bytes] | None:
    """(user, password) from `Basic <base64>`, None when absent or malformed."""
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon else None


def authenticate(request: Request, stats: StatsOptions) -> str | None:
    """The user name ("" when stats auth is off), None when not authenticated (no,
    malformed, repeated or wrong credentials)."""
    if not stats.auth:
        return ""
    values = [value for key, value in request.headers if key.lower() == "authorization"]
    given = _credentials(values[0]) if len(values) == 1 else None
    if given is None:
        return None
    found = None
    for user, password in stats.auth:
        # every pair is compared, in constant time: timing tells nothing
        same_user = hmac.compare_digest(given[0], user.encode())
        same_password = hmac.compare_digest(given[1], password.encode())
        if same_user and same_password and found is None:
            found = user
    return found


# --- admin --------------------------------------------------------------------------------

def csrf_token(secret: bytes, user: str) -> str:
    """The admin forms' token: HMAC-SHA256 of the user name ("" without auth)."""
    return hmac.new(secret, user.encode(), hashlib.sha256).hexdigest()


def _same_origin(url: str, host: str | None) -> bool:
    """Is `url` (an Origin or a Referer) on this Host, over http or https?"""
    if not host:
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    default = ":80" if parts.scheme == "http" else ":443"

    def bare(netloc: str) -> str:
        netloc = netloc.lower()
        return netloc[:-len(default)] if netloc.endswith(default) else netloc

    return bare(parts.netloc) == bare(host)


def _check_origin(request: Request) -> None:
    """Browsers say where a POST comes from: Origin, else Referer. Absent both (curl),
    the token alone decides."""
    host = _header(request, "host")
    origin = _header(request, "origin")
    if origin is not None:
        if not _same_origin(origin, host):
            raise _Refused(403, "Forbidden: cross-origin request (Origin is not this Host)")
        return
    referer = _header(request, "referer")
    if referer is not None and not _same_origin(referer, host):
        raise _Refused(403, "Forbidden: cross-site request (Referer is not this Host)")


def _form(request: Request) -> dict[str, list[str]]:
    if len(request.body) > MAX_BODY:
        raise _Refused(413, f"Content Too Large: at most {MAX_BODY} bytes")
    content_type = _header(request, "content-type") or ""
    if content_type.partition(";")[0].strip().lower() != FORM:
        raise _Refused(415, f"Unsupported Media Type: expected {FORM}")
    try:
        text = request.body.decode("ascii")  # an urlencoded body is ASCII
    except UnicodeDecodeError:
        raise _Refused(400, "Bad Request: non-ASCII form body") from None
    try:
        pairs = form_pairs(text, strict=True)
    except ValueError as error:
        raise _Refused(400, f"Bad Request: {error}") from None
    fields: dict[str, list[str]] = {}
    for name, value in pairs:
        fields.setdefault(name, []).append(value)
    return fields


def _one(fields: dict[str, list[str]], name: str) -> str:
    values = fields.get(name, [])
    if len(values) != 1 or not values[0]:
        raise _Refused(400, f"Bad Request: expected exactly one non-empty {name!r} field")
    return values[0]


async def _admin_post(request: Request, site: Site, stats: StatsOptions, user: str,
                      options: PageOptions) -> Response:
    """Check everything, change the servers, then 303 to the page with the outcome."""
    if not stats.admin:
        raise _Refused(403, "Forbidden: stats admin is off")
    _check_origin(request)
    fields = _form(request)
    token = fields.get("csrf", [])
    expected = csrf_token(site.secret, user).encode()
    if len(token) != 1 or not hmac.compare_digest(token[0].encode(), expected):
        raise _Refused(403, "Forbidden: missing or invalid CSRF token (reload the page)")
    backend, action = _one(fields, "b"), _one(fields, "action")
    if action not in ACTIONS:
        raise _Refused(400, f"Bad Request: unknown action (one of {', '.join(ACTIONS)})")
    servers = fields.get("s", [])
    if not all(servers):
        raise _Refused(400, "Bad Request: empty 's' field")
    errors = []
    for server in servers:
        error = await site.apply(backend, server, action)
        if error:
            errors.append(f"{backend}/{server}: {error}")
    code = _outcome(len(servers), len(errors))
    location = stats.uri + (";norefresh" if options.norefresh else "") + f";st={code}"
    body = "\n".join([f"303 See Other: {NOTICES[code]}", *errors]) + "\n"
    return _response(303, body.encode(), TEXT, (("Location", location),))


def _outcome(servers: int, failed: int) -> str:
    """HAProxy's `;st=` code: nothing asked, all done, some done, none done."""
    if servers == 0:
        return "NONE"
    if failed == 0:
        return "DONE"
    return "PART" if failed < servers else "ERRP"


__all__ = [
    "MAX_BODY", "PROMETHEUS_SCOPES", "PageOptions", "Request", "Response", "Site",
    "StatsOptions", "authenticate", "csrf_token", "form_pairs", "matches", "parse_options",
    "parse_scopes", "serve",
]
