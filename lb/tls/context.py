"""The server side of TLS in a worker: one SSL context per certificate, chosen by SNI.

A TLS bind listens with one context (`front`), whose SNI callback switches each handshake
to the context of the certificate that names the server the client asked for (exact names
first, then wildcards), or to the bind's first certificate. Contexts are built from PEM
bytes the master sent (through a memfd: Python's ssl module loads chains from paths only),
so a certificate an operator commits at run time (`commit ssl cert`) replaces one context:
new handshakes use it, established connections keep the one they started with.

Every context shares the worker's session ticket keys (lb.tls.tickets), which the master
gives to all workers of all generations: a session resumes on any of them.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

from lb.config.model import TlsBind
from lb.log import log
from lb.tls import SNI_ATTRIBUTE, certs, tickets
from lb.tls.certs import Certificate
from lb.tls.tickets import TicketKeys, TicketKeysUnavailable

VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def build(bind: TlsBind, cert: Certificate) -> ssl.SSLContext:
    """A server context for one certificate, with the bind's settings."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[bind.min_version]
    if bind.ciphers:
        ctx.set_ciphers(bind.ciphers)
    if bind.ciphersuites:
        try:
            tickets.set_ciphersuites(ctx, bind.ciphersuites)
        except tickets.TicketKeysUnavailable as err:
            log.warning("ciphersuites %s not applied: %s", bind.ciphersuites, err)
    if bind.alpn:
        ctx.set_alpn_protocols(list(bind.alpn))
    if bind.ca is not None:
        ctx.load_verify_locations(cadata=bind.ca.decode("ascii", "replace"))
    ctx.verify_mode = VERIFY[bind.verify]
    certs.load_chain(ctx, cert.pem)
    return ctx


class BindContexts:
    """The contexts of one TLS bind in a worker."""

    def __init__(
        self, bind: TlsBind, overrides: Mapping[str, Certificate], keys: TicketKeys | None
    ) -> None:
        self.bind = bind
        self.keys = keys
        self.certs: dict[str, Certificate] = {}
        self.contexts: dict[str, ssl.SSLContext] = {}
        for cert in bind.certificates:
            self._add(overrides.get(cert.path, cert))
        self.default = bind.certificates[0].path
        self._index()
        self.front = self.contexts[self.default]
        self.front.sni_callback = self._choose

    @property
    def paths(self) -> list[str]:
        return list(self.contexts)

    def _add(self, cert: Certificate) -> None:
        ctx = build(self.bind, cert)
        if self.keys is not None:
            try:
                self.keys.install(ctx)
            except TicketKeysUnavailable as err:
                log.warning("TLS session tickets stay per worker: %s", err)
                self.keys = None
        self.certs[cert.path] = cert
        self.contexts[cert.path] = ctx

    def _index(self) -> None:
        """Names -> certificate: the first certificate of the bind naming it wins."""
        self.exact: dict[str, str] = {}
        self.wildcards: dict[str, str] = {}
        for path, cert in self.certs.items():
            for name in cert.names:
                if name.startswith("*."):
                    self.wildcards.setdefault(name[2:], path)
                else:
                    self.exact.setdefault(name, path)

    def replace(self, cert: Certificate) -> bool:
        """Serve `cert` (committed at run time) for new handshakes; False if this bind
        does not use its file."""
        if cert.path not in self.certs:
            return False
        self._add(cert)  # the listener's own context stays: it only picks the others
        self._index()
        return True

    def context_for(self, server_name: str | None) -> ssl.SSLContext | None:
        """The context for a server name; None when strict SNI refuses it."""
        if server_name:
            name = server_name.lower().rstrip(".")
            path = self.exact.get(name)
            if path is None:
                path = self.wildcards.get(name.partition(".")[2])
            if path is not None:
                return self.contexts[path]
        if self.bind.strict_sni:
            return None
        return self.contexts[self.default]

    def _choose(self, sslobj: Any, server_name: str | None, _ctx: ssl.SSLContext) -> Any:
        ctx = self.context_for(server_name)
        if ctx is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        sslobj.context = ctx
        setattr(sslobj, SNI_ATTRIBUTE, server_name)  # for ssl_fc_sni and the log (sni_of)
        return None
