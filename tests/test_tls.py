"""TLS termination: SNI, session resumption on any worker and across reloads and takeovers,
certificates replaced at run time, and bad input on the TLS port.

Real clients: `openssl s_client` for sessions (saved with -sess_out, offered with -sess_in:
"Reused" or "New"), Python's ssl module, curl and wrk. Certificates come from a test CA
made by trustme.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from backends import HOST, HttpConn, IncompleteResponse, _Reader, free_port, wait_until
from conftest import REPO
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from test_reload import cli, lb_config, server, start
from test_takeover import start_daemon, terminate

METHODS = ("SIGUSR2", "SIGHUP", "socket")
# A handshake refused: TLS 1.3 clients may see it only when they read the answer
REFUSED = (ssl.SSLError, ConnectionError, IncompleteResponse)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_cert(ca: trustme.CA, path: Path, *names: str) -> Path:
    ca.issue_cert(*names).private_key_and_cert_chain_pem.write_to_path(str(path))
    return path


@pytest.fixture
def certs(tmp_path: Path, ca: trustme.CA) -> dict[str, Path]:
    """Two certificates in a directory (the one for a.test first), and the CA."""
    folder = tmp_path / "certs"
    folder.mkdir()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return {
        "dir": folder,
        "a": write_cert(ca, folder / "1-a.pem", "a.test", "*.w.test"),
        "b": write_cert(ca, folder / "2-b.pem", "b.test"),
        "ca": ca_file,
    }


def tls_config(echo: Any, plain: int, tls: int, crt: Path, **bind: Any) -> dict[str, Any]:
    cfg = lb_config({"s1": server(echo)}, plain)
    cfg["global"]["stats"]["expose-fd"] = "listeners"
    cfg["frontends"]["www"]["bind"] = [
        f"{HOST}:{plain}", {"address": f"{HOST}:{tls}", "ssl": True, "crt": str(crt), **bind},
    ]
    return cfg


def client_context(ca_file: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    return ctx


class TlsConn(HttpConn):
    """HttpConn over TLS (verified against the test CA, for `name`)."""

    def __init__(self, port: int, name: str | None, ctx: ssl.SSLContext,
                 session: ssl.SSLSession | None = None, timeout: float = 5.0) -> None:
        raw = socket.create_connection((HOST, port), timeout=timeout)
        self.sock = ctx.wrap_socket(raw, server_hostname=name, session=session)
        self.reader = _Reader(lambda: self.sock.recv(262144))


def serial_of(port: int, name: str | None, ca_file: Path) -> str:
    """The serial number of the certificate pylb serves for `name` (hex, upper case)."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.check_hostname = False
    with socket.create_connection((HOST, port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=name) as tls:
        return tls.getpeercert()["serialNumber"]  # type: ignore[index]


def file_serial(path: Path) -> str:
    out = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return out.strip().split("=", 1)[1].upper()


def s_client(port: int, *args: str) -> str:
    """One `openssl s_client` connection that sends a request and reads the answer."""
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"{HOST}:{port}", "-servername", "a.test",
         "-ign_eof", *args],
        input=b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        capture_output=True, timeout=20,
    )
    return done.stdout.decode("latin-1")


def resumed(port: int, session: Path) -> str:
    """"Reused" or "New": what a connection offering the saved session got."""
    out = s_client(port, "-sess_in", str(session))
    found = re.search(r"^(Reused|New),", out, re.M)
    assert found and "HTTP/1.1 200" in out, out[-2000:]
    return found.group(1)


def saved_session(port: int, path: Path, ca_file: Path) -> Path:
    out = s_client(port, "-sess_out", str(path), "-CAfile", str(ca_file))
    assert "Verify return code: 0 (ok)" in out and "HTTP/1.1 200" in out, out[-2000:]
    return path


# -- SNI ------------------------------------------------------------------------------------


