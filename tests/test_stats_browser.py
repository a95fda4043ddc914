"""The stats page (`stats uri`) in a real browser: headless Chromium driven over the Chrome
DevTools Protocol (tests/browser.py) against real pylb processes and real backends.

What a browser does that tests/test_statspage.py (requests in, responses out) cannot show:

* the page renders with HTTP Basic credentials: title, header, one table per proxy, a
  row and a coloured status cell per server, and the figures of the stats socket (the
  session total of a frontend after real requests);
* without (or with wrong) credentials Chromium gets a 401 and renders no statistics;
* an admin button is a real form POST: the browser follows the 303 to `;st=DONE`, the
  page and the stats socket both show the new state (drain, then ready again);
* CSRF: a page of another origin that auto-submits a forged form to the stats page is
  refused (403) although the browser sends the operator's credentials with it; a
  same-origin form with a wrong token is refused too; scripts cannot even send a POST
  from the page (its Content-Security-Policy blocks fetch);
* auto-refresh: the `<meta http-equiv="refresh">` is there (not with `;norefresh`), and
  the browser really reloads the page, to the bare uri (an old notice does not stay).

One browser serves the whole module, each test gets a fresh tab in its own browser context
(no shared credentials or cache) and its own pylb. Everything waits on events (a load, a
navigation, a DOM condition polled every 50 ms) under a deadline, never on a sleep. If
Chromium cannot start, the tests fail (CI installs it): they never skip.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from backends import HOST, stats_command
from browser import Browser, BrowserError, Tab
from conftest import Backends, Pylb, PylbFactory

USER, PASSWORD = "admin", "CHANGE-ME"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
SOCK = "lb.sock"  # relative: in the pylb's own working directory
CHECKS_TIMEOUT = 15.0  # servers UP: the first checks (inter 2s by default)

CONFIG = """\
global:
  workers: 2
  stats: {{socket: {sock}, level: admin}}
frontends:
  stats:
    bind: {host}:{stats_port}
    stats: {{uri: /stats, refresh: {refresh}, admin: true, auth: "{user}:{password}",
             realm: pylb}}
    prometheus: {{uri: /metrics}}
  www:
    bind: {host}:{www_port}
    default_backend: app
backends:
  app:
    servers:
      s1: {{address: {s1}, check: true}}
      s2: {{address: {s2}, check: true}}
"""


# -- fixtures ------------------------------------------------------------------------------


@dataclass
class Site:
    """A running pylb with the configuration above."""

    lb: Pylb
    stats_port: int
    www_port: int

    @property
    def origin(self) -> str:
        return f"http://{HOST}:{self.stats_port}"

    @property
    def url(self) -> str:
        return self.origin + "/stats"

    def show_stat(self) -> dict[tuple[str, str], dict[str, str]]:
        """`show stat` on the stats socket, by (pxname, svname)."""
        text = stats_command(self.lb.workdir / SOCK, "show stat").lstrip("# ")
        return {(row["pxname"], row["svname"]): row
                for row in csv.DictReader(io.StringIO(text)) if row["pxname"]}

    def show_info(self) -> dict[str, str]:
        text = stats_command(self.lb.workdir / SOCK, "show info")
        return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)

    def status(self, server: str) -> str:
        return self.show_stat()[("app", server)]["status"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        chromium = Browser.start()
    except BrowserError as error:
        failure = str(error)
    else:
        failure = ""
    if failure:  # outside the except: the message alone, without a chain of tracebacks
        pytest.fail(f"cannot start headless Chromium (install the chromium package, or set "
                    f"PYLB_CHROMIUM to a Chrome binary): {failure}", pytrace=False)
    yield chromium
    chromium.close()


@pytest.fixture
def tab(browser: Browser) -> Iterator[Tab]:
    with browser.new_tab() as page:
        yield page


def start_site(pylb: PylbFactory, backends: Backends, free_port: Callable[[], int],
               refresh: str = "5s") -> Site:
    s1, s2 = backends.echo("s1"), backends.echo("s2")
    stats_port, www_port = free_port(), free_port()
    lb = pylb(CONFIG.format(sock=SOCK, host=HOST, stats_port=stats_port, www_port=www_port,
                            refresh=refresh, user=USER, password=PASSWORD,
                            s1=s1.address, s2=s2.address))
    return Site(lb, stats_port, www_port)


@pytest.fixture
def site(pylb: PylbFactory, backends: Backends, free_port: Callable[[], int]) -> Site:
    return start_site(pylb, backends, free_port)


class Attacker:
    """Another origin (another loopback port) serving one page with a forged admin form
    aimed at the stats page, as a malicious site would."""

    def __init__(self, port: int, target: str) -> None:
        page = (
            "<!DOCTYPE html><html><body>"
            f'<form method="post" action="{target}">'
            '<input type="hidden" name="b" value="app">'
            '<input type="hidden" name="s" value="s2">'
            '<input type="hidden" name="action" value="maint">'
            f'<input type="hidden" name="csrf" value="{"0" * 64}">'
            "</form></body></html>"
        ).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # quiet

        self.server = ThreadingHTTPServer((HOST, port), Handler)
        self.url = f"http://{HOST}:{port}/"
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def origin(self) -> str:
        return self.url.rstrip("/")

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@pytest.fixture
def attacker(site: Site, free_port: Callable[[], int]) -> Iterator[Attacker]:
    evil = Attacker(free_port(), site.url)
    yield evil
    evil.stop()


# -- page helpers --------------------------------------------------------------------------


def js(value: str) -> str:
    """A JavaScript string literal."""
    return json.dumps(value)


def open_page(tab: Tab, url: str) -> dict[str, Any]:
    """Load the page; its HTTP response (must be a 200)."""
    since = tab.mark()
    tab.navigate(url)
    response = tab.document_response(since, where=lambda r: r["url"] == url)
    assert response["status"] == 200, f"{url}: {response['status']}: {tab.text()!r}"
    return response


def status_classes(tab: Tab) -> dict[str, str]:
    """The st-* class of each `app` server's status cell, by server name."""
    value = tab.evaluate(
        "Object.fromEntries([...document.querySelectorAll('tr[data-backend=\"app\"]')]"
        ".map(tr => [tr.dataset.server, [...tr.querySelector('td.status').classList]"
        ".filter(c => c.startsWith('st-')).join(' ')]))")
    return dict(value or {})


