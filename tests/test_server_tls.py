"""TLS to servers (`ssl`, `verify`, `ca-file`, `sni`, `verifyhost`, and health checks over
TLS): real pylb processes, real TLS backends (tests/backends.py TlsEchoBackend) with
certificates made here by trustme.

Every wait is on an event pylb or a backend reports (a log line, the stats socket, a
recorded request), never on a sleep.
"""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trustme
from backends import (
    HOST,
    EchoBackend,
    HttpConn,
    TlsEchoBackend,
    free_port,
    stats_command,
    wait_until,
)

REPO = Path(__file__).resolve().parent.parent
PYLB = [sys.executable, str(REPO / "bin" / "pylb")]
SOCK = "lb.sock"  # relative: in pylb's working directory
NAME = "app.example.com"  # the name in the backends' certificates
TIMEOUTS = {"connect": "1s", "client": "10s", "server": "5s", "check": "1s"}


@dataclass
class Pki:
    """A CA that signed the backends' certificate, and one that did not."""

    ca: trustme.CA
    cert: Any  # trustme.LeafCert for NAME, signed by `ca`
    ca_file: Path
    other_file: Path  # the other CA's PEM


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca, other = trustme.CA(), trustme.CA()
    cert = ca.issue_cert(NAME)
    where = tmp_path_factory.mktemp("pki")
    ca_file, other_file = where / "ca.pem", where / "other.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    other.cert_pem.write_to_path(str(other_file))
    return Pki(ca, cert, ca_file, other_file)


def config(frontends: dict[str, str], backends: dict[str, dict[str, Any]],
           workers: int = 1) -> dict[str, Any]:
    """One frontend per backend, `frontends` giving each one's bind."""
    return {
        "global": {"workers": workers, "stats": {"socket": SOCK, "level": "admin"}},
        "defaults": {"mode": "http", "timeout": dict(TIMEOUTS)},
        "frontends": {name: {"bind": bind, "default_backend": name}
                      for name, bind in frontends.items()},
        "backends": backends,
    }


def one_server(address: str, backend: dict[str, Any] | None = None,
               **server: Any) -> dict[str, Any]:
    return {**(backend or {}), "servers": {"s1": {"address": address, **server}}}


def show_stat(lb: Any) -> dict[tuple[str, str], dict[str, str]]:
    """`show stat` rows by (proxy, server)."""
    lines = stats_command(lb.workdir / SOCK, "show stat").splitlines()
    names = lines[0].removeprefix("# ").split(",")
    rows = [dict(zip(names, line.split(","), strict=False)) for line in lines[1:] if line]
    return {(row["pxname"], row["svname"]): row for row in rows}


def servers_state(lb: Any) -> dict[str, list[str]]:
    """`show servers state` lines by backend name (one server each here)."""
    lines = stats_command(lb.workdir / SOCK, "show servers state").splitlines()
    return {line.split()[1]: line.split() for line in lines[2:] if line}


def get(port: int, target: str = "/") -> Any:
    with HttpConn(port) as conn:
        return conn.request("GET", target)


# -- one pylb, many backends --------------------------------------------------------------


@dataclass
class Site:
    lb: Any
    ports: dict[str, int]
    tls: dict[str, TlsEchoBackend]
    plain: EchoBackend
    silent: socket.socket  # listens, never accepts: TCP connects, TLS never answers

    def get(self, frontend: str, target: str = "/") -> Any:
        return get(self.ports[frontend], target)


