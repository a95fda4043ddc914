"""Requests a frontend answers itself (HAProxy's applets): its stats page and its
Prometheus endpoint (`stats:` and `prometheus:` in the configuration).

An HTTP session hands such a request to a `WebRequest` once its head is read: the body is
collected here instead of going to a server, then the whole request travels to the
master, which alone sees every worker's counters and changes server states
(lb.statsite). Its answer comes back on the control channel and the session sends it,
then closes the connection. The worker never renders a page: what it sends is what the
master answered, whatever generation the worker belongs to.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from lb import h1, statspage

if TYPE_CHECKING:
    from lb.config import model

MAX_BODY = statspage.MAX_BODY  # an admin form is small; more is refused with 413
ANSWER_TIMEOUT = 10.0  # seconds the master may take; then 503


class WebService:
    """A frontend's pages, as its worker sees them."""

    __slots__ = ("frontend", "stats", "prometheus_uri", "master")

    def __init__(self, frontend: Any, cfg: model.Frontend, master: MasterLink) -> None:
        self.frontend = frontend
        self.stats = cfg.stats
        self.prometheus_uri = cfg.prometheus.uri if cfg.prometheus is not None else None
        self.master = master

    def matches(self, target: bytes) -> bool:
        return statspage.matches(target.decode("latin-1"), self.stats, self.prometheus_uri)

    def begin(self, session: Any, head: h1.RequestHead) -> WebRequest:
        return WebRequest(self, session, head)


class WebRequest:
    """One request for the pages, from its head to the answer."""

    __slots__ = ("service", "session", "head", "body", "size", "task")

    def __init__(self, service: WebService, session: Any, head: h1.RequestHead) -> None:
        self.service = service
        self.session = session
        self.head = head
        self.body: list[bytes] = []
        self.size = 0
        self.task: asyncio.Task[None] | None = None

    def data(self, data: bytes) -> None:
        self.size += len(data)
        if self.size <= MAX_BODY:
            self.body.append(data)

    def end(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._answer())

    async def _answer(self) -> None:
        head = self.head
        if self.size > MAX_BODY:
            status, response = 413, _render(413, [], b"Request body too large\n", head)
        else:
            status, headers, body = await self._ask_master()
            response = _render(status, headers, body, head)
        self.session.answer_locally(status, response)

    async def _ask_master(self) -> tuple[int, list[tuple[str, str]], bytes]:
        head = self.head
        message = {
            "fe": self.service.frontend.name,
            "method": head.method.decode("latin-1"),
            "target": head.target.decode("latin-1"),
            "headers": _headers(head),
            "body": base64.b64encode(b"".join(self.body)).decode(),
        }
        try:
            answer = await asyncio.wait_for(self.service.master.ask(message), ANSWER_TIMEOUT)
            return (int(answer["status"]), [(str(k), str(v)) for k, v in answer["headers"]],
                    base64.b64decode(answer["body"]))
        except (TimeoutError, asyncio.CancelledError, KeyError, TypeError, ValueError):
            return 503, [("Content-Type", "text/plain")], b"The master did not answer.\n"


def _headers(head: h1.RequestHead) -> list[list[str]]:
    """The request's header fields as [name, value] (its lines are kept as received)."""
    fields = []
    for line in head.forward:
        name, _, value = line[:-2].partition(b":")
        fields.append([name.decode("latin-1"), value.strip().decode("latin-1")])
    fields += [[name.decode("latin-1"), value.decode("latin-1")] for name, value in head.hop]
    return fields


def _render(status: int, headers: list[tuple[str, str]], body: bytes,
            head: h1.RequestHead) -> bytes:
    """The whole HTTP/1.1 response; the connection closes after it."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{name}: {value}" for name, value in headers
              if name.lower() not in ("content-length", "connection")]
    if head.method != b"HEAD":  # (a HEAD answer leaves the length out: RFC 9110)
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    text = "\r\n".join(lines) + "\r\n\r\n"
    return text.encode("latin-1") + (body if head.method != b"HEAD" else b"")


class MasterLink:
    """The worker's questions to the master about pages, and their answers."""

    def __init__(self, send: Any) -> None:
        self._send = send
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}

    async def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        ident = next(self._ids)
        future = self._waiting[ident] = asyncio.get_running_loop().create_future()
        try:
            self._send({"op": "web", "id": ident, **message})
            return await future
        finally:
            self._waiting.pop(ident, None)

    def answered(self, message: dict[str, Any]) -> None:
        future = self._waiting.get(message.get("id", 0))
        if future is not None and not future.done():
            future.set_result(message)

    def gone(self) -> None:
        """The master is gone: nobody will answer."""
        for future in self._waiting.values():
            if not future.done():
                future.cancel()
