"""The client side of TLS: the contexts of pylb's connections to servers with `ssl: true`.

Workers use them for requests and tcp-mode connections (lb.backend.Server.tls), the master
for health checks (lb.check). The CAs come from the configuration as PEM bytes the master
read (`ca-file`), or are the system's (`@system-ca`, the default).

The name checked in the server's certificate is `verifyhost`, else `sni`, else none (the
chain alone), as in HAProxy. The name sent in the handshake is `sni`, else `verifyhost`,
else the server's host (OpenSSL sends none for an IP address). When the two differ (both
`sni` and `verifyhost` are set), OpenSSL cannot check a name other than the one it sends,
so the check runs right after the handshake, in the handshake's own call: a mismatch is a
failed handshake wherever the context is used (asyncio, uvloop, a check).
"""

from __future__ import annotations

import ssl
from typing import Any

from lb import config
from lb.tls import certs

ALPN_HTTP = ("http/1.1",)  # pylb speaks HTTP/1.1 to servers

# build()'s arguments: verify, CA PEM, check a name, verifyhost to check after, ALPN
Recipe = tuple[str, bytes | None, bool, str | None, tuple[str, ...]]

# Contexts by recipe: servers configured alike share one (the system's CAs are parsed
# once, not once per server). A worker serves one configuration, so keeps them for life.
_contexts: dict[Recipe, ssl.SSLContext] = {}


def server_hostname(server: config.Server) -> str:
    """What to pass as asyncio's `server_hostname`: the name sent (and, when it is also the
    one to check, checked by OpenSSL)."""
    return server.sni or server.verifyhost or server.address.host


def checked_name(server: config.Server) -> str | None:
    """The name the certificate must have, None for the chain alone (or verify none)."""
    if server.verify == "none":
        return None
    return server.verifyhost or server.sni


def recipe(server: config.Server, mode: str) -> Recipe | None:
    """What the context of `server` is made of (None without `ssl: true`): the arguments
    of build(). `mode` is its backend's: http offers ALPN http/1.1."""
    if not server.ssl:
        return None
    name = checked_name(server)
    sent = server_hostname(server)
    # OpenSSL checks the name it sends; another name is checked after the handshake
    after = name if name is not None and name.lower() != sent.lower() else None
    return (server.verify, server.ca, name is not None, after,
            ALPN_HTTP if mode == "http" else ())


def context(server: config.Server, mode: str) -> ssl.SSLContext | None:
    """The client context for connections to `server` (None without `ssl: true`), shared
    in this process with the servers configured alike. (The master's checks build theirs
    off the loop's thread, with build(): see lb.check.)"""
    key = recipe(server, mode)
    if key is None:
        return None
    ctx = _contexts.get(key)
    if ctx is None:
        ctx = _contexts[key] = build(*key)
    return ctx


def build(
    verify: str, ca: bytes | None, check_name: bool, verifyhost: str | None,
    alpn: tuple[str, ...],
) -> ssl.SSLContext:
    """A client context: TLS 1.2 at least; with verify required, the chain must lead to
    `ca` (PEM; None: the system's CAs), and the name is checked when there is one
    (`verifyhost`: checked after the handshake, see the module's docstring)."""
    ctx: ssl.SSLContext = _VerifyHostContext(verifyhost) if verifyhost else \
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify == "none":
        ctx.check_hostname = False  # before verify_mode: CERT_NONE refuses a name check
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.check_hostname = check_name and verifyhost is None
        ctx.verify_mode = ssl.CERT_REQUIRED
        if ca is None:
            ctx.load_default_certs()
        else:
            ctx.load_verify_locations(cadata=ca.decode("ascii"))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


class _VerifyHostObject(ssl.SSLObject):
    """Checks the context's `verifyhost` once the handshake completed (and the chain
    verified): a mismatch raises from do_handshake, so the handshake fails."""

    def do_handshake(self) -> None:
        super().do_handshake()
        expected = self.context.verifyhost  # type: ignore[attr-defined]
        cert = self.getpeercert()
        if not cert or not matches(cert, expected):
            error = ssl.SSLCertVerificationError(
                1, f"certificate verify failed: Hostname mismatch, certificate is not valid"
                   f" for '{expected}'."
            )
            error.reason = "CERTIFICATE_VERIFY_FAILED"
            error.verify_code = 62  # X509_V_ERR_HOSTNAME_MISMATCH, as OpenSSL says it
            error.verify_message = "Hostname mismatch"
            raise error


class _VerifyHostContext(ssl.SSLContext):
    """A client context whose connections check `verifyhost`, not the name they send."""

    sslobject_class = _VerifyHostObject
    verifyhost: str

    def __new__(cls, verifyhost: str) -> _VerifyHostContext:
        ctx = super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)
        ctx.verifyhost = verifyhost
        return ctx


def matches(cert: dict[str, Any], name: str) -> bool:
    """Does a verified certificate (getpeercert()) name host `name`? Its DNS names, or
    its common names when it has none, as OpenSSL checks; a `*` only as a whole leftmost
    label, standing for one label."""
    name = name.rstrip(".").lower()
    patterns = [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    if not patterns:
        patterns = [
            value for rdn in cert.get("subject", ()) for kind, value in rdn
            if kind == "commonName"
        ]
    return any(
        certs.matches(pattern, name)
        for pattern in (p.rstrip(".").lower() for p in patterns)
        # a wildcard covers a name under a domain of two labels at least, never `*.com`
        if not pattern.startswith("*.") or ("." in pattern[2:] and "*" not in pattern[2:])
    )