@pytest.fixture(scope="module")
def site(pylb_module: Any, backends_module: Any, pki: Pki) -> Iterator[Site]:
    ca, other = str(pki.ca_file), str(pki.other_file)
    names = ("sni", "split", "wrongname", "untrusted", "noverify", "chain", "pool",
             "chk_ok", "chk_http", "chk_bad", "tcp")
    tls = {name: backends_module._add(TlsEchoBackend(name, pki.cert)) for name in names}
    plain = backends_module.echo("plain")
    silent = socket.create_server((HOST, 0), backlog=64)
    silent_address = f"{HOST}:{silent.getsockname()[1]}"
    strict = {"ssl": True, "ca-file": ca, "sni": NAME}
    check = {"check": True, "inter": "100ms", "rise": 1, "fall": 1}
    no_retry = {"retries": 0}
    backends = {
        "sni": one_server(tls["sni"].address, **strict),
        "split": one_server(tls["split"].address, ssl=True, **{"ca-file": ca},
                            sni="other.example.net", verifyhost=NAME),
        "wrongname": one_server(tls["wrongname"].address, no_retry, ssl=True,
                                **{"ca-file": ca}, verifyhost="wrong.example.com"),
        "untrusted": one_server(tls["untrusted"].address, no_retry, ssl=True,
                                **{"ca-file": other}, sni=NAME),
        "noverify": one_server(tls["noverify"].address, ssl=True, verify="none",
                               **{"ca-file": other}),
        "chain": one_server(tls["chain"].address, ssl=True, **{"ca-file": ca}),
        "pool": one_server(tls["pool"].address, **strict),
        # default-server carries the TLS keys, as it carries the others
        "chk_ok": one_server(tls["chk_ok"].address, {"default-server": {**strict, **check}}),
        "chk_http": one_server(tls["chk_http"].address, {"http-check": {"path": "/health"}},
                               **strict, **check),
        "chk_bad": one_server(tls["chk_bad"].address, ssl=True, **{"ca-file": other},
                              sni=NAME, **check),
        "chk_plain": one_server(plain.address, ssl=True, **{"ca-file": ca}, **check),
        "chk_silent": one_server(silent_address, ssl=True, **{"ca-file": ca}, **check),
        "tcp": one_server(tls["tcp"].address, {"mode": "tcp"}, **strict),
        "silent": one_server(silent_address, no_retry, **strict),
    }
    ports = {name: free_port() for name in backends}
    cfg = config({name: f"{HOST}:{port}" for name, port in ports.items()}, backends)
    cfg["frontends"]["tcp"]["mode"] = "tcp"
    lb = pylb_module(cfg)
    assert wait_until(lambda: (lb.workdir / SOCK).exists(), 5), "no stats socket"
    yield Site(lb, ports, tls, plain, silent)
    silent.close()


def test_requests_reach_the_tls_server_with_its_sni(site: Site):
    response = site.get("sni", "/hello")
    assert response.status == 200
    assert response.json()["target"] == "/hello"
    backend = site.tls["sni"]
    assert backend.snis and set(backend.snis) == {NAME}
    assert set(backend.alpns) == {"http/1.1"}  # http mode offers ALPN http/1.1


def test_verifyhost_is_checked_while_sni_sends_another_name(site: Site):
    assert site.get("split").status == 200
    assert set(site.tls["split"].snis) == {"other.example.net"}


def test_a_certificate_without_the_verifyhost_name_is_refused(site: Site):
    assert site.get("wrongname").status == 503
    assert site.tls["wrongname"].requests == []
    # sent: verifyhost, as there is no sni
    assert set(site.tls["wrongname"].snis) == {"wrong.example.com"}


def test_a_ca_that_did_not_sign_the_certificate_fails_the_request(site: Site):
    before = int(show_stat(site.lb)[("untrusted", "s1")]["econ"] or 0)
    assert site.get("untrusted").status == 503
    assert site.tls["untrusted"].requests == []
    assert int(show_stat(site.lb)[("untrusted", "s1")]["econ"]) == before + 1


def test_timeout_connect_covers_the_handshake(site: Site):
    started = time.monotonic()
    assert site.get("silent").status == 503  # the TCP connect succeeds, TLS never answers
    assert 0.9 <= time.monotonic() - started < 5  # timeout connect: 1s
    assert int(show_stat(site.lb)[("silent", "s1")]["econ"]) == 1