def test_sni_picks_the_certificate_of_each_name(pylb, backends, certs):
    echo = backends.echo("s1")
    plain, port = free_port(), free_port()
    lb, _ = start(pylb, tls_config(echo, plain, port, certs["dir"]))
    ctx = client_context(certs["ca"])
    for name, cert in (("a.test", "a"), ("b.test", "b"), ("x.w.test", "a")):
        with TlsConn(port, name, ctx) as conn:  # verified: the name is in the certificate
            response = conn.request("GET", "/", headers={"Host": name})
            assert response.status == 200
        assert serial_of(port, name, certs["ca"]) == file_serial(certs[cert]), name
    # no SNI, or a name no certificate has: the first certificate of the bind
    assert serial_of(port, None, certs["ca"]) == file_serial(certs["a"])
    assert serial_of(port, "other.test", certs["ca"]) == file_serial(certs["a"])
    # the plain bind of the same frontend still speaks plain HTTP
    with HttpConn(plain) as conn:
        assert conn.request("GET", "/").status == 200
    curl = subprocess.run(
        ["curl", "-sS", "--cacert", str(certs["ca"]), "--resolve", f"b.test:{port}:{HOST}",
         "-o", "/dev/null", "-w", "%{http_code} %{ssl_verify_result}",
         f"https://b.test:{port}/"], capture_output=True, text=True, timeout=20)
    assert curl.stdout == "200 0", curl.stderr


def test_strict_sni_refuses_unknown_names(pylb, backends, certs):
    echo = backends.echo("s1")
    plain, port = free_port(), free_port()
    start(pylb, tls_config(echo, plain, port, certs["dir"], **{"strict-sni": True}))
    assert serial_of(port, "b.test", certs["ca"]) == file_serial(certs["b"])
    # refused in the handshake (uvloop may close before the alert goes out: EOF then)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        serial_of(port, "other.test", certs["ca"])


# -- resumption -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_a_session_resumes_on_every_worker_and_after_reloads(pylb, backends, certs, tmp_path,
                                                             method):
    echo = backends.echo("s1")
    plain, port = free_port(), free_port()
    lb, reload = start(pylb, tls_config(echo, plain, port, certs["dir"]))
    session = saved_session(port, tmp_path / "session.pem", certs["ca"])
    assert [resumed(port, session) for _ in range(6)] == ["Reused"] * 6
    for _ in range(2):
        reload(method)
        assert [resumed(port, session) for _ in range(6)] == ["Reused"] * 6


@pytest.mark.parametrize("takeover", [("-sf",), ("-x", "lb.sock", "-sf")],
                         ids=["sf", "x-sf"])
def test_a_session_resumes_after_a_takeover(backends, certs, tmp_path, takeover):
    """`pylb [-x SOCKET] -sf OLDPID`: the new master takes the ticket keys over with the
    state."""
    echo = backends.echo("s1")
    plain, port = free_port(), free_port()
    cfg = tls_config(echo, plain, port, certs["dir"])
    (tmp_path / "lb.cfg").write_text(yaml.safe_dump(cfg))
    pids = [start_daemon(tmp_path)]
    try:
        session = saved_session(port, tmp_path / "session.pem", certs["ca"])
        pids.append(start_daemon(tmp_path, *takeover, str(pids[0])))
        assert wait_until(lambda: not _alive(pids[0]), 15)
        assert [resumed(port, session) for _ in range(6)] == ["Reused"] * 6
    finally:
        terminate(pids)


def test_unshared_keys_would_not_resume(pylb, backends, certs, tmp_path):
    """The check above can fail: a pylb started afresh has new keys."""
    echo = backends.echo("s1")
    plain, port = free_port(), free_port()
    lb, _ = start(pylb, tls_config(echo, plain, port, certs["dir"]))
    session = saved_session(port, tmp_path / "session.pem", certs["ca"])
    lb.stop()
    start(pylb, tls_config(echo, plain, port, certs["dir"]))
    assert resumed(port, session) == "New"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


# -- certificates at run time ------------------------------------------------------------------


def set_cert(lb: Any, name: Path, pem: bytes) -> str:
    return cli(lb, f"set ssl cert {name} <<\n" + pem.decode() + "\n")


