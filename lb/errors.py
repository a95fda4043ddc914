"""The answers pylb gives itself when it cannot forward: short, closing, cacheable never."""

from __future__ import annotations

from http import HTTPStatus

_TEXT = {
    400: "Your browser sent an invalid request.",
    403: "Request forbidden by administrative rules.",
    405: "Method not allowed.",
    408: "Your browser didn't send a complete request in time.",
    500: "An internal server error occurred.",
    502: "The server returned an invalid or incomplete response.",
    503: "No server is available to handle this request.",
    504: "The server didn't respond in time.",
}


def page(status: int, text: str | None = None) -> bytes:
    """A whole HTTP/1.1 response with `Connection: close`."""
    reason = HTTPStatus(status).phrase
    body = (
        f"<html><body><h1>{status} {reason}</h1>\n{text or _TEXT.get(status, reason)}\n"
        "</body></html>\n"
    ).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: text/html\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-cache\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


PAGES = {status: page(status) for status in _TEXT}