def test_verify_none_accepts_an_untrusted_certificate(site: Site):
    assert site.get("noverify").status == 200


def test_without_a_name_the_chain_alone_is_verified(site: Site):
    assert site.get("chain").status == 200
    assert set(site.tls["chain"].snis) == {None}  # an IP address: no SNI is sent


def test_tcp_mode_relays_to_a_tls_server(site: Site):
    assert site.get("tcp").status == 200
    assert set(site.tls["tcp"].snis) == {NAME}
    assert set(site.tls["tcp"].alpns) == {None}  # tcp mode offers no ALPN


def test_keepalive_connections_to_a_tls_server_are_pooled(site: Site):
    backend = site.tls["pool"]
    for i in range(5):  # a new client connection each time: the server one is the pool's
        assert site.get("pool", f"/{i}").status == 200
    with HttpConn(site.ports["pool"]) as conn:
        for i in range(5):
            assert conn.request("GET", f"/ka{i}").status == 200
    assert backend.connections == 1, backend.requests
    assert len(backend.snis) == 1  # one handshake
    assert [r["conn"] for r in backend.requests] == [1] * 10


def wait_check(site: Site, backend: str, status: str, check_status: str) -> dict[str, str]:
    def seen() -> bool:
        row = show_stat(site.lb)[(backend, "s1")]
        return (row["status"], row["check_status"]) == (status, check_status)

    if not wait_until(seen, 5, 0.02):
        pytest.fail(f"{backend}/s1: {show_stat(site.lb)[(backend, 's1')]}")
    return show_stat(site.lb)[(backend, "s1")]


def test_checks_over_tls_keep_a_good_server_up(site: Site):
    wait_check(site, "chk_ok", "UP", "L6OK")  # HAProxy's status for a check-ssl connect
    wait_check(site, "chk_http", "UP", "L7OK")
    assert wait_until(lambda: any(r["target"] == "/health" for r in site.tls["chk_http"].requests),
                      5)
    assert set(site.tls["chk_ok"].snis) == {NAME}
    state = servers_state(site.lb)
    assert state["chk_ok"][5] == "2" and state["chk_http"][5] == "2"  # srv_op_state: running
    assert site.get("chk_ok").status == 200


def test_a_server_whose_handshake_fails_its_checks_goes_down(site: Site):
    wait_check(site, "chk_bad", "DOWN", "L6RSP")
    wait_check(site, "chk_plain", "DOWN", "L6RSP")
    state = servers_state(site.lb)
    assert state["chk_bad"][5] == "0" and state["chk_plain"][5] == "0"  # stopped
    assert state["chk_bad"][10] == "10"  # srv_check_status: L6RSP's code
    found = site.lb.wait_log(r"Server chk_bad/s1 is DOWN, reason: Layer6 invalid response, "
                             r'info: "SSL handshake failure \(certificate verify failed: ')
    assert "check duration" in found.string
    site.lb.wait_log(r"Server chk_plain/s1 is DOWN, reason: Layer6 invalid response, "
                     r'info: "SSL handshake failure')
    assert site.get("chk_bad").status == 503  # no server left
    assert site.tls["chk_bad"].requests == []


def test_a_handshake_that_never_completes_is_a_layer6_timeout(site: Site):
    row = wait_check(site, "chk_silent", "DOWN", "L6TOUT")
    assert int(row["check_duration"]) >= 900  # about `timeout check` (1s)
    site.lb.wait_log(r"Server chk_silent/s1 is DOWN, reason: Layer6 timeout, check duration")


# -- a reload under load -------------------------------------------------------------------


