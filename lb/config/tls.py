"""A bind written as a mapping: its address and, with ``ssl: true``, its TLS settings.

Certificate files (and the CA file for client certificates) are read and checked here,
when the configuration loads: `pylb -c` finds a missing file or a key that does not match
its certificate, and a reload with a bad file is refused while the old one serves on.
"""

from __future__ import annotations

import datetime
import re
import ssl

from lb.log import log
from lb.tls import certs

from .fields import Field, Schema, read_section
from .model import Address, TlsBind
from .values import bind_address, boolean, choice, path, scalar
from .yamltree import Value

_ALPN_RE = re.compile(r"[\x21-\x7e]{1,255}")


def _alpn(x: str | None) -> tuple[str, ...]:
    names = tuple(n.strip() for n in (x or "").split(",") if n.strip())
    if not names or not all(_ALPN_RE.fullmatch(n) for n in names):
        raise ValueError(f"expected protocol names like h2,http/1.1, got {x!r}")
    return names


def alpn(v: Value) -> tuple[str, ...]:
    """``alpn``: a list, or HAProxy's comma-separated string."""
    if v.is_scalar:
        return scalar("protocol names", _alpn, text=True)(v)
    return tuple(name for item in v.elements() for name in alpn(item))


def _ciphers(x: str | None) -> str:
    if not x:
        raise ValueError("expected an OpenSSL cipher list")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(x)
    except ssl.SSLError:
        raise ValueError(f"no cipher of {x!r} is known to this OpenSSL") from None
    return x


def _suites(x: str | None) -> str:
    known = {c["name"] for c in ssl.create_default_context().get_ciphers()
             if c["protocol"] == "TLSv1.3"}
    names = [n for n in (x or "").split(":") if n]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise ValueError(f"unknown TLS 1.3 cipher suite {unknown[0] if unknown else x!r} "
                         f"(known: {', '.join(sorted(known))})")
    return x  # type: ignore[return-value]


BIND: Schema = {
    "address": Field(bind_address, required=True),
    "ssl": Field(boolean, False),
    "crt": Field(path),
    "alpn": Field(alpn),  # None: http/1.1 in mode http, none in mode tcp
    "ssl-min-ver": Field(choice("TLSv1.2", "TLSv1.3"), "TLSv1.2"),
    "ciphers": Field(scalar("an OpenSSL cipher list", _ciphers, text=True)),
    "ciphersuites": Field(scalar("TLS 1.3 cipher suites", _suites, text=True)),
    "ca-file": Field(path),
    "verify": Field(choice("none", "optional", "required"), "none"),
    "strict-sni": Field(boolean, False),
}


def bind(v: Value) -> tuple[Address, int, TlsBind | None]:
    """One item of ``bind``: ``HOST:PORT``, or a mapping with TLS settings."""
    if v.is_scalar:
        return bind_address(v), v.line, None
    section = read_section(v, BIND)
    get = {key: given.value for key, given in section.items()}
    address = get["address"]
    if not get.get("ssl"):
        for key in BIND:
            if key not in ("address", "ssl") and key in section:
                raise section[key].at.error("needs ssl: true", line=section[key].at.key_line)
        return address, v.line, None
    if "crt" not in section:
        raise v.error("ssl: true needs crt (a PEM file or a directory of them)", line=v.line)
    crt = section["crt"].at
    files = certs.read_files(get["crt"])
    if not files:
        raise crt.error(f"no certificate file in directory {get['crt']}")
    loaded = []
    for name in files:
        try:
            loaded.append(certs.load(name))
        except certs.CertificateError as err:
            raise crt.error(str(err)) from None
    now = datetime.datetime.now(datetime.UTC)
    for cert in loaded:
        if cert.expired(now):
            log.warning("%s", crt.error(f"certificate {cert.path} expired on "
                                        f"{cert.not_after:%Y-%m-%d %H:%M} UTC"))
    ca = None
    if "ca-file" in section:
        ca = _read_ca(section["ca-file"].at, get["ca-file"])
    verify = get.get("verify", "none")
    if verify != "none" and ca is None:
        at = section["verify"].at
        raise at.error(f"verify {verify} needs ca-file (the CAs client certificates chain to)")
    return address, v.line, TlsBind(
        address=address,
        certificates=tuple(loaded),
        alpn=get.get("alpn"),  # None: the loader sets the mode's default
        min_version=get.get("ssl-min-ver", "TLSv1.2"),
        ciphers=get.get("ciphers"),
        ciphersuites=get.get("ciphersuites"),
        ca=ca,
        verify=verify,
        strict_sni=get.get("strict-sni", False),
        line=v.line,
    )


def _read_ca(at: Value, file: str) -> bytes:
    try:
        with open(file, "rb") as f:
            data = f.read()
    except OSError as err:
        raise at.error(f"cannot read {file}: {err.strerror or err}") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(
            cadata=data.decode("ascii", "replace")
        )
    except (ssl.SSLError, ValueError):
        raise at.error(f"{file}: no PEM certificate found") from None
    return data
