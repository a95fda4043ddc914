"""Cookie persistence, as HAProxy's `cookie` does it: which server a request's cookie names,
and the edits to the request and response heads that each mode implies. Pure functions on
lb.h1 heads: no sockets here.

Modes (the backend's `cookie.mode`):
- insert: pylb sets `NAME=<server cookie>` on responses to clients that lack it; with
  `indirect`, the cookie is taken out of requests before they reach the server.
- rewrite: the server sets NAME itself; pylb rewrites its value to the server's cookie.
- prefix: the server's NAME=v becomes NAME=<server cookie>~v on the way out, and back to
  NAME=v on the way in.
"""

from __future__ import annotations

from lb import config
from lb.h1 import Head, RequestHead, ResponseHead

PREFIX_SEP = b"~"


def _cookie_lines(head: Head) -> list[int]:
    return [i for i, line in enumerate(head.forward) if line[:7].lower() == b"cookie:"]


def _pairs(line: bytes) -> list[bytes]:
    """The `name=value` pairs of a `Cookie: ...\\r\\n` line."""
    return [p.strip() for p in line[7:-2].split(b";")]


def cookie_value(head: RequestHead, name: bytes) -> bytes | None:
    """The value of the request cookie `name`, untouched."""
    prefix = name + b"="
    for index in _cookie_lines(head):
        for pair in _pairs(head.forward[index]):
            if pair.startswith(prefix):
                return pair[len(prefix) :]
    return None


def stick_key(head: RequestHead, client_ip: bytes, stick_on: tuple[str, str | None]) -> str | None:
    """The key a backend's `stick-on` takes from this request, or None."""
    kind, name = stick_on
    if kind == "src":
        value: bytes | None = client_ip
    elif kind == "cookie":
        value = cookie_value(head, name.encode())  # type: ignore[union-attr]
    else:
        value = head.header(name.encode())  # type: ignore[union-attr]
    return value.decode("latin-1") if value else None


def request_cookie(head: RequestHead, cookie: config.Cookie) -> bytes | None:
    """The server cookie value this request carries (for prefix mode, the part before
    `~`), editing the forwarded Cookie header as the mode requires. None: no cookie."""
    name = cookie.name.encode() + b"="
    found: bytes | None = None
    for index in _cookie_lines(head):
        pairs = _pairs(head.forward[index])
        kept: list[bytes] = []
        for pair in pairs:
            if found is None and pair.startswith(name):
                value = pair[len(name) :]
                if cookie.mode == "prefix":
                    found, _, rest = value.partition(PREFIX_SEP)
                    kept.append(name + rest)  # the server sees its own value back
                    continue
                found = value
                if cookie.mode == "insert" and cookie.indirect:
                    continue  # ours, not the server's: drop it
            kept.append(pair)
        if kept != pairs:
            head.forward[index] = b"Cookie: " + b"; ".join(kept) + b"\r\n" if kept else b""
    return found


def response_cookie(
    head: ResponseHead, cookie: config.Cookie, server_cookie: str, client_has_it: bool
) -> None:
    """Edit the response head so the client keeps coming back to this server."""
    value = server_cookie.encode()
    name = cookie.name.encode()
    if cookie.mode == "insert":
        if client_has_it:
            return
        head.forward.append(b"Set-Cookie: %s=%s; path=/\r\n" % (name, value))
        if cookie.nocache:
            # A shared cache must not hand this client's cookie to other clients.
            head.forward.append(b"Cache-Control: private\r\n")
        return
    prefix = b"set-cookie: " + name.lower() + b"="
    for index, line in enumerate(head.forward):
        if line[: len(prefix)].lower() != prefix:
            continue
        old, sep, attributes = line[len(prefix) : -2].partition(b";")
        new = value if cookie.mode == "rewrite" else value + PREFIX_SEP + old
        head.forward[index] = b"Set-Cookie: %s=%s%s%s\r\n" % (name, new, sep, attributes)
