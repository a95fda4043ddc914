"""lb.statspage and lb.statshtml without sockets: requests in, responses out, against a fake
Site built from a real pylb's `show info` and `show stat` (copied here as literals)."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import re
from dataclasses import dataclass, field

import pytest
from samples import SHOW_INFO, SHOW_STAT

from lb import statshtml
from lb.statspage import (
    MAX_BODY,
    Request,
    Response,
    StatsOptions,
    csrf_token,
    matches,
    parse_options,
    parse_scopes,
    serve,
)

SECRET = b"0123456789abcdef0123456789abcdef"
HOST = "127.0.0.1:8404"


def parse_info(text: str) -> dict[str, object]:
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


def parse_stat(text: str) -> list[dict[str, object]]:
    reader = csv.DictReader(io.StringIO(text.removeprefix("# ")))
    return [{k: v for k, v in row.items() if k} for row in reader]


@dataclass
class FakeSite:
    info_fields: dict[str, object] = field(default_factory=lambda: parse_info(SHOW_INFO))
    stat_rows: list[dict[str, object]] = field(default_factory=lambda: parse_stat(SHOW_STAT))
    secret: bytes = SECRET
    applied: list[tuple[str, str, str]] = field(default_factory=list)
    scopes_asked: list[set[str] | None] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)  # servers whose apply() fails

    async def info(self) -> dict[str, object]:
        return self.info_fields

    async def rows(self) -> list[dict[str, object]]:
        return self.stat_rows

    async def csv(self) -> str:
        return SHOW_STAT

    async def metrics(self, scopes: set[str] | None) -> tuple[bytes, str]:
        self.scopes_asked.append(scopes)
        return b"haproxy_process_nbthread 1\n", "text/plain; version=0.0.4"

    async def apply(self, backend: str, server: str, action: str) -> str:
        self.applied.append((backend, server, action))
        return "no such server" if server in self.refuse else ""


ADMIN = StatsOptions(uri="/stats", refresh=5.0, admin=True)
AUTH = StatsOptions(uri="/stats", admin=True, auth=(("admin", "CHANGE-ME"), ("ops", "pw")),
                    realm='pylb "stats"')


def basic(user: str, password: str) -> tuple[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return ("Authorization", f"Basic {token}")


def run(site: FakeSite, method: str, target: str, *headers: tuple[str, str],
        body: bytes = b"", stats: StatsOptions | None = ADMIN,
        prometheus: str | None = "/metrics") -> Response:
    request = Request(method, target, (("Host", HOST), *headers), body)
    return asyncio.run(serve(request, site, stats, prometheus))


def header(response: Response, name: str) -> str | None:
    values = [v for k, v in response.headers if k.lower() == name.lower()]
    assert len(values) <= 1, f"{name} repeated"
    return values[0] if values else None


def page(response: Response) -> str:
    assert response.status == 200, response.body
    assert header(response, "Content-Type") == "text/html; charset=utf-8"
    return response.body.decode()


def row_html(html: str, row_id: str) -> str:
    match = re.search(rf'<tr [^>]*id="{re.escape(row_id)}"[^>]*>.*?</tr>', html)
    assert match, f"no row {row_id}"
    return match.group(0)


FORM = ("Content-Type", "application/x-www-form-urlencoded")
ORIGIN = ("Origin", f"http://{HOST}")


def post(site: FakeSite, fields: str, *headers: tuple[str, str],
         stats: StatsOptions = ADMIN, user: str = "") -> Response:
    token = csrf_token(SECRET, user)
    body = fields.replace("{token}", token).encode()
    return run(site, "POST", "/stats", FORM, *headers, body=body, stats=stats)


# --- the page -----------------------------------------------------------------------------

def test_page_lists_every_proxy_and_server_with_its_status_class() -> None:
    html = page(run(FakeSite(), "GET", "/stats"))
    assert 'id="proxy-www"' in html and 'id="proxy-app"' in html
    assert 'class="status st-open">OPEN<' in row_html(html, "frontend-www")
    assert 'class="status st-up">UP<' in row_html(html, "backend-app")
    for server in ("s1", "s2"):
        row = row_html(html, f"server-app-{server}")
        assert f'data-backend="app" data-server="{server}"' in row
        assert 'class="status st-up">UP<' in row
    s1 = row_html(html, "server-app-s1")
    assert '<td class="c-check_status">L7OK/200 in 8ms</td>' in s1
    assert '<td class="c-lastchg">3s</td>' in s1
    assert '<td class="c-act">Y</td>' in s1 and '<td class="c-bck">-</td>' in s1
    # servers sit between their backend's header and its BACKEND row
    assert html.index('id="server-app-s2"') < html.index('id="backend-app"')
    assert html.index('id="proxy-app"') < html.index('id="server-app-s1"')
    assert 'id="info-pid">26665<' in html and 'id="info-idle">100 %<' in html
    assert "<script" not in html


def test_page_headers() -> None:
    response = run(FakeSite(), "GET", "/stats")
    csp = header(response, "Content-Security-Policy")
    assert csp is not None and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert header(response, "X-Frame-Options") == "DENY"
    assert header(response, "Cache-Control") == "no-cache"
    assert header(response, "Content-Length") is None  # the transport's job


@pytest.mark.parametrize(("status", "css"), [
    ("DOWN", "st-down"), ("DRAIN", "st-drain"), ("MAINT", "st-maint"),
    ("no check", "st-nocheck"), ("UP 1/3", "st-going-down"), ("DOWN 1/2", "st-going-up"),
])
def test_status_colours(status: str, css: str) -> None:
    site = FakeSite()
    site.stat_rows[1]["status"] = status
    row = row_html(page(run(site, "GET", "/stats")), "server-app-s1")
    assert row.startswith(f'<tr class="server {css}"')
    assert f'class="status {css}">{status}<' in row
    assert f".{css}{{background:" in page(run(site, "GET", "/stats"))  # legend colour


def test_hostile_names_are_escaped() -> None:
    site = FakeSite()
    evil_backend, evil_server = "<script>alert(1)</script>", '"><img src=x onerror=alert(1)>'
    for row in site.stat_rows[1:]:
        row["pxname"] = evil_backend
    site.stat_rows[1]["svname"] = evil_server
    site.stat_rows[1]["status"] = "<b>UP</b>"
    site.info_fields["node"] = "<i>node</i>"
    html = page(run(site, "GET", "/stats"))
    assert "<script>" not in html and "<img" not in html and "<b>" not in html
    assert "<i>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'data-server="&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"' in html
    assert 'name="b" value="&lt;script&gt;alert(1)&lt;/script&gt;"' in html


def test_refresh_meta() -> None:
    html = page(run(FakeSite(), "GET", "/stats"))
    assert '<meta http-equiv="refresh" content="5; url=/stats">' in html
    assert 'href="/stats;norefresh">Disable refresh' in html
    html = page(run(FakeSite(), "GET", "/stats;norefresh"))
    assert 'http-equiv="refresh"' not in html
    assert 'id="refresh-toggle" href="/stats">Enable refresh' in html
    html = page(run(FakeSite(), "GET", "/stats", stats=StatsOptions()))
    assert 'http-equiv="refresh"' not in html and "refresh-toggle" not in html


def test_query_string_and_prefix() -> None:
    assert page(run(FakeSite(), "GET", "/stats?foo=bar"))
    assert page(run(FakeSite(), "GET", "http://127.0.0.1:8404/stats"))  # absolute-form
    assert run(FakeSite(), "GET", "/other").status == 404


@pytest.mark.parametrize("target", ["/stats;csv", "/stats;csv;norefresh", "/stats?x=1;csv"])
def test_csv(target: str) -> None:
    response = run(FakeSite(), "GET", target)
    assert response.status == 200
    assert header(response, "Content-Type") == "text/plain; charset=utf-8"
    assert response.body.decode() == SHOW_STAT


def test_csv_with_a_question_mark_uri() -> None:
    stats = StatsOptions(uri="/haproxy?stats")
    assert run(FakeSite(), "GET", "/haproxy?stats;csv", stats=stats).body.decode() == SHOW_STAT
    assert page(run(FakeSite(), "GET", "/haproxy?stats", stats=stats))


def test_parse_options() -> None:
    assert parse_options(";csv;norefresh;st=DONE").csv
    options = parse_options(";norefresh;st=DONE")
    assert options.norefresh and options.status == "DONE" and not options.csv
    assert parse_options(";st=<script>").status is None
    assert parse_options(";st=BOGUS").status is None
    assert not parse_options(";csvx").csv


def test_notice_after_an_action() -> None:
    html = page(run(FakeSite(), "GET", "/stats;st=DONE"))
    assert 'id="notice" class="notice st-DONE">Action processed successfully.' in html
    html = page(run(FakeSite(), "GET", "/stats;st=PART"))
    assert 'class="notice st-PART"' in html
    html = page(run(FakeSite(), "GET", "/stats;st=XSS%3Cb%3E"))
    assert 'id="notice"' not in html


# --- authentication -----------------------------------------------------------------------

@pytest.mark.parametrize("target", ["/stats", "/stats;csv"])
def test_auth_required(target: str) -> None:
    response = run(FakeSite(), "GET", target, stats=AUTH)
    assert response.status == 401
    assert header(response, "WWW-Authenticate") == (
        'Basic realm="pylb \\"stats\\""')


@pytest.mark.parametrize("credentials", [
    basic("admin", "wrong"), basic("nobody", "CHANGE-ME"), basic("admin", ""),
    basic("ops", "CHANGE-ME"), ("Authorization", "Basic !!!not-base64"),
    ("Authorization", "Bearer abc"), ("Authorization", "Basic " + base64.b64encode(
        b"no-colon").decode()), ("Authorization", "Basic " + base64.b64encode(
        b"\xff\xfe:\x00").decode()), ("Authorization", "Basic"),
])
def test_bad_credentials(credentials: tuple[str, str]) -> None:
    assert run(FakeSite(), "GET", "/stats", credentials, stats=AUTH).status == 401


@pytest.mark.parametrize(("user", "password"), [("admin", "CHANGE-ME"), ("ops", "pw")])
def test_good_credentials(user: str, password: str) -> None:
    html = page(run(FakeSite(), "GET", "/stats", basic(user, password), stats=AUTH))
    assert f'name="csrf" value="{csrf_token(SECRET, user)}"' in html
    csv_response = run(FakeSite(), "GET", "/stats;csv", basic(user, password), stats=AUTH)
    assert csv_response.status == 200


def test_repeated_authorization_is_refused() -> None:
    good = basic("admin", "CHANGE-ME")
    assert run(FakeSite(), "GET", "/stats", good, good, stats=AUTH).status == 401


def test_realm_cannot_inject_headers() -> None:
    stats = StatsOptions(auth=(("a", "b"),), realm="x\r\nSet-Cookie: y")
    value = header(run(FakeSite(), "GET", "/stats", stats=stats), "WWW-Authenticate")
    assert value == 'Basic realm="x??Set-Cookie: y"'


def test_prometheus_is_not_behind_stats_auth() -> None:
    assert run(FakeSite(), "GET", "/metrics", stats=AUTH).status == 200


# --- admin --------------------------------------------------------------------------------

def test_admin_forms_only_when_admin() -> None:
    html = page(run(FakeSite(), "GET", "/stats"))
    s1 = row_html(html, "server-app-s1")
    assert '<form method="post" action="/stats" class="admin-form">' in s1
    assert '<input type="hidden" name="b" value="app">' in s1
    assert '<input type="hidden" name="s" value="s1">' in s1
    assert f'<input type="hidden" name="csrf" value="{csrf_token(SECRET, "")}">' in s1
    for action in ("ready", "drain", "maint"):
        assert f'name="action" value="{action}"' in s1
    assert "admin-form" not in row_html(html, "backend-app")
    html = page(run(FakeSite(), "GET", "/stats", stats=StatsOptions(refresh=5.0)))
    assert "<form" not in html and "csrf" not in html and ">Admin<" not in html


def test_form_keeps_norefresh() -> None:
    html = page(run(FakeSite(), "GET", "/stats;norefresh"))
    assert 'action="/stats;norefresh" class="admin-form"' in html
    site = FakeSite()
    body = f"b=app&s=s1&action=drain&csrf={csrf_token(SECRET, '')}".encode()
    response = run(site, "POST", "/stats;norefresh", FORM, ORIGIN, body=body)
    assert header(response, "Location") == "/stats;norefresh;st=DONE"


def test_post_with_good_token_and_origin() -> None:
    site = FakeSite()
    response = post(site, "b=app&s=s1&action=drain&csrf={token}", ORIGIN)
    assert response.status == 303
    assert header(response, "Location") == "/stats;st=DONE"
    assert site.applied == [("app", "s1", "drain")]


@pytest.mark.parametrize("origin", [
    ("Referer", f"http://{HOST}/stats"),  # no Origin: the Referer decides
    ("Origin", f"HTTPS://{HOST}"),  # a TLS frontend
])
def test_post_same_origin_variants(origin: tuple[str, str]) -> None:
    site = FakeSite()
    assert post(site, "b=app&s=s1&action=maint&csrf={token}", origin).status == 303
    assert site.applied == [("app", "s1", "maint")]


def test_post_without_origin_nor_referer_relies_on_the_token() -> None:
    site = FakeSite()
    assert post(site, "b=app&s=s1&action=ready&csrf={token}").status == 303
    assert site.applied == [("app", "s1", "ready")]


def test_post_with_auth_uses_the_users_token() -> None:
    site = FakeSite()
    login = basic("ops", "pw")
    response = post(site, "b=app&s=s1&action=drain&csrf={token}", ORIGIN, login,
                    stats=AUTH, user="ops")
    assert response.status == 303 and site.applied == [("app", "s1", "drain")]
    # the token of another user (or of no user) is not this one's
    site = FakeSite()
    response = post(site, "b=app&s=s1&action=drain&csrf={token}", ORIGIN, login,
                    stats=AUTH, user="admin")
    assert response.status == 403 and site.applied == []
    site = FakeSite()
    assert post(site, "b=app&s=s1&action=drain&csrf={token}", ORIGIN, stats=AUTH).status == 401
    assert site.applied == []


@pytest.mark.parametrize(("fields", "headers"), [
    ("", (ORIGIN,)),
    ("b=app&s=s1&action=drain", (ORIGIN,)),  # no token
    ("b=app&s=s1&action=drain&csrf=", (ORIGIN,)),
    ("b=app&s=s1&action=drain&csrf=" + "0" * 64, (ORIGIN,)),
    ("b=app&s=s1&action=drain&csrf={token}&csrf={token}", (ORIGIN,)),
    ("b=app&s=s1&action=drain&csrf=%C3%A9", (ORIGIN,)),
    ("b=app&s=s1&action=drain&csrf={token}", (("Origin", "http://evil.example"),)),
    ("b=app&s=s1&action=drain&csrf={token}", (("Origin", "null"),)),
    ("b=app&s=s1&action=drain&csrf={token}", (("Origin", "http://127.0.0.1:9999"),)),
    ("b=app&s=s1&action=drain&csrf={token}", (("Referer", "http://evil.example/stats"),)),
    # Origin wins over a same-site Referer
    ("b=app&s=s1&action=drain&csrf={token}",
     (("Origin", "http://evil.example"), ("Referer", f"http://{HOST}/stats"))),
])
def test_post_refused_as_cross_site(fields: str, headers: tuple[tuple[str, str], ...]) -> None:
    site = FakeSite()
    response = post(site, fields, *headers)
    assert response.status == 403
    assert header(response, "Content-Type") == "text/plain; charset=utf-8"
    assert b"Forbidden" in response.body
    assert site.applied == []


def test_post_with_origin_but_no_host_is_refused() -> None:
    site = FakeSite()
    body = f"b=app&s=s1&action=drain&csrf={csrf_token(SECRET, '')}".encode()
    request = Request("POST", "/stats", (FORM, ORIGIN), body)
    assert asyncio.run(serve(request, site, ADMIN, None)).status == 403
    assert site.applied == []


def test_post_when_admin_is_off() -> None:
    site = FakeSite()
    response = post(site, "b=app&s=s1&action=drain&csrf={token}", ORIGIN,
                    stats=StatsOptions())
    assert response.status == 403 and site.applied == []


@pytest.mark.parametrize("fields", [
    "b=app&s=s1&action=shutdown&csrf={token}",
    "b=app&s=s1&action=&csrf={token}",
    "b=app&s=s1&csrf={token}",
    "s=s1&action=drain&csrf={token}",
    "b=app&b=web&s=s1&action=drain&csrf={token}",
])
def test_post_bad_fields(fields: str) -> None:
    site = FakeSite()
    assert post(site, fields, ORIGIN).status == 400
    assert site.applied == []


@pytest.mark.parametrize("fields", [
    "b=app&s=s1&action=drain&csrf={token}&x=%zz",  # bad percent-encoding
    "b=app&s=s1&action=drain&csrf={token}&x=%ff",  # not UTF-8
    "b=app&s=s1&action=drain&csrf={token}&novalue",  # strict parsing
])
def test_post_malformed_body(fields: str) -> None:
    site = FakeSite()
    assert post(site, fields, ORIGIN).status == 400
    assert site.applied == []


def test_post_oversize_body() -> None:
    site = FakeSite()
    fields = "b=app&s=s1&action=drain&csrf={token}&pad=" + "x" * MAX_BODY
    assert post(site, fields, ORIGIN).status == 413
    assert site.applied == []


def test_post_not_a_form() -> None:
    site = FakeSite()
    body = b'{"b": "app"}'
    response = run(site, "POST", "/stats", ("Content-Type", "application/json"), ORIGIN,
                   body=body)
    assert response.status == 415 and site.applied == []


def test_post_several_servers() -> None:
    site = FakeSite()
    response = post(site, "b=app&s=s1&s=s2&action=maint&csrf={token}", ORIGIN)
    assert header(response, "Location") == "/stats;st=DONE"
    assert site.applied == [("app", "s1", "maint"), ("app", "s2", "maint")]
    site = FakeSite(refuse={"s9"})
    response = post(site, "b=app&s=s1&s=s9&action=maint&csrf={token}", ORIGIN)
    assert header(response, "Location") == "/stats;st=PART"
    assert b"app/s9: no such server" in response.body
    site = FakeSite(refuse={"s9"})
    response = post(site, "b=app&s=s9&action=maint&csrf={token}", ORIGIN)
    assert header(response, "Location") == "/stats;st=ERRP"
    response = post(FakeSite(), "b=app&action=maint&csrf={token}", ORIGIN)
    assert header(response, "Location") == "/stats;st=NONE"


# --- Prometheus ---------------------------------------------------------------------------

def test_metrics_routing() -> None:
    site = FakeSite()
    response = run(site, "GET", "/metrics")
    assert response.status == 200 and response.body == b"haproxy_process_nbthread 1\n"
    assert header(response, "Content-Type") == "text/plain; version=0.0.4"
    assert header(response, "Cache-Control") == "no-cache"
    assert site.scopes_asked == [None]
    # the exact path wins over a stats uri of "/", which takes everything else
    root = StatsOptions(uri="/")
    assert run(FakeSite(), "GET", "/metrics", stats=root).body.startswith(b"haproxy_")
    assert page(run(FakeSite(), "GET", "/metricsx", stats=root))
    assert run(FakeSite(), "GET", "/metrics", prometheus=None).status == 404


@pytest.mark.parametrize(("query", "scopes"), [
    ("", None),
    ("no-maint", None),
    ("scope=frontend&scope=server", {"frontend", "server"}),
    ("scope=global", {"global"}),
    ("scope=*", {"global", "frontend", "backend", "server"}),
    ("scope=*&scope=", set()),
    ("scope=&scope=backend", {"backend"}),
])
def test_metrics_scopes(query: str, scopes: set[str] | None) -> None:
    assert parse_scopes(query) == scopes
    site = FakeSite()
    assert run(site, "GET", f"/metrics?{query}").status == 200
    assert site.scopes_asked == [scopes]


@pytest.mark.parametrize("query", ["scope=bogus", "scope=frontend&scope=Server", "scope=%ff",
                                   "scope=%zz"])
def test_metrics_bad_scope(query: str) -> None:
    with pytest.raises(ValueError):
        parse_scopes(query)
    site = FakeSite()
    assert run(site, "GET", f"/metrics?{query}").status == 400
    assert site.scopes_asked == []


# --- methods ------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["/stats", "/stats;csv", "/metrics"])
def test_head(target: str) -> None:
    get, head = run(FakeSite(), "GET", target), run(FakeSite(), "HEAD", target)
    assert head.status == get.status == 200
    assert head.body == b"" and get.body
    assert head.headers == get.headers


@pytest.mark.parametrize(("target", "stats", "allow"), [
    ("/stats", ADMIN, "GET, HEAD, POST"),
    ("/stats", StatsOptions(), "GET, HEAD"),
    ("/metrics", ADMIN, "GET, HEAD"),
])
@pytest.mark.parametrize("method", ["PUT", "DELETE", "OPTIONS", "get"])
def test_other_methods(target: str, stats: StatsOptions, allow: str, method: str) -> None:
    response = run(FakeSite(), method, target, stats=stats)
    assert response.status == 405
    assert header(response, "Allow") == allow


def test_post_to_metrics() -> None:
    assert run(FakeSite(), "POST", "/metrics").status == 405


# --- matches() ----------------------------------------------------------------------------

@pytest.mark.parametrize(("target", "expected"), [
    ("/stats", True),
    ("/stats;csv", True),
    ("/stats?x=1", True),
    ("/stats/", True),
    ("/statsfoo", True),  # HAProxy: the stats uri is a prefix
    ("http://h:1/stats;csv", True),
    ("/stat", False),
    ("/", False),
    ("/app/stats", False),
    ("/metrics", True),
    ("/metrics?scope=server", True),
    ("/metrics/x", False),
    ("/metricsx", False),
    ("http://h/metrics", True),
    ("*", False),
    ("", False),
])
def test_matches(target: str, expected: bool) -> None:
    assert matches(target, ADMIN, "/metrics") is expected


def test_matches_without_either() -> None:
    assert not matches("/stats", None, "/metrics")
    assert not matches("/metrics", ADMIN, None)
    assert not matches("/metrics", None, None)
    assert matches("/anything", StatsOptions(uri="/"), None)


# --- rendering helpers --------------------------------------------------------------------

@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (3, "3s"), (62, "1m2s"), (3720, "1h2m"), (90000, "1d1h"), (None, ""), (-1, ""),
])
def test_human_time(seconds: int | None, text: str) -> None:
    assert statshtml.human_time(seconds) == text


def test_site_errors_propagate() -> None:
    class Broken(FakeSite):
        async def rows(self) -> list[dict[str, object]]:
            raise RuntimeError("worker gone")

    with pytest.raises(RuntimeError):
        run(Broken(), "GET", "/stats")
