"""TLS: certificates, contexts, session tickets.

The master reads certificates (lb.tls.certs) and keeps the session ticket keys
(lb.tls.keyring); workers build their SSL contexts from what it sends (lb.tls.context) and
share the keys through lb.tls.tickets.
"""

from __future__ import annotations

import base64
import pickle
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lb.tls.certs import Certificate
    from lb.tls.tickets import TicketKeys


def ticket_keys(hex_keys: list[str]) -> TicketKeys | None:
    """The worker's shared ticket keys; None without keys, or where they cannot be
    installed (then each worker makes its own, and says why once)."""
    if not hex_keys:
        return None
    from lb.log import log
    from lb.tls import tickets

    reason = tickets.unavailable()
    if reason:
        log.warning("TLS session tickets stay per worker: %s", reason)
        return None
    return tickets.TicketKeys([bytes.fromhex(key) for key in hex_keys])


SNI_ATTRIBUTE = "pylb_sni"  # set on the SSLObject by lb.tls.context's SNI callback


def sni_of(sslobj: object) -> str | None:
    """The server name a TLS client asked for (None without SNI)."""
    return getattr(sslobj, SNI_ATTRIBUTE, None)


def encode_certs(certs: dict[str, Certificate]) -> str:
    """Certificates for a control message (from the master, which read and checked them)."""
    return base64.b64encode(pickle.dumps(certs)).decode("ascii") if certs else ""


def decode_certs(text: str) -> dict[str, Certificate]:
    return pickle.loads(base64.b64decode(text)) if text else {}