def test_commit_ssl_cert_serves_the_new_certificate_on_every_worker(pylb, backends, certs,
                                                                    ca, tmp_path):
    echo = backends.echo("s1")
    plain, port = free_port(), free_port()
    lb, _ = start(pylb, tls_config(echo, plain, port, certs["dir"]))
    old = file_serial(certs["b"])
    ctx = client_context(certs["ca"])
    established = TlsConn(port, "b.test", ctx)  # stays on the old certificate
    assert established.request("GET", "/").status == 200
    new = write_cert(ca, tmp_path / "new-b.pem", "b.test")
    assert cli(lb, "show ssl cert") == f"# filename\n{certs['a']}\n{certs['b']}\n\n"
    assert set_cert(lb, certs["b"], new.read_bytes()) == \
        f"Transaction created for certificate {certs['b']}!\n\n"
    assert cli(lb, "show ssl cert").startswith(f"# transaction\n*{certs['b']}\n")
    assert f"Serial: {file_serial(new)}" in cli(lb, f"show ssl cert *{certs['b']}")
    assert serial_of(port, "b.test", certs["ca"]) == old  # not committed yet
    assert cli(lb, f"commit ssl cert {certs['b']}") == f"Committing {certs['b']}\nSuccess!\n\n"
    # every new handshake, whichever worker takes it, gets the new certificate
    workers = {p.pid for p in lb.workers()}
    assert len(workers) == 2
    assert {serial_of(port, "b.test", certs["ca"]) for _ in range(20)} == {file_serial(new)}
    assert f"Serial: {file_serial(new)}" in cli(lb, f"show ssl cert {certs['b']}")
    # the established connection goes on, with the certificate it started with
    assert established.request("GET", "/").status == 200
    assert established.sock.getpeercert()["serialNumber"] == old  # type: ignore[attr-defined]
    established.close()
    # the other certificate did not change
    assert serial_of(port, "a.test", certs["ca"]) == file_serial(certs["a"])


def test_a_bad_certificate_payload_changes_nothing(pylb, backends, certs, ca, tmp_path):
    echo = backends.echo("s1")
    plain, port = free_port(), free_port()
    lb, _ = start(pylb, tls_config(echo, plain, port, certs["dir"]))
    old = file_serial(certs["b"])
    other = ca.issue_cert("b.test")
    stranger = trustme.CA().issue_cert("x").private_key_pem.bytes()
    mismatched = other.cert_chain_pems[0].bytes() + stranger
    for payload, why in ((b"garbage\n", "no PEM certificate"),
                         (other.cert_chain_pems[0].bytes(), "no private key"),
                         (mismatched, "does not match"),
                         (weak_pem(), "OpenSSL refuses it")):
        answer = set_cert(lb, certs["b"], payload)
        assert answer.startswith(f"Can't update {certs['b']}") and why in answer, answer
    assert cli(lb, f"commit ssl cert {certs['b']}") == "No ongoing transaction! !\n\n"
    assert set_cert(lb, tmp_path / "unknown.pem", other.private_key_and_cert_chain_pem.bytes()) \
        == "Can't replace a certificate which is not referenced by the configuration!\n\n"
    assert cli(lb, "set ssl cert").startswith("'set ssl cert' expects")
    # a transaction aborted changes nothing either
    set_cert(lb, certs["b"], other.private_key_and_cert_chain_pem.bytes())
    assert cli(lb, f"abort ssl cert {certs['b']}") == \
        f"Transaction aborted for certificate '{certs['b']}'!\n\n"
    assert {serial_of(port, "b.test", certs["ca"]) for _ in range(6)} == {old}
    assert lb.proc.poll() is None


def test_a_reload_reads_the_files_again_and_refuses_a_bad_one(pylb, backends, certs, ca,
                                                              tmp_path):
    echo = backends.echo("s1")
    plain, port = free_port(), free_port()
    lb, reload = start(pylb, tls_config(echo, plain, port, certs["dir"]))
    committed = write_cert(ca, tmp_path / "committed.pem", "b.test")
    set_cert(lb, certs["b"], committed.read_bytes())
    cli(lb, f"commit ssl cert {certs['b']}")
    write_cert(ca, certs["b"], "b.test")  # the operator writes the file too, then reloads
    reload("socket")
    assert serial_of(port, "b.test", certs["ca"]) == file_serial(certs["b"])
    good = file_serial(certs["b"])
    certs["b"].write_bytes(b"-----BEGIN CERTIFICATE-----\nbroken\n")
    reason = reload.failing("SIGUSR2")
    assert f"{certs['b']}" in reason and "crt" in reason, reason
    assert serial_of(port, "b.test", certs["ca"]) == good