def last_checks(tab: Tab) -> dict[str, str]:
    """The LastChk cell of each `app` server (e.g. "L4OK in 0ms"), by server name."""
    value = tab.evaluate(
        "Object.fromEntries([...document.querySelectorAll('tr[data-backend=\"app\"]')]"
        ".map(tr => [tr.dataset.server, tr.querySelector('td.c-check_status').innerText]))")
    return dict(value or {})


def wait_servers(tab: Tab, url: str, expected: dict[str, str], *, checked: bool = False,
                 timeout: float = CHECKS_TIMEOUT) -> None:
    """Reload the page until the servers' status classes are `expected` and, if
    `checked`, each shows a passed check (servers start UP, before their first check, at
    a random point of its interval); fails with what the page showed last."""
    deadline = time.monotonic() + timeout
    while True:
        shown, checks = status_classes(tab), last_checks(tab)
        if all(shown.get(name) == css for name, css in expected.items()) and (
                not checked or all(checks.get(name, "").startswith("L4OK")
                                   for name in expected)):
            return
        if time.monotonic() >= deadline:
            pytest.fail(f"after {timeout}s the page shows {shown}, last checks {checks};"
                        f" expected {expected}{' checked' if checked else ''}")
        time.sleep(0.2)
        open_page(tab, url)


def submit(tab: Tab, selector: str, url_part: str) -> str:
    """Click a submit button; the URL the browser lands on (must contain `url_part`),
    once that page has loaded."""
    since = tab.mark()
    tab.click(selector)
    return tab.wait_navigation(since, lambda url: url_part in url)


def redirects(tab: Tab, since: int) -> list[tuple[int, str, str]]:
    """(status, from url, to url) of the redirects the browser followed since `since`."""
    return [(e.params["redirectResponse"]["status"], e.params["redirectResponse"]["url"],
             e.params["request"]["url"])
            for e in tab.events("Network.requestWillBeSent", since=since)
            if "redirectResponse" in e.params]


def get(port: int, path: str = "/") -> int:
    """One request with a real client (urllib: one connection each)."""
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=5) as answer:
        answer.read()
        return int(answer.status)


# -- 1. the page ---------------------------------------------------------------------------


