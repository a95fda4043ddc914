"""`show|set|commit|abort ssl cert`: certificates replaced without a reload, in HAProxy's words.

`set ssl cert FILE <<` (the PEM follows, up to an empty line) opens a transaction for a
certificate file the configuration uses; `commit ssl cert FILE` sends it to every worker
and answers once all of them serve it to new handshakes; `abort ssl cert FILE` drops it.
The master checks the PEM before any worker sees it: a bad payload changes nothing. What
was committed lives in memory until the next reload, which reads the files again.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

from lb import tls
from lb.tls.certs import Certificate, CertificateError, parse

if TYPE_CHECKING:
    from lb.master import Master
    from lb.runtime.commands import Session

MAX_PAYLOAD = 1 << 20  # bytes of PEM one `set ssl cert` may send


def serving(master: Master) -> dict[str, Certificate]:
    """Every certificate file the TLS binds use, as served now (commits included)."""
    out: dict[str, Certificate] = {}
    for frontend in master.config.frontends.values():
        for bind in frontend.tls:
            for cert in bind.certificates:
                out.setdefault(cert.path, master.certs.get(cert.path, cert))
    return out


def _describe(cert: Certificate, name: str, used: bool) -> str:
    lines = [
        f"Filename: {name}",
        f"Status: {'Used' if used else 'Unused'}",
        f"Serial: {cert.serial}",
        f"notBefore: {_date(cert.not_before)}",
        f"notAfter: {_date(cert.not_after)}",
        "Subject Alternative Name: " + ", ".join(f"DNS:{n}" for n in cert.names),
        f"Algorithm: {cert.algorithm}",
        f"SHA1 FingerPrint: {cert.sha1}",
        f"Subject: {cert.subject}",
        f"Issuer: {cert.issuer}",
    ]
    return "\n".join(lines) + "\n\n"


def _date(when: datetime.datetime) -> str:
    """As OpenSSL prints times: "Sep  9 08:41:27 2022 GMT"."""
    return f"{when:%b} {when.day:2d} {when:%H:%M:%S %Y} GMT"


async def show_ssl_cert(master: Master, args: list[str], session: Session) -> str:
    certs = serving(master)
    if not args:
        out = []
        if master.cert_edits:
            out += ["# transaction", *(f"*{name}" for name in master.cert_edits)]
        out += ["# filename", *certs]
        return "\n".join(out) + "\n\n"
    name = args[0]
    if name.startswith("*"):
        edit = master.cert_edits.get(name[1:])
        if edit is None:
            return "No ongoing transaction!\n\n"
        return _describe(edit, name, False)
    if name not in certs:
        return "Can't display the certificate: Not found or the certificate is a bundle!\n\n"
    return _describe(certs[name], name, True)


async def set_ssl_cert(master: Master, args: list[str], session: Session) -> str:
    if not args:
        return "'set ssl cert' expects a filename and a certificate as a payload\n\n"
    name = args[0]
    payload = session.payload
    if payload is None:
        return "'set ssl cert' expects a filename and a certificate as a payload\n\n"
    if name not in serving(master):
        return "Can't replace a certificate which is not referenced by the configuration!\n\n"
    if len(payload) > MAX_PAYLOAD:
        return f"The payload is larger than {MAX_PAYLOAD} bytes: refused.\n\n"
    try:
        cert = parse(name, payload.encode("utf-8", "replace"))
    except CertificateError as err:
        return f"Can't update {name}: {err}\n\n"
    created = name not in master.cert_edits
    master.cert_edits[name] = cert
    return f"Transaction {'created' if created else 'updated'} for certificate {name}!\n\n"


async def commit_ssl_cert(master: Master, args: list[str], session: Session) -> str:
    if not args:
        return "'commit ssl cert' expects a filename\n\n"
    name = args[0]
    cert = master.cert_edits.get(name)
    if cert is None:
        return "No ongoing transaction! !\n\n"
    master.certs[name] = cert  # workers started from now on get it in their hello
    del master.cert_edits[name]
    asked = len(master.workers)
    answers = await master.ask_each("ssl-cert", certs=tls.encode_certs({name: cert}))
    missing = asked - len(answers)
    if missing > 0:
        return (f"Committing {name}\nSuccess! ({missing} worker(s) did not answer; "
                "they serve it once they do)\n\n")
    return f"Committing {name}\nSuccess!\n\n"


async def abort_ssl_cert(master: Master, args: list[str], session: Session) -> str:
    if not args:
        return "'abort ssl cert' expects a filename\n\n"
    if master.cert_edits.pop(args[0], None) is None:
        return "No ongoing transaction!\n\n"
    return f"Transaction aborted for certificate '{args[0]}'!\n\n"