def test_config_errors_name_file_line_and_key(tmp_path, certs, ca):
    """`pylb -c` refuses a bad TLS bind with file, line and key; an expired certificate is
    only a warning."""
    mismatched = tmp_path / "mismatched.pem"
    mismatched.write_bytes(ca.issue_cert("m.test").cert_chain_pems[0].bytes()
                           + trustme.CA().issue_cert("x").private_key_pem.bytes())
    weak = tmp_path / "weak.pem"
    weak.write_bytes(weak_pem())
    cases = [
        (f"crt: {tmp_path / 'missing.pem'}", "crt", "cannot read"),
        (f"crt: {weak}", "crt", "OpenSSL refuses it: EE_KEY_TOO_SMALL"),
        (f"crt: {certs['ca']}", "crt", "no private key"),
        (f"crt: {mismatched}", "crt", "the private key does not match the certificate"),
        (f"crt: {tmp_path / 'empty'}", "crt", "no certificate file in directory"),
        (f"crt: {certs['a']}, verify: required", "verify", "needs ca-file"),
        (f"crt: {certs['a']}, ca-file: {certs['a']}0", "ca-file", "cannot read"),
        (f"crt: {certs['a']}, ssl-min-ver: TLSv1.0", "ssl-min-ver", "expected TLSv1.2 or"),
        (f"crt: {certs['a']}, ciphersuites: TLS_NOPE", "ciphersuites", "unknown TLS 1.3"),
        (f"crt: {certs['a']}, ciphers: NOPE", "ciphers", "no cipher of"),
        (f"crt: {certs['a']}, alpn: ''", "alpn", "expected protocol names"),
        (f"cert: {certs['a']}", "cert", "unknown key (did you mean crt?)"),
    ]
    (tmp_path / "empty").mkdir()
    cfg = tmp_path / "lb.cfg"
    for settings, key, why in cases:
        done = _check(cfg, f"ssl: true, {settings}")
        assert done.returncode != 0, settings
        assert f"{cfg}:4: frontends.www.bind.{key}: " in done.stderr and why in done.stderr, \
            (settings, done.stderr)
    # without ssl: true, TLS keys are refused
    done = _check(cfg, f"crt: {certs['a']}")
    assert "frontends.www.bind.crt: needs ssl: true" in done.stderr, done.stderr
    # an expired certificate: a warning, and the configuration is valid
    expired = tmp_path / "expired.pem"
    ca.issue_cert("old.test", not_before=_ago(days=30), not_after=_ago(days=1)) \
        .private_key_and_cert_chain_pem.write_to_path(str(expired))
    done = _check(cfg, f"ssl: true, crt: {expired}")
    assert done.returncode == 0, done.stderr
    assert f"{cfg}:4: frontends.www.bind.crt: certificate {expired} expired on" in \
        done.stdout + done.stderr


def _check(cfg: Path, bind: str) -> subprocess.CompletedProcess[str]:
    """`pylb -c` on a configuration whose bind (at line 4) has these settings."""
    cfg.write_text(
        "frontends:\n  www:\n    bind:\n"
        f"      - {{address: 127.0.0.1:{free_port()}, {bind}}}\n"
        "    default_backend: app\n"
        "backends:\n  app:\n    servers:\n      s1: {address: 127.0.0.1:9}\n")
    return subprocess.run([*_pylb(), "-c", "-f", str(cfg)], capture_output=True, text=True,
                          timeout=30)