def test_page_renders_with_credentials(site: Site, tab: Tab) -> None:
    requests = 7
    assert [get(site.www_port, f"/r{i}") for i in range(requests)] == [200] * requests

    tab.set_headers(AUTH)
    response = open_page(tab, site.url)
    assert response["mimeType"] == "text/html"
    assert tab.evaluate("document.title") == "Statistics report for pylb"
    info = site.show_info()
    assert tab.text("h1") == f"Statistics report for pid {info['Pid']} on {info['node']}"

    # one table per proxy, rows where lb/statshtml.py says
    assert tab.evaluate("[...document.querySelectorAll('table.proxy')].map(t => t.id)") == [
        "proxy-stats", "proxy-www", "proxy-app"]
    assert tab.evaluate("document.querySelector('#proxy-www #frontend-www') !== null")
    assert tab.evaluate("document.querySelector('#proxy-app #backend-app') !== null")
    for server in ("s1", "s2"):
        assert tab.evaluate(
            f"document.querySelector('#proxy-app tr#server-app-{server}') === "
            f"document.querySelector('tr[data-backend=\"app\"][data-server=\"{server}\"]')"
            f" && document.querySelector('tr#server-app-{server}') !== null")
        assert tab.text(f"#server-app-{server} td.name") == server

    wait_servers(tab, site.url, {"s1": "st-up", "s2": "st-up"}, checked=True)
    assert tab.text("#server-app-s1 td.status") == "UP"
    assert tab.text("#frontend-www td.status") == "OPEN"

    # the session total of the frontend is what the clients did, as the socket says
    assert tab.text("#frontend-www td.c-stot") == str(requests)
    assert site.show_stat()[("www", "FRONTEND")]["stot"] == str(requests)
    served = [int(tab.text(f"#server-app-{s} td.c-stot") or "-1") for s in ("s1", "s2")]
    assert sum(served) == requests, served
    assert tab.text("#backend-app td.c-stot") == str(requests)


# -- 2. authentication ---------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Basic "
                                          + base64.b64encode(b"admin:wrong").decode()}],
                         ids=["no-credentials", "wrong-password"])
def test_page_needs_credentials(site: Site, tab: Tab, headers: dict[str, str]) -> None:
    tab.set_headers(headers)
    since = tab.mark()
    # Chromium answers a 401 it has no credentials for with an error page of its own
    error = tab.navigate(site.url, allow_error=True)
    response = tab.document_response(since, where=lambda r: r["url"] == site.url)
    assert response["status"] == 401
    challenge = {k.lower(): v for k, v in response["headers"].items()}["www-authenticate"]
    assert challenge.startswith('Basic realm="pylb"')
    assert error == "net::ERR_INVALID_AUTH_CREDENTIALS"
    assert tab.evaluate(
        "document.querySelector('table.proxy, tr[data-server], form.admin-form') === null")
    assert "Statistics report" not in (tab.text() or "")


# -- 3. admin buttons ----------------------------------------------------------------------


def test_drain_and_ready_buttons(site: Site, tab: Tab) -> None:
    tab.set_headers(AUTH)
    open_page(tab, site.url)
    wait_servers(tab, site.url, {"s1": "st-up", "s2": "st-up"})
    assert tab.evaluate("document.querySelectorAll("
                        "'#server-app-s1 form.admin-form button[name=action]').length") == 3

    since = tab.mark()
    landed = submit(tab, "#server-app-s1 form.admin-form button[name=action][value=drain]",
                    ";st=DONE")
    assert landed == site.url + ";st=DONE"
    post = tab.sent_headers(since, "POST", site.url)
    assert post["origin"] == site.origin and post["authorization"] == AUTH["Authorization"]
    assert redirects(tab, since) == [(303, site.url, site.url + ";st=DONE")]
    # the page the browser was sent to already shows the outcome and the new state
    assert tab.evaluate("document.querySelector('#notice').className") == "notice st-DONE"
    assert status_classes(tab) == {"s1": "st-drain", "s2": "st-up"}
    assert tab.text("#server-app-s1 td.status") == "DRAIN"
    assert site.status("s1") == "DRAIN" and site.status("s2") == "UP"

    since = tab.mark()
    landed = submit(tab, "#server-app-s1 form.admin-form button[name=action][value=ready]",
                    ";st=DONE")
    assert landed == site.url + ";st=DONE"
    assert redirects(tab, since) == [(303, site.url, site.url + ";st=DONE")]
    assert status_classes(tab) == {"s1": "st-up", "s2": "st-up"}
    assert site.status("s1") == "UP" and site.status("s2") == "UP"


# -- 4. CSRF -------------------------------------------------------------------------------