class Load:
    """Client threads sending requests until stopped (bounded in count and time): half
    keep their connection, half open one per request."""

    def __init__(self, port: int, clients: int = 4, max_seconds: float = 15.0) -> None:
        self.port = port
        self.deadline = time.monotonic() + max_seconds
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.answered = 0
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                        for i in range(clients)]
        for thread in self.threads:
            thread.start()

    def _client(self, index: int) -> None:
        conn: HttpConn | None = None
        done = 0
        while not self.stopping.is_set() and time.monotonic() < self.deadline and done < 20000:
            try:
                if conn is None:
                    conn = HttpConn(self.port)
                status = conn.request("GET", f"/c{index}/{done}").status
                with self.lock:
                    if status == 200:
                        self.answered += 1
                    else:
                        self.errors.append(f"client {index} request {done}: {status}")
            except Exception as exc:
                with self.lock:
                    self.errors.append(f"client {index} request {done}: {exc!r}")
                if conn is not None:
                    conn.close()
                conn = None
            done += 1
            if index % 2 and conn is not None:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def count(self) -> int:
        with self.lock:
            return self.answered

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(10)
        assert not any(thread.is_alive() for thread in self.threads), "a client hung"


def test_a_reload_under_load_to_a_tls_server_loses_no_request(pylb: Any, backends: Any,
                                                                pki: Pki):
    backend = backends._add(TlsEchoBackend("reload", pki.cert))
    port = free_port()
    server = {"ssl": True, "ca-file": str(pki.ca_file), "sni": NAME, "check": True,
              "inter": "200ms"}
    lb = pylb(config({"app": f"{HOST}:{port}"}, {"app": one_server(backend.address, **server)},
                     workers=2))
    # A response streaming from the TLS server while the reloads happen: its server
    # connection's TLS state lives in the old worker, so it must end there, whole.
    stream = HttpConn(port, timeout=10)
    stream.send(b"GET /?events=40&every=0.02 HTTP/1.1\r\nHost: test\r\n\r\n")
    assert wait_until(lambda: any("events" in r["target"] for r in backend.requests), 5)
    load = Load(port)
    try:
        assert wait_until(lambda: load.count() >= 20, 5), load.errors
        for reload in (1, 2):
            mark = len(lb.lines)
            lb.signal(signal.SIGUSR2)
            lb.wait_log(rf"reload {reload} done: generation \d+ serves", 20, start=mark)
            before = load.count()
            assert wait_until(lambda b=before: load.count() >= b + 20, 5), load.errors
        streamed = stream.read_response()
        # the older generations leave once they handed over or finished everything
        assert wait_until(lambda: len(lb.workers()) == 2, 10), lb.workers()
        before = load.count()
        assert wait_until(lambda: load.count() >= before + 20, 5), load.errors
    finally:
        load.stop()
        stream.close()
    assert load.errors == [], f"{len(load.errors)} failed: {load.errors[:8]}"
    assert streamed.status == 200
    assert streamed.body == b"".join(b"data: %d\n\n" % i for i in range(40))
    assert show_stat(lb)[("app", "s1")]["status"] == "UP"


# -- configuration errors -------------------------------------------------------------------


@pytest.fixture
def check_config(tmp_path: Path) -> Iterator[Any]:
    """`check_config(server_yaml)`: `pylb -c` on a file with that server; (status, stderr,
    the line of the server's last key)."""

    def run(server_lines: str) -> tuple[int, str, int]:
        text = (
            "frontends:\n"
            "  www: {bind: \"127.0.0.1:8080\", default_backend: app}\n"
            "backends:\n"
            "  app:\n"
            "    servers:\n"
            "      s1:\n"
            "        address: 127.0.0.1:9443\n"
            "        ssl: true\n"
            + "".join(f"        {line}\n" for line in server_lines.splitlines())
        )
        (tmp_path / "lb.cfg").write_text(text)
        done = subprocess.run([*PYLB, "-c", "-f", "lb.cfg"], capture_output=True, text=True,
                              cwd=tmp_path, timeout=30)
        return done.returncode, done.stderr.strip() or done.stdout.strip(), \
            len(text.splitlines())

    yield run


