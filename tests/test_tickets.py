"""lb.tls.tickets: TLS sessions resume across SSLContexts, processes and interpreters that
share ticket keys, with real handshakes (ssl.MemoryBIO pairs, or loopback sockets to a
server subprocess)."""

from __future__ import annotations

import gc
import hmac
import os
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import trustme

from lb.tls import tickets
from lb.tls.tickets import KEY_SIZE, TicketKeys, TicketKeysUnavailable, new_key

MODULE = Path(tickets.__file__).resolve()
HOST = "a.test"
VERSIONS = [pytest.param(ssl.TLSVersion.TLSv1_3, id="tls1.3"),
            pytest.param(ssl.TLSVersion.TLSv1_2, id="tls1.2")]
INTERPRETERS = [
    pytest.param(sys.executable, id="venv"),
    pytest.param("/root/.pyenv/versions/3.12.1/bin/python3", id="3.12"),
    pytest.param("/root/.pyenv/versions/3.13.0/bin/python3", id="3.13"),
]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert(HOST)


def server_ctx(cert: trustme.LeafCert, keys: TicketKeys | None = None) -> ssl.SSLContext:
    """A server context of its own, as another worker or generation would make it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    if keys is not None:
        keys.install(ctx)
    return ctx


def client_ctx(ca: trustme.CA, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    ctx.maximum_version = version
    return ctx


def handshake(server: ssl.SSLContext, client: ssl.SSLContext,
              session: ssl.SSLSession | None = None,
              wire: list[bytes] | None = None) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A full TLS exchange between two SSLObjects in memory: handshake, then one byte from
    the server so the client has read the tickets (TLS 1.3 sends them after the handshake).
    What the server sends is appended to ``wire``."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=HOST, session=session)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c_done = s_done = False
    for _ in range(20):
        if not c_done:
            try:
                c.do_handshake()
                c_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not s_done:
            try:
                s.do_handshake()
                s_done = True
            except ssl.SSLWantReadError:
                pass
        data = s_out.read()
        c_in.write(data)
        if wire is not None:
            wire.append(data)
        if c_done and s_done:
            break
    assert c_done and s_done, "handshake did not finish"
    s.write(b"x")
    c_in.write(s_out.read())
    assert c.read(1) == b"x"
    return c, s


def resumes(server: ssl.SSLContext, client: ssl.SSLContext, session: ssl.SSLSession,
            expect_version: ssl.TLSVersion | None = None) -> tuple[bool, ssl.SSLSession]:
    """Whether ``session`` resumes on ``server`` (both ends agree), and the client's session
    after that handshake."""
    c, s = handshake(server, client, session)
    assert c.session_reused == s.session_reused
    if expect_version is not None:
        assert c.version() == {ssl.TLSVersion.TLSv1_3: "TLSv1.3",
                               ssl.TLSVersion.TLSv1_2: "TLSv1.2"}[expect_version]
    assert c.session is not None
    return c.session_reused, c.session


def first_session(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLSession:
    c, _ = handshake(server, client)
    assert not c.session_reused
    assert c.session is not None and c.session.has_ticket
    return c.session


def test_available_here() -> None:
    assert tickets.unavailable() == ""


def test_new_key() -> None:
    a, b = new_key(), new_key()
    assert len(a) == KEY_SIZE == 80 and isinstance(a, bytes) and a != b


@pytest.mark.parametrize("version", VERSIONS)
def test_resumes_across_separate_contexts(ca: trustme.CA, cert: trustme.LeafCert,
                                          version: ssl.TLSVersion) -> None:
    client = client_ctx(ca, version)
    shared = TicketKeys([new_key(), new_key()])
    a = server_ctx(cert, shared)
    b = server_ctx(cert, shared)  # the same object on another context
    c = server_ctx(cert, TicketKeys(shared.keys))  # the same keys in "another process"
    session = first_session(a, client)
    assert resumes(b, client, session, version)[0]
    assert resumes(c, client, session, version)[0]
    assert resumes(a, client, resumes(c, client, session)[1])[0]


@pytest.mark.parametrize("version", VERSIONS)
def test_no_resumption_without_the_keys(ca: trustme.CA, cert: trustme.LeafCert,
                                        version: ssl.TLSVersion) -> None:
    client = client_ctx(ca, version)
    session = first_session(server_ctx(cert, TicketKeys([new_key()])), client)
    assert not resumes(server_ctx(cert), client, session, version)[0]
    assert not resumes(server_ctx(cert, TicketKeys([new_key()])), client, session)[0]
    # no keys at all: no ticket issued nor accepted, the handshakes still succeed
    empty = server_ctx(cert, TicketKeys())
    assert not resumes(empty, client, session)[0]
    c, _ = handshake(empty, client)
    assert c.session is not None and not c.session.has_ticket


@pytest.mark.parametrize("version", VERSIONS)
def test_rotation(ca: trustme.CA, cert: trustme.LeafCert, version: ssl.TLSVersion) -> None:
    client = client_ctx(ca, version)
    k1, k2 = new_key(), new_key()
    keys = TicketKeys([k1])
    a, b = server_ctx(cert, keys), server_ctx(cert, keys)
    old = first_session(a, client)
    keys.set([k2, k1])  # after install: on both contexts
    assert keys.keys == (k2, k1)
    reused, renewed = resumes(b, client, old, version)
    assert reused  # K1 still decrypts, and the ticket is renewed under K2 (callback said 2)
    keys.set([k2])
    assert not resumes(a, client, old)[0]  # K1 is gone: full handshake, no error
    assert resumes(a, client, renewed)[0]  # the renewed ticket is under K2
    keys.set([k1, k2])
    assert resumes(b, client, old)[0]


def test_sni_switch_to_a_context_with_another_certificate(ca: trustme.CA,
                                                           cert: trustme.LeafCert) -> None:
    """The sni_callback moves the connection to a context loaded with another certificate:
    the ticket is still decrypted, with the keys of the context the connection was wrapped
    with (OpenSSL uses the SSL's session_ctx)."""
    client = client_ctx(ca, ssl.TLSVersion.TLSv1_3)
    keys = TicketKeys([new_key()])
    session = first_session(server_ctx(cert, keys), client)
    other, reissued = ca.issue_cert("other.test"), ca.issue_cert(HOST)
    for on_target in (True, False):
        default = server_ctx(other, TicketKeys(keys.keys))
        target = server_ctx(reissued, TicketKeys(keys.keys) if on_target else None)

        def switch(obj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext,
                   target: ssl.SSLContext = target) -> None:
            assert name == HOST
            obj.context = target

        default.sni_callback = switch
        c, s = handshake(default, client, session)
        assert s.context is target and c.session_reused and s.session_reused


def test_ticket_layout_is_haproxys(ca: trustme.CA, cert: trustme.LeafCert) -> None:
    """A TLS 1.2 ticket (NewSessionTicket is sent before ChangeCipherSpec: in clear) is
    name[16] iv[16] AES-256-CBC(key[16:48]) HMAC-SHA256(key[48:80]) over the rest: the
    layout of HAProxy's tls-ticket-keys entries, so both can share a key file."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = new_key()
    wire: list[bytes] = []
    handshake(server_ctx(cert, TicketKeys([key])), client_ctx(ca, ssl.TLSVersion.TLSv1_2),
              wire=wire)
    data, clear, pos = b"".join(wire), b"", 0
    while data[pos] != 20:  # the handshake records before ChangeCipherSpec
        assert data[pos] == 22
        size = int.from_bytes(data[pos + 3:pos + 5], "big")
        clear += data[pos + 5:pos + 5 + size]
        pos += 5 + size
    messages: dict[int, bytes] = {}
    while clear:
        size = int.from_bytes(clear[1:4], "big")
        messages[clear[0]] = clear[4:4 + size]
        clear = clear[4 + size:]
    body = messages[4]  # NewSessionTicket: lifetime hint (4), ticket length (2), ticket
    ticket = body[6:6 + int.from_bytes(body[4:6], "big")]
    name, iv, encrypted, mac = ticket[:16], ticket[16:32], ticket[32:-32], ticket[-32:]
    assert name == key[:16]
    assert hmac.digest(key[48:80], ticket[:-32], "sha256") == mac
    decryptor = Cipher(algorithms.AES(key[16:48]), modes.CBC(iv)).decryptor()
    session = decryptor.update(encrypted) + decryptor.finalize()
    assert session[0] == 0x30  # an SSL_SESSION in DER (then the CBC padding)


def test_set_checks_its_input() -> None:
    keys = TicketKeys()
    assert keys.keys == ()
    for bad in (b"", new_key()[:79], new_key() + b"x"):
        with pytest.raises(ValueError):
            keys.set([new_key(), bad])
        with pytest.raises(ValueError):
            TicketKeys([bad])
    with pytest.raises(TypeError):
        keys.set(new_key())  # one key, not a sequence of keys
    with pytest.raises(TypeError):
        keys.set(["00" * 80])  # type: ignore[list-item]
    assert keys.keys == ()  # nothing half-applied
    k = new_key()
    keys.set([bytearray(k)])
    assert keys.keys == (k,) and isinstance(keys.keys[0], bytes)


def test_install_on_something_else() -> None:
    keys = TicketKeys([new_key()])
    for bad in (object(), None, ssl.create_default_context().wrap_bio(
            ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=HOST)):
        with pytest.raises((TypeError, TicketKeysUnavailable)):
            keys.install(bad)  # type: ignore[arg-type]


def test_a_pointer_that_fails_the_check_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                   cert: trustme.LeafCert) -> None:
    lib = tickets._lib()
    real = lib.get_options
    monkeypatch.setattr(lib, "get_options", lambda ptr: real(ptr) ^ 1)  # not what Python sees
    with pytest.raises(TicketKeysUnavailable, match="pointer check"):
        server_ctx(cert, TicketKeys([new_key()]))
    monkeypatch.setattr(lib, "get_options", lambda ptr: real(ptr) & ~0x10)  # ignores the flip
    with pytest.raises(TicketKeysUnavailable, match="pointer check"):
        server_ctx(cert, TicketKeys([new_key()]))


def test_installed_contexts_keep_the_callback_alive(ca: trustme.CA,
                                                    cert: trustme.LeafCert) -> None:
    client = client_ctx(ca, ssl.TLSVersion.TLSv1_3)
    key = new_key()
    a = server_ctx(cert, TicketKeys([key]))
    b = server_ctx(cert, TicketKeys([key]))
    gc.collect()
    assert resumes(b, client, first_session(a, client))[0]


def test_forked_child_needs_nothing(ca: trustme.CA, cert: trustme.LeafCert) -> None:
    """A worker forked after install() resumes sessions with the inherited contexts and
    keys, and its set() changes only its own keys."""
    k1, k2 = new_key(), new_key()
    keys = TicketKeys([k1])
    ctx = server_ctx(cert, keys)
    client = client_ctx(ca, ssl.TLSVersion.TLSv1_3)
    session = first_session(ctx, client)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ok = resumes(ctx, client, session)[0]
            keys.set([k2])
            code = 0 if ok and not resumes(ctx, client, session)[0] else 2
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
    assert keys.keys == (k1,) and resumes(ctx, client, session)[0]


def test_handshakes_in_threads_while_keys_rotate(ca: trustme.CA,
                                                 cert: trustme.LeafCert) -> None:
    """The callback runs in each handshaking thread (Python released the GIL around
    SSL_do_handshake) while set() swaps the keys from another thread."""
    k1 = new_key()
    keys = TicketKeys([k1])
    contexts = [server_ctx(cert, keys) for _ in range(4)]
    client = client_ctx(ca, ssl.TLSVersion.TLSv1_3)
    session = first_session(contexts[0], client)
    results: list[bool] = []
    errors: list[BaseException] = []

    def run(ctx: ssl.SSLContext) -> None:
        try:
            for _ in range(25):
                results.append(resumes(ctx, client, session)[0])
        except BaseException as e:  # noqa: B036 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(ctx,)) for ctx in contexts]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        keys.set([new_key(), k1])  # k1 always decrypts
        keys.set([k1])
    for t in threads:
        t.join()
    assert not errors and len(results) == 100 and all(results)


SERVER = textwrap.dedent("""
    import importlib.util, os, socket, ssl, sys
    spec = importlib.util.spec_from_file_location("tickets", sys.argv[1])
    tickets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tickets)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[2])
    keys = [bytes.fromhex(k) for k in os.environ["TICKET_KEYS"].split(",")]
    tickets.TicketKeys(keys).install(ctx)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    print("READY", listener.getsockname()[1], sys.version.split()[0], ssl.OPENSSL_VERSION,
          flush=True)
    for _ in range(int(sys.argv[3])):
        sock, _addr = listener.accept()
        with sock, ctx.wrap_socket(sock, server_side=True) as conn:
            conn.sendall(b"reused=%d\\n" % conn.session_reused)
