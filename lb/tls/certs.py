"""Certificates as pylb reads them: PEM files holding a chain and its private key.

The master reads every file (the configuration's, and those an operator sends with `set ssl
cert`) and checks it here once: it parses, its key matches its certificate, and its names
are known for SNI. Workers get the PEM bytes and never open the files themselves.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
from dataclasses import dataclass

# Files of a `crt` directory that are not certificates (HAProxy's companions of a PEM)
COMPANIONS = (".key", ".ocsp", ".issuer", ".sctl", ".csr")


class CertificateError(ValueError):
    """A PEM that cannot serve: the message says why, for the operator."""


@dataclass(frozen=True, slots=True)
class Certificate:
    """One certificate with its chain and key, as read from `path`."""

    path: str
    pem: bytes  # the certificate, its chain, then the private key
    names: tuple[str, ...]  # DNS names (lower case; wildcards as *.example.com)
    serial: str  # upper-case hex, as `show ssl cert` prints it
    not_before: datetime.datetime
    not_after: datetime.datetime
    subject: str
    issuer: str
    algorithm: str  # EC256, RSA2048, ...
    sha1: str  # fingerprint of the leaf, upper-case hex

    def expired(self, now: datetime.datetime | None = None) -> bool:
        now = now or datetime.datetime.now(datetime.UTC)
        return now > self.not_after


def read_files(path: str) -> list[str]:
    """The certificate files `crt` names: the file itself, or a directory's files in
    name order (companions such as FILE.key excepted)."""
    if os.path.isdir(path):
        return [
            os.path.join(path, name) for name in sorted(os.listdir(path))
            if not name.startswith(".") and not name.endswith(COMPANIONS)
            and os.path.isfile(os.path.join(path, name))
        ]
    return [path]


def load(path: str) -> Certificate:
    """Read and check one PEM file (its key may be in FILE.key beside it)."""
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as err:
        raise CertificateError(f"cannot read {path}: {err.strerror or err}") from None
    if b"PRIVATE KEY-----" not in pem and os.path.exists(path + ".key"):
        try:
            with open(path + ".key", "rb") as f:
                pem = pem.rstrip(b"\n") + b"\n" + f.read()
        except OSError as err:
            raise CertificateError(f"cannot read {path}.key: {err.strerror or err}") from None
    return parse(path, pem)


def parse(path: str, pem: bytes) -> Certificate:
    """Check a PEM payload: a certificate (then its chain) and the matching private key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise CertificateError(f"{path}: no PEM certificate found") from None
    if b"PRIVATE KEY-----" not in pem:
        raise CertificateError(f"{path}: no private key (in the file or in {path}.key)")
    start = pem.rfind(b"-----BEGIN ", 0, pem.index(b"PRIVATE KEY-----"))
    try:
        key = serialization.load_pem_private_key(pem[start:], password=None)
    except (ValueError, TypeError) as err:
        raise CertificateError(f"{path}: cannot read the private key: {err}") from None
    leaf = chain[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) != leaf.public_key().public_bytes(
        encoding, public
    ):
        raise CertificateError(f"{path}: the private key does not match the certificate")
    try:  # what OpenSSL refuses (a key its security level finds too small, say) fails here
        load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), pem)
    except ssl.SSLError as err:
        raise CertificateError(f"{path}: OpenSSL refuses it: {err.reason or err}") from None
    names = _names(leaf)
    public_key = leaf.public_key()
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        algorithm = f"EC{public_key.curve.key_size}"
    elif isinstance(public_key, rsa.RSAPublicKey):
        algorithm = f"RSA{public_key.key_size}"
    else:
        algorithm = type(public_key).__name__.replace("PublicKey", "").upper()
    return Certificate(
        path=path,
        pem=pem,
        names=names,
        serial=_hex(leaf.serial_number),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        subject=_dn(leaf.subject),
        issuer=_dn(leaf.issuer),
        algorithm=algorithm,
        sha1=hashlib.sha1(leaf.public_bytes(encoding)).hexdigest().upper(),
    )


def load_chain(ctx: ssl.SSLContext, pem: bytes) -> None:
    """Load a PEM chain and key held in memory (Python's ssl loads them from paths only:
    through a memfd)."""
    fd = os.memfd_create("pylb-cert", os.MFD_CLOEXEC)
    try:
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view):]
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _names(leaf: object) -> tuple[str, ...]:
    """DNS names of the subjectAltName, else the common name (as clients did before SAN)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)  # type: ignore[attr-defined]
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [
            str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)  # type: ignore[attr-defined]
        ]
    return tuple(dict.fromkeys(name.lower().rstrip(".") for name in names if name))


def _hex(number: int) -> str:
    """A serial number as OpenSSL prints it: upper-case hex, whole bytes."""
    text = f"{number:X}"
    return "0" + text if len(text) % 2 else text


def _dn(name: object) -> str:
    """A distinguished name as HAProxy prints it: /CN=x/O=y."""
    parts = name.rdns  # type: ignore[attr-defined]
    return "".join("/" + rdn.rfc4514_string() for rdn in parts) or "/"


def matches(pattern: str, server_name: str) -> bool:
    """Does a certificate name cover `server_name`? A wildcard stands for one whole label."""
    if pattern == server_name:
        return True
    if pattern.startswith("*."):
        head, dot, rest = server_name.partition(".")
        return bool(head) and bool(dot) and rest == pattern[2:]
    return False
