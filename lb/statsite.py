"""The master's side of the stats page and /metrics: what a worker forwards (lb.applet)
is answered here, from the master's view of pylb as a whole.

The figures are those of `show info` and `show stat` (lb.runtime.stats), so the page, the
CSV, the Prometheus endpoint and the stats socket never disagree; an admin button runs
the socket's own `set server ... state` command.
"""

from __future__ import annotations

import asyncio
import base64
from typing import TYPE_CHECKING, Any

from lb import promex, statspage
from lb.log import log
from lb.runtime import commands, stats

if TYPE_CHECKING:
    from lb.master import Master


class MasterSite:
    """lb.statspage's Site: the master's figures and actions."""

    def __init__(self, master: Master) -> None:
        self.master = master
        self.secret = master.stats_secret  # CSRF tokens stay valid across reloads

    async def info(self) -> dict[str, object]:
        return stats.info(self.master)

    async def rows(self) -> list[dict[str, object]]:
        return stats.rows(self.master)

    async def csv(self) -> str:
        return stats.show_stat(self.master)

    async def metrics(self, scopes: set[str] | None) -> tuple[bytes, str]:
        master = self.master
        pylb = {
            "generation": master.generation,
            "reloads_total": master.reloads,
            "reload_seconds": master.reload_seconds,
        }
        body = promex.render(stats.info(master), stats.rows(master), pylb, scopes)
        return body, promex.CONTENT_TYPE

    async def apply(self, backend: str, server: str, action: str) -> str:
        """An admin button: the socket's `set server B/S state ACTION`; "" when done."""
        session = commands.Session(level=commands.ADMIN, timeout=10.0)
        answer = await commands.execute(
            self.master, f"set server {backend}/{server} state {action}", session)
        if answer.strip():
            return answer.strip()
        log.info("stats page: server %s/%s set to %s", backend, server, action)
        return ""


async def answer(master: Master, message: dict[str, Any]) -> dict[str, Any]:
    """The reply to a worker's `web` message: one request for a frontend's pages."""
    frontend = master.config.frontends.get(str(message.get("fe")))
    if frontend is None or (frontend.stats is None and frontend.prometheus is None):
        # a worker of an older generation, whose frontend this configuration dropped
        return _reply(message, statspage.Response(404, (("Content-Type", "text/plain"),),
                                                  b"Not Found\n"))
    request = statspage.Request(
        method=str(message["method"]), target=str(message["target"]),
        headers=tuple((str(k), str(v)) for k, v in message["headers"]),
        body=base64.b64decode(message["body"]),
    )
    prometheus = frontend.prometheus.uri if frontend.prometheus is not None else None
    try:
        response = await statspage.serve(request, MasterSite(master), frontend.stats, prometheus)
    except asyncio.CancelledError:
        raise
    except Exception:  # a bug here must not take the master down: the page says 500
        log.exception("stats page %s failed", request.target[:200])
        response = statspage.Response(500, (("Content-Type", "text/plain"),),
                                      b"Internal Server Error\n")
    return _reply(message, response)


def _reply(message: dict[str, Any], response: statspage.Response) -> dict[str, Any]:
    return {
        "op": "web-reply", "id": message.get("id", 0), "status": response.status,
        "headers": [list(pair) for pair in response.headers],
        "body": base64.b64encode(response.body).decode(),
    }