""")


def read_line(conn: ssl.SSLSocket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(100)
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


def exchange(port: int, client: ssl.SSLContext,
             session: ssl.SSLSession | None) -> ssl.SSLSession:
    """Connect to the server subprocess: it resumes ``session`` if there is one (both ends
    agree), else makes a new one; the client's session after that."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
            client.wrap_socket(sock, server_hostname=HOST, session=session) as conn:
        expected = session is not None
        assert read_line(conn) == b"reused=%d\n" % expected
        assert conn.session_reused == expected
        assert conn.session is not None and conn.session.has_ticket
        return conn.session


@pytest.mark.parametrize("python", INTERPRETERS)
def test_resumes_in_another_process(ca: trustme.CA, cert: trustme.LeafCert, tmp_path: Path,
                                    python: str) -> None:
    """A session from this process resumes on a server in a subprocess (possibly another
    Python version) given the same keys, and the reverse."""
    if not os.path.exists(python):
        pytest.skip(f"{python} is not installed")
    pem = tmp_path / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    keys = TicketKeys([new_key(), new_key()])
    versions: Sequence[ssl.TLSVersion] = (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2)
    env = dict(os.environ, TICKET_KEYS=",".join(k.hex() for k in keys.keys))
    with subprocess.Popen([python, "-c", SERVER, str(MODULE), str(pem), str(2 * len(versions))],
                          env=env, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            ready = proc.stdout.readline().split()
            assert ready[:1] == ["READY"], ready
            port = int(ready[1])
            print("server:", python, "Python", ready[2], " ".join(ready[3:]))
            here = server_ctx(cert, keys)
            for version in versions:
                client = client_ctx(ca, version)
                theirs = exchange(port, client, None)  # a ticket the child made
                assert resumes(here, client, theirs, version)[0]
                exchange(port, client, first_session(here, client))
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