def test_config_errors_name_file_line_and_key(check_config: Any, tmp_path: Path, pki: Pki):
    status, out, line = check_config("ca-file: missing.pem")
    assert (status, out) == (1, f"lb.cfg:{line}: backends.app.servers.s1.ca-file: "
                                "cannot read ca-file 'missing.pem': No such file or directory")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    status, out, line = check_config("ca-file: junk.pem")
    assert status == 1
    assert out.startswith(f"lb.cfg:{line}: backends.app.servers.s1.ca-file: ca-file "
                          "'junk.pem' is not a PEM file of CA certificates"), out
    status, out, line = check_config("verify: optional")
    assert (status, out) == (1, f"lb.cfg:{line}: backends.app.servers.s1.verify: "
                                "expected none or required, got 'optional'")
    status, out, line = check_config("sni: req.hdr(host)")
    assert status == 1 and out.startswith(f"lb.cfg:{line}: backends.app.servers.s1.sni: "), out
    assert "literal name" in out
    status, out, _ = check_config(f"ca-file: {pki.ca_file}\nsni: {NAME}\nverifyhost: {NAME}")
    assert (status, out) == (0, "Configuration file is valid")
    status, out, _ = check_config('ca-file: "@system-ca"\nverify: none')
    assert (status, out) == (0, "Configuration file is valid")


# -- lb.tls.client, without sockets ----------------------------------------------------------


def server_cfg(**tls: Any) -> Any:
    from lb import config as lbconfig

    text = ("frontends: {www: {bind: \"127.0.0.1:8080\", default_backend: app}}\n"
            "backends: {app: {servers: {s1: {address: \"app.lan:443\"}}}}\n")
    server = lbconfig.loads(text).backends["app"].servers[0]
    return replace(server, **tls)


def test_client_contexts_follow_the_configuration(pki: Pki):
    from lb.tls import client

    pem = pki.ca_file.read_bytes()
    assert client.context(server_cfg(), "http") is None  # no ssl: plain TCP
    plain = server_cfg(ssl=True, ca=pem)
    ctx = client.context(plain, "http")
    assert ctx is not None and ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert (ctx.verify_mode, ctx.check_hostname) == (ssl.CERT_REQUIRED, False)  # chain only
    assert client.server_hostname(plain) == "app.lan"
    assert client.context(replace(plain), "http") is ctx  # servers alike share one
    named = client.context(replace(plain, sni=NAME), "http")
    assert named is not None and named.check_hostname
    assert client.server_hostname(replace(plain, sni=NAME, verifyhost="v.example.com")) == NAME
    assert client.server_hostname(replace(plain, verifyhost="v.example.com")) == "v.example.com"
    loose = client.context(replace(plain, verify="none", sni=NAME), "tcp")
    assert loose is not None
    assert (loose.verify_mode, loose.check_hostname) == (ssl.CERT_NONE, False)


@pytest.mark.parametrize(("names", "host", "expected"), [
    (["app.example.com"], "APP.example.com.", True),
    (["*.example.com"], "app.example.com", True),
    (["*.example.com"], "a.b.example.com", False),  # one label only
    (["*.example.com"], "example.com", False),
    (["*.com"], "example.com", False),  # not a whole registrable name
    (["ap*.example.com"], "app.example.com", False),  # partial wildcards: no
    ([], "app.example.com", False),
])
def test_verifyhost_matching(names: list[str], host: str, expected: bool):
    from lb.tls.client import matches

    cert = {"subject": ((("commonName", "ignored.example.com"),),),
            "subjectAltName": tuple(("DNS", name) for name in names)}
    if not names:  # no DNS name: the common name is the one checked, as OpenSSL does
        cert = {"subject": ((("commonName", "other.example.com"),),)}
    assert matches(cert, host) is expected
    assert matches({"subject": ((("commonName", host),),)}, host)
