"""HTTP over TLS, the rest of it: the ssl_ fetches in rules (ssl_fc, ssl_fc_sni,
ssl_fc_protocol, ssl_fc_cipher, ssl_fc_alpn, ssl_fc_is_resumed, ssl_c_used), the request
log's `httpslog` fields, and show info's and show stat's TLS figures. Real pylb processes
with plain and TLS binds on one frontend, certificates made here by trustme, an echo
backend that reports the headers it received.

Every wait is on something pylb reports (an answer, a log line, the stats socket), never on
a sleep; the one measurement made over "the last second" checks that the test did fit in
that second (see test_reuse_percentage_and_rates).
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from backends import TCP_BANNER, HttpConn, Response, free_port, stats_command, wait_until

from lb import httplog

NAME = "www.example.com"
SOCK = "lb.sock"  # relative: in pylb's working directory
DATE = r"\[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d\.\d{3}\]"
TIMEOUTS = {"connect": "2s", "client": "10s", "server": "10s"}
VERSIONS = {ssl.TLSVersion.TLSv1_3: "TLSv1.3", ssl.TLSVersion.TLSv1_2: "TLSv1.2"}


@dataclass
class Pki:
    ca: trustme.CA
    crt: Path  # the frontend's certificate: chain and key, for NAME and *.example.com
    ca_file: Path  # the CA, for the bind that asks for client certificates
    client: trustme.LeafCert  # a client certificate the CA signed


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = trustme.CA()
    where = tmp_path_factory.mktemp("pki")
    crt, ca_file = where / "site.pem", where / "ca.pem"
    ca.issue_cert(NAME, "*.example.com").private_key_and_cert_chain_pem.write_to_path(str(crt))
    ca.cert_pem.write_to_path(str(ca_file))
    return Pki(ca, crt, ca_file, ca.issue_cert("client.example.com"))


def client_context(pki: Pki, version: ssl.TLSVersion | None = None,
                   cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    pki.ca.configure_trust(ctx)
    ctx.set_alpn_protocols(["http/1.1"])
    if version is not None:
        ctx.maximum_version = version
    if cert:
        pki.client.configure_cert(ctx)
    return ctx


def tls_conn(port: int, ctx: ssl.SSLContext, name: str | None = NAME,
             session: ssl.SSLSession | None = None) -> HttpConn:
    """An HttpConn whose socket is TLS (its reader reads `sock` when it needs bytes)."""
    conn = HttpConn(port)
    conn.sock = ctx.wrap_socket(conn.sock, server_hostname=name, session=session)
    return conn


def get(conn: HttpConn, target: str) -> Response:
    resp = conn.request("GET", target)
    assert resp.status == 200, resp
    return resp


def received(resp: Response) -> dict[str, str]:
    """The headers the echo backend received (the last of each name)."""
    return {name.lower(): value for name, value in resp.json()["headers"]}


def show_info(lb: Any) -> dict[str, str]:
    answer = stats_command(lb.workdir / SOCK, "show info")
    return dict(line.split(": ", 1) for line in answer.splitlines() if line)


def frontend_row(lb: Any, name: str) -> dict[str, str]:
    lines = stats_command(lb.workdir / SOCK, "show stat").splitlines()
    header = lines[0].removeprefix("# ").split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:] if line]
    return next(row for row in rows if (row["pxname"], row["svname"]) == (name, "FRONTEND"))


# -- one pylb: a frontend with a plain bind, a TLS bind, a TLS bind asking for certificates


RULES = [
    "redirect scheme https code 301 unless { ssl_fc } || { path_beg /open }",
    "set-header X-Forwarded-Proto https if { ssl_fc }",
    "set-header X-SNI %[ssl_fc_sni]",
    "set-header X-TLS %[ssl_fc]/%[ssl_fc_protocol]/%[ssl_fc_cipher]/%[ssl_fc_alpn]",
    "set-header X-Resumed %[ssl_fc_is_resumed]",
    "set-header X-Client-Cert %[ssl_c_used]",
    "set-header X-Example yes if { ssl_fc_sni_end -i .example.com }",
]


@dataclass
class Site:
    lb: Any
    plain: int
    tls: int
    mtls: int  # asks for a client certificate (verify: optional)
    log: Path


@pytest.fixture(scope="module")
def site(pylb_module: Any, backends_module: Any, pki: Pki,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    echo = backends_module.echo("s1")
    plain, tls, mtls = free_port(), free_port(), free_port()
    log = tmp_path_factory.mktemp("log") / "requests.log"
    crt = str(pki.crt)
    cfg = {
        "global": {"workers": 2, "stats": {"socket": SOCK}},
        "defaults": {"timeout": dict(TIMEOUTS)},
        "frontends": {"www": {
            "bind": [f"127.0.0.1:{plain}",
                     {"address": f"127.0.0.1:{tls}", "ssl": True, "crt": crt},
                     {"address": f"127.0.0.1:{mtls}", "ssl": True, "crt": crt,
                      "verify": "optional", "ca-file": str(pki.ca_file)}],
            "log": str(log), "httpslog": True,
            "http-request": RULES,
            "default_backend": "app",
        }},
        "backends": {"app": {"servers": {"s1": {"address": echo.address}}}},
    }
    yield Site(pylb_module(cfg), plain, tls, mtls, log)


def test_redirect_to_https_on_the_plain_bind_only(site: Site, pki: Pki) -> None:
    with HttpConn(site.plain) as conn:
        resp = conn.request("GET", "/login?next=/", headers={"Host": NAME})
    assert resp.status == 301
    assert resp.header("Location") == f"https://{NAME}/login?next=/"
    with tls_conn(site.tls, client_context(pki)) as conn:
        resp = get(conn, "/login?next=/")
    assert received(resp)["x-forwarded-proto"] == "https"


def test_forwarded_proto_and_the_tls_fields_only_over_tls(site: Site, pki: Pki) -> None:
    with HttpConn(site.plain) as conn:
        plain = received(get(conn, "/open"))
    assert "x-forwarded-proto" not in plain
    assert "x-example" not in plain
    # no sample over plain TCP: empty; the booleans are 0
    assert (plain["x-sni"], plain["x-tls"], plain["x-resumed"], plain["x-client-cert"]) == (
        "", "0///", "0", "")
    with tls_conn(site.tls, client_context(pki)) as conn:
        tls = received(get(conn, "/open"))
        version, cipher = conn.sock.version(), conn.sock.cipher()[0]  # type: ignore[attr-defined]
        alpn = conn.sock.selected_alpn_protocol()  # type: ignore[attr-defined]
    assert tls["x-forwarded-proto"] == "https"
    assert tls["x-sni"] == NAME
    assert tls["x-example"] == "yes"
    assert alpn == "http/1.1"
    assert tls["x-tls"] == f"1/{version}/{cipher}/http/1.1"
    assert (tls["x-resumed"], tls["x-client-cert"]) == ("0", "0")


def test_without_sni_there_is_no_server_name(site: Site, pki: Pki) -> None:
    ctx = client_context(pki)
    ctx.check_hostname = False  # no name to check: none is sent
    with tls_conn(site.tls, ctx, name=None) as conn:
        headers = received(get(conn, "/open?nosni"))
    assert headers["x-sni"] == "" and headers["x-forwarded-proto"] == "https"
    assert "x-example" not in headers


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2],
                         ids=["tls1.3", "tls1.2"])
def test_protocol_and_resumed_session(site: Site, pki: Pki, version: ssl.TLSVersion) -> None:
    ctx = client_context(pki, version)
    with tls_conn(site.tls, ctx) as conn:
        first = received(get(conn, "/open?first"))  # reading it takes TLS 1.3's tickets in
        session = conn.sock.session  # type: ignore[attr-defined]
        assert not conn.sock.session_reused  # type: ignore[attr-defined]
    assert first["x-resumed"] == "0"
    assert first["x-tls"].startswith(f"1/{VERSIONS[version]}/")
    with tls_conn(site.tls, ctx, session=session) as conn:
        again = received(get(conn, "/open?again"))
        assert conn.sock.session_reused  # type: ignore[attr-defined]
    assert again["x-resumed"] == "1"
    assert again["x-sni"] == NAME


def test_client_certificate(site: Site, pki: Pki) -> None:
    with tls_conn(site.mtls, client_context(pki, cert=True)) as conn:
        assert received(get(conn, "/open?cert"))["x-client-cert"] == "1"
    with tls_conn(site.mtls, client_context(pki)) as conn:
        assert received(get(conn, "/open?nocert"))["x-client-cert"] == "0"


def log_line(site: Site, target: str) -> str:
    """The log line of the one request for `target`."""
    def find() -> list[str]:
        lines = site.log.read_text().splitlines() if site.log.exists() else []
        return [line for line in lines if f'"GET {target} HTTP/1.1"' in line]

    assert wait_until(lambda: len(find()) == 1, 5), find()
    return find()[0]


def test_httpslog_lines(site: Site, pki: Pki) -> None:
    ctx = client_context(pki)
    with tls_conn(site.tls, ctx) as conn:
        get(conn, "/open?log=tls")
        cipher = conn.sock.cipher()[0]  # type: ignore[attr-defined]
        version = conn.sock.version()  # type: ignore[attr-defined]
        session = conn.sock.session  # type: ignore[attr-defined]
    with tls_conn(site.tls, ctx, session=session) as conn:
        get(conn, "/open?log=resumed")
    with HttpConn(site.plain) as conn:
        get(conn, "/open?log=plain")
    head = rf'^127\.0\.0\.1:\d+ {DATE} www app/s1 \d+/\d+/\d+/\d+/\d+ 200 \d+ - - ---- ' \
           r'\d+/\d+/\d+/\d+/0 0/0 '
    tls_line = log_line(site, "/open?log=tls")
    assert re.match(head + re.escape(f'"GET /open?log=tls HTTP/1.1" 0/0000000000000000/0/0/0 '
                                     f'{NAME}/{version}/{cipher}') + "$", tls_line), tls_line
    resumed = log_line(site, "/open?log=resumed")
    assert resumed.endswith(f" 0/0000000000000000/0/0/1 {NAME}/{version}/{cipher}"), resumed
    plain = log_line(site, "/open?log=plain")
    assert re.match(head + re.escape('"GET /open?log=plain HTTP/1.1" 0/-/-/-/0 -/-/-') + "$",
                    plain), plain


def test_httpslog_formatting() -> None:
    fields = httplog.HttpsFields(True, True, "a b\x01.example.com", "TLSv1.2",
                                 "ECDHE-RSA-AES128-GCM-SHA256")
    assert httplog.format_https(fields) == (
        "0/0000000000000000/0/0/1 a#20b#01.example.com/TLSv1.2/ECDHE-RSA-AES128-GCM-SHA256")
    assert httplog.format_https(httplog.HttpsFields(True)) == "0/0000000000000000/0/0/0 -/-/-"
    assert httplog.format_https(httplog.HttpsFields(False)) == "0/-/-/-/0 -/-/-"
    rec = httplog.Record("127.0.0.1", 1, 1795251001.123, "www", "app", "s1", 0, 0, 1, 2, 3,
                         200, 5, "----", 1, 1, 0, 0, 0, 0, 0, "GET / HTTP/1.1", "http")
    plain_line = httplog.format_record(rec)
    rec.https = httplog.HttpsFields(False)
    assert httplog.format_record(rec) == plain_line + " 0/-/-/-/0 -/-/-"


# -- show info and show stat: a pylb of their own, so that nothing else counts


def counting_config(pki: Pki, echo: str, tcp_echo: str, ports: dict[str, int],
                    workers: int) -> dict[str, Any]:
    crt = str(pki.crt)
    return {
        "global": {"workers": workers, "stats": {"socket": SOCK}},
        "defaults": {"timeout": dict(TIMEOUTS)},
        "frontends": {
            "www": {"bind": [f"127.0.0.1:{ports['plain']}",
                             {"address": f"127.0.0.1:{ports['tls']}", "ssl": True,
                              "crt": crt}],
                    "default_backend": "app"},
            "raw": {"mode": "tcp", "bind": {"address": f"127.0.0.1:{ports['tcp']}",
                                            "ssl": True, "crt": crt},
                    "default_backend": "tcp"},
        },
        "backends": {
            "app": {"servers": {"s1": {"address": echo}}},
            "tcp": {"mode": "tcp", "servers": {"s1": {"address": tcp_echo}}},
        },
    }


def test_current_and_cumulated_tls_connections(pylb: Any, backends: Any, pki: Pki) -> None:
    ports = {"plain": free_port(), "tls": free_port(), "tcp": free_port()}
    lb = pylb(counting_config(pki, backends.echo("s1").address,
                              backends.tcp("echo").address, ports, workers=2))
    info = show_info(lb)
    assert (info["CurrSslConns"], info["CumSslConns"], info["MaxSslConns"]) == ("0", "0", "0")
    ctx = client_context(pki)
    held = [tls_conn(ports["tls"], ctx) for _ in range(4)]
    plain = HttpConn(ports["plain"])
    try:
        for conn in [*held, plain]:
            get(conn, "/")  # answered: the handshake is done and counted
        raw = ctx.wrap_socket(socket.create_connection(("127.0.0.1", ports["tcp"]), timeout=5),
                              server_hostname=NAME)
        try:
            assert raw.recv(len(TCP_BANNER)) == TCP_BANNER  # relayed: its TLS is counted
            info = show_info(lb)
            assert (info["CurrSslConns"], info["CumSslConns"]) == ("5", "5")
        finally:
            raw.close()
        for conn in held[:2]:
            conn.close()
        assert wait_until(lambda: show_info(lb)["CurrSslConns"] == "2", 5), show_info(lb)
        assert show_info(lb)["CumSslConns"] == "5"
        assert show_info(lb)["CurrConns"] == "3"  # two TLS, one plain
    finally:
        for conn in [*held, plain]:
            conn.close()
    assert wait_until(lambda: show_info(lb)["CurrSslConns"] == "0", 5), show_info(lb)
    info = show_info(lb)
    assert info["CumSslConns"] == "5"
    www, raw_row = frontend_row(lb, "www"), frontend_row(lb, "raw")
    assert (www["ssl_sess"], www["ssl_reused_sess"], www["ssl_failed_handshake"]) == ("4", "0", "")
    assert (raw_row["ssl_sess"], raw_row["ssl_reused_sess"]) == ("1", "0")
    assert www["-"] == "-"


def test_reuse_percentage_and_rates(pylb: Any, backends: Any, pki: Pki) -> None:
    """SslFrontendSessionReuse_pct, SslRate and SslFrontendKeyRate are HAProxy's: over the
    last second. One full handshake and three resumptions: once the master's next samples
    hold all four in their one-second window, show info says exactly 4, 1 and 75%. A
    machine so slow that four connections did not fit in a second is no failure of pylb:
    the round is made again once the window has forgotten it."""
    ports = {"plain": free_port(), "tls": free_port(), "tcp": free_port()}
    lb = pylb(counting_config(pki, backends.echo("s1").address,
                              backends.tcp("echo").address, ports, workers=1))
    info = show_info(lb)
    assert (info["SslRate"], info["SslFrontendKeyRate"], info["SslFrontendSessionReuse_pct"],
            info["SslRateLimit"]) == ("0", "0", "0", "0")
    ctx = client_context(pki)
    rounds = 0

    def rates() -> tuple[str, str, str]:
        info = show_info(lb)
        return info["SslRate"], info["SslFrontendKeyRate"], info["SslFrontendSessionReuse_pct"]

    while True:
        rounds += 1
        began = time.monotonic()
        with tls_conn(ports["tls"], ctx) as conn:
            get(conn, "/")
            session = conn.sock.session  # type: ignore[attr-defined]
        for _ in range(3):
            with tls_conn(ports["tls"], ctx, session=session) as conn:
                get(conn, "/")
                assert conn.sock.session_reused  # type: ignore[attr-defined]
        if time.monotonic() - began < 0.4:
            break
        assert rounds < 3, "four TLS connections never fit in a fraction of a second"
        time.sleep(2.1)  # the window holds none of this round any more
    assert wait_until(lambda: rates() == ("4", "1", "75"), 3), rates()
    info = show_info(lb)
    assert info["CumSslConns"] == str(4 * rounds)
    row = frontend_row(lb, "www")
    assert (row["ssl_sess"], row["ssl_reused_sess"]) == (str(rounds), str(3 * rounds))