def weak_pem() -> bytes:
    """A self-signed RSA-1024 certificate and key: valid PEM that OpenSSL 3 refuses to
    serve (its default security level wants 2048 bits)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def _ago(days: int) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=days)


def _pylb() -> list[str]:
    return [sys.executable, str(REPO / "bin" / "pylb")]


# -- bad input on the TLS port -------------------------------------------------------------------


def test_bad_input_on_the_tls_port_is_cut_and_harms_nothing(pylb, backends, certs):
    echo = backends.echo("s1")
    plain, port = free_port(), free_port()
    cfg = tls_config(echo, plain, port, certs["dir"])
    cfg["defaults"]["timeout"]["client"] = "1s"
    lb, _ = start(pylb, cfg)
    # a plain HTTP request on the TLS port: closed, nothing more
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert _read_all(sock) in (b"",) or not _read_all(sock).startswith(b"HTTP/1.1 200")
    # a ClientHello cut short, then silence: cut by timeout client
    hello = _client_hello()
    for cut in (hello[:5], hello[: len(hello) // 2]):
        with socket.create_connection((HOST, port), timeout=10) as sock:
            sock.sendall(cut)
            began = time.monotonic()
            assert _read_all(sock) == b""
            assert 0.5 < time.monotonic() - began < 5
    # a client that connects and never says anything: cut by timeout client too
    with socket.create_connection((HOST, port), timeout=10) as sock:
        began = time.monotonic()
        assert _read_all(sock) == b""
        assert 0.5 < time.monotonic() - began < 5
    # pylb is unharmed: both binds serve, no worker was replaced
    workers = {p.pid for p in lb.workers()}
    with TlsConn(port, "a.test", client_context(certs["ca"])) as conn:
        assert conn.request("GET", "/").status == 200
    assert {p.pid for p in lb.workers()} == workers
    assert "Traceback" not in lb.output()


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    try:
        while data := sock.recv(65536):
            out += data
    except (ConnectionResetError, TimeoutError):
        pass
    return out


def _client_hello() -> bytes:
    """The first flight of a real client (Python's ssl over memory BIOs)."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="a.test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# -- load ------------------------------------------------------------------------------------------


def test_https_load_through_eight_reloads_loses_nothing(pylb, backends, certs):
    """wrk over https, keep-alive, through 8 reloads by every method: 0 errors. TLS
    connections cannot move to the new generation: the old one answers their next
    request with `Connection: close`, and wrk opens a new one on the new generation."""
    wrk = shutil.which("wrk")
    assert wrk, "wrk is needed (make test installs it)"
    echo = backends.echo("s1")
    plain, port = free_port(), free_port()
    lb, reload = start(pylb, tls_config(echo, plain, port, certs["dir"]))
    load = subprocess.Popen(
        [wrk, "-t1", "-c8", "-d60s", "--timeout", "10s", f"https://{HOST}:{port}/"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_until(lambda: _tls_connections(lb) >= 8, 10)
        for index in range(8):
            before = len(echo.requests)
            reload(METHODS[index % 3])
            # requests flow on the new generation before the next reload
            assert wait_until(lambda b=before: len(echo.requests) >= b + 200, 10)
            assert wait_until(lambda: _tls_connections(lb) >= 4, 10)
    finally:
        load.send_signal(signal.SIGINT)
        out, _ = load.communicate(timeout=30)
    requests = re.search(r"(\d+) requests in", out)
    assert requests and int(requests.group(1)) > 0, out
    assert "Socket errors" not in out and "Non-2xx" not in out, out
    assert reload.count == 8


def _tls_connections(lb: Any) -> int:
    """Client connections open on the current workers (`show proc`'s column)."""
    total = 0
    section = ""
    for line in cli(lb, "show proc").splitlines():
        if line.startswith("# "):
            section = line
        elif section == "# workers" and line.strip():
            total += int(line.split()[-1])
    return total



def test_ticket_keys_rotate_and_older_tickets_resume_for_two_periods(pylb, backends, certs,
                                                                     tmp_path):
    echo = backends.echo("s1")
    plain, port = free_port(), free_port()
    cfg = tls_config(echo, plain, port, certs["dir"])
    cfg["global"]["tls-ticket-rotate"] = "2s"
    lb, _ = start(pylb, cfg)
    mark = len(lb.lines)
    session = saved_session(port, tmp_path / "session.pem", certs["ca"])
    rotated = r"TLS session ticket keys rotated"
    for _ in range(2):  # its key is a previous one now: still accepted
        mark = lb.lines.index(lb.wait_log(rotated, 10, start=mark).string) + 1
        assert resumed(port, session) == "Reused"
    mark = lb.lines.index(lb.wait_log(rotated, 10, start=mark).string) + 1
    assert resumed(port, session) == "New"  # three rotations later, its key is gone


def test_a_respawned_worker_has_the_keys_and_the_committed_certificate(pylb, backends, certs,
                                                                       ca, tmp_path):
    echo = backends.echo("s1")
    plain, port = free_port(), free_port()
    lb, _ = start(pylb, tls_config(echo, plain, port, certs["dir"]))
    session = saved_session(port, tmp_path / "session.pem", certs["ca"])
    new = write_cert(ca, tmp_path / "new-b.pem", "b.test")
    set_cert(lb, certs["b"], new.read_bytes())
    assert cli(lb, f"commit ssl cert {certs['b']}").endswith("Success!\n\n")
    old = {p.pid for p in lb.workers()}
    mark = len(lb.lines)
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    accepting = re.compile(r"accepts, \d+ ms after its start")
    assert wait_until(lambda: sum(bool(accepting.search(line)) for line in lb.lines[mark:]) == 2,
                      15), lb.output()
    assert wait_until(lambda: len({p.pid for p in lb.workers()} - old) == 2, 10)
    assert [resumed(port, session) for _ in range(6)] == ["Reused"] * 6
    assert {serial_of(port, "b.test", certs["ca"]) for _ in range(10)} == {file_serial(new)}


def test_client_certificates_are_required_when_verify_says_so(pylb, backends, certs, ca,
                                                              tmp_path):
    echo = backends.echo("s1")
    plain, port = free_port(), free_port()
    start(pylb, tls_config(echo, plain, port, certs["dir"], verify="required",
                           **{"ca-file": str(certs["ca"])}))
    anonymous = client_context(certs["ca"])
    with pytest.raises(REFUSED):
        with TlsConn(port, "a.test", anonymous) as conn:  # TLS 1.3: refused at first read
            conn.request("GET", "/")
    known = client_context(certs["ca"])
    ca.issue_cert("client.test").configure_cert(known)
    with TlsConn(port, "a.test", known) as conn:
        assert conn.request("GET", "/").status == 200
    stranger = client_context(certs["ca"])
    trustme.CA().issue_cert("client.test").configure_cert(stranger)
    with pytest.raises(REFUSED):
        with TlsConn(port, "a.test", stranger) as conn:
            conn.request("GET", "/")


def test_a_tls_connection_finishes_on_the_old_generation_and_resumes_on_the_new(
        pylb, backends, certs):
    """At a reload a TLS connection stays where its TLS state is: idle, it waits there for
    its next request, which is answered with `Connection: close`; the client's next
    connection goes to the new generation and resumes its session."""
    echo = backends.echo("s1")
    plain, port = free_port(), free_port()
    lb, reload = start(pylb, tls_config(echo, plain, port, certs["dir"]))
    ctx = client_context(certs["ca"])
    conn = TlsConn(port, "a.test", ctx)
    first = conn.request("GET", "/one")
    assert first.status == 200 and first.header("connection") != "close"
    old = {p.pid for p in lb.workers()}
    reload("SIGUSR2")
    proc = cli(lb, "show proc")
    assert "TLS connection" in proc, proc
    second = conn.request("GET", "/two")  # served by the old worker, which says goodbye
    assert second.status == 200 and second.header("connection") == "close"
    assert conn.sock.recv(1) == b""  # type: ignore[attr-defined]
    session = conn.sock.session  # type: ignore[attr-defined]
    conn.close()
    assert wait_until(lambda: not (old & {p.pid for p in lb.workers()}), 10), "old stayed"
    with TlsConn(port, "a.test", ctx, session=session) as again:
        assert again.request("GET", "/three").status == 200
        assert again.sock.session_reused  # type: ignore[attr-defined]


def test_a_tls_connection_held_over_maxconn_is_served_by_the_old_generation(
        pylb, backends, certs):
    """Held at the frontend's maxconn when a reload comes, a TLS connection cannot move:
    the stopping worker lets it in and answers it (a plain one is handed over)."""
    echo = backends.echo("s1")
    plain, port = free_port(), free_port()
    cfg = tls_config(echo, plain, port, certs["dir"])
    cfg["frontends"]["www"]["maxconn"] = 1
    lb, reload = start(pylb, cfg)
    ctx = client_context(certs["ca"])
    first = TlsConn(port, "a.test", ctx)
    assert first.request("GET", "/first").status == 200
    held = TlsConn(port, "a.test", ctx)  # its handshake is done; then it waits, unread
    held.send(b"GET /held HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert not wait_until(lambda: any(r["target"] == "/held" for r in echo.requests), 0.3)
    reload("socket")
    response = held.read_response()
    assert response.status == 200 and response.header("connection") == "close"
    first.close()
    held.close()