def test_forged_form_from_another_origin_is_refused(site: Site, attacker: Attacker,
                                                    tab: Tab) -> None:
    # the operator's browser holds credentials: they go with the attacker's POST too
    tab.set_headers(AUTH)
    open_page(tab, attacker.url)
    since = tab.mark()
    tab.evaluate("document.forms[0].submit()")
    response = tab.document_response(since, where=lambda r: r["url"] == site.url)
    sent = tab.sent_headers(since, "POST", site.url)
    assert sent["origin"] == attacker.origin
    assert sent["authorization"] == AUTH["Authorization"]  # so a 401 cannot be the reason
    assert response["status"] == 403
    tab.wait_navigation(since, lambda url: url == site.url)
    assert "Forbidden: cross-origin request" in (tab.text() or "")
    assert site.status("s2") == "UP"
    assert site.status("s1") == "UP"


def test_same_origin_post_with_a_wrong_token_is_refused(site: Site, tab: Tab) -> None:
    tab.set_headers(AUTH)
    open_page(tab, site.url)
    wait_servers(tab, site.url, {"s1": "st-up", "s2": "st-up"})

    # a script on the page cannot POST at all: the CSP (connect-src falls back to
    # default-src 'none') stops fetch() before it reaches the network
    violated = tab.evaluate("""new Promise(resolve => {
        document.addEventListener('securitypolicyviolation',
                                  e => resolve(e.effectiveDirective), {once: true});
        setTimeout(() => resolve('no violation'), 5000);
        fetch('/stats', {method: 'POST', body: 'b=app&s=s2&action=maint&csrf=x',
                         headers: {'Content-Type': 'application/x-www-form-urlencoded'}})
            .catch(() => {});
    })""")
    assert violated == "connect-src"

    # the page's own form, same origin, with its token replaced
    form = "#server-app-s2 form.admin-form"
    real = tab.evaluate(f"document.querySelector({js(form + ' input[name=csrf]')}).value")
    assert len(real) == 64
    tab.evaluate(f"document.querySelector({js(form + ' input[name=csrf]')}).value = "
                 f"{js('f' * 64 if real != 'f' * 64 else '0' * 64)}")
    since = tab.mark()
    tab.click(f"{form} button[name=action][value=maint]")
    response = tab.document_response(since, where=lambda r: r["url"] == site.url)
    assert tab.sent_headers(since, "POST", site.url)["origin"] == site.origin
    assert response["status"] == 403
    tab.wait_navigation(since, lambda url: url == site.url)
    assert "invalid CSRF token" in (tab.text() or "")
    assert site.status("s2") == "UP"


# -- 5. auto-refresh -----------------------------------------------------------------------


def refresh_meta(tab: Tab) -> str | None:
    return tab.evaluate(
        "(() => { const m = document.querySelector('meta[http-equiv=\"refresh\" i]');"
        " return m === null ? null : m.content; })()")


def test_refresh_meta(site: Site, tab: Tab) -> None:
    tab.set_headers(AUTH)
    open_page(tab, site.url)
    # 5 seconds, to the bare uri: a reload must not show an old `;st=` notice again
    assert refresh_meta(tab) == "5; url=/stats"
    open_page(tab, site.url + ";norefresh")
    assert refresh_meta(tab) is None
    assert tab.evaluate("document.querySelector('#refresh-toggle').getAttribute('href')") \
        == "/stats"
    # an admin action keeps `;norefresh`: the page the browser lands on does not reload
    landed = submit(tab, "#server-app-s2 form.admin-form button[name=action][value=drain]",
                    ";st=")
    assert landed == site.url + ";norefresh;st=DONE"
    assert refresh_meta(tab) is None
    assert status_classes(tab)["s2"] == "st-drain"


def test_browser_refreshes_the_page(pylb: PylbFactory, backends: Backends,
                                    free_port: Callable[[], int], tab: Tab) -> None:
    fast = start_site(pylb, backends, free_port, refresh="1s")
    tab.set_headers(AUTH)
    since = tab.mark()  # before the load: the refresh timer starts with it
    open_page(tab, fast.url + ";st=DONE")
    assert refresh_meta(tab) == "1; url=/stats"
    assert tab.evaluate("document.querySelector('#notice') !== null")
    # Chromium reloads by itself, to the bare uri: the notice is gone
    tab.wait_navigation(since, lambda url: url == fast.url, timeout=10)
    assert tab.evaluate("document.querySelector('#notice') === null")
    assert tab.evaluate("document.querySelector('#server-app-s1') !== null")
