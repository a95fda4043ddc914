"""Health checks: the master probes every server with `check: true` and writes the verdict
into shared memory, where every worker sees it on its next request.

Checks run in the master alone so that a server is probed once per interval by pylb as a
whole, whatever the number of workers, and so that a state change reaches all workers at
the same instant. Each server has one task: a TCP connect, or an HTTP request when its
backend has `http-check`, every `inter` seconds. A server with `ssl: true` is checked over
TLS (HAProxy needs `check-ssl` for that; pylb implies it), with the settings its requests
use: a failed or slow handshake is a Layer6 failure (L6RSP, L6TOUT), and a connect-only
check that completes its handshake passes with L6OK, as in HAProxy.

Rise and fall follow HAProxy's health counter: it runs from 0 to rise + fall - 1; the
server is UP from `rise` upwards and DOWN at 0. A failure takes one step down (and drops
to 0 once below `rise`), a success one step up (and jumps to the top once at `rise`).
Servers start UP with the counter at `rise`, so a server that fails its very first check
is marked DOWN at once, as in HAProxy; after that it takes `fall` failures in a row.

The interval follows the counter as in HAProxy: `inter` at the top, `downinter` at 0 (DOWN),
`fastinter` in between (rising or falling); each unset one is `inter`. While a backend with
hold-when-down has no usable server, its DOWN servers are checked at `fastinter`: requests
are waiting for the first one to come back. `spread-checks` adds random jitter.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from lb import config
from lb.log import log
from lb.shared import (
    BE_HOLD,
    CHECK_STATUSES,
    DOWN,
    READY,
    SRV_ADMIN,
    SRV_CHECK_CODE,
    SRV_CHECK_MS,
    SRV_CHECK_STATUS,
    SRV_CHKDOWN,
    SRV_CHKFAIL,
    SRV_DOWNSINCE,
    SRV_DOWNTIME,
    SRV_OP,
    SRV_WEIGHT,
    UP,
    Shared,
)
from lb.tls import client as tls_client

L4OK, L4CON, L4TOUT, L6OK, L6RSP, L6TOUT, L7OK, L7STS, L7RSP, L7TOUT = (
    CHECK_STATUSES.index(name)
    for name in ("L4OK", "L4CON", "L4TOUT", "L6OK", "L6RSP", "L6TOUT", "L7OK", "L7STS",
                 "L7RSP", "L7TOUT")
)
PASSED = frozenset((L4OK, L6OK, L7OK))

# TLS client contexts of checks, by recipe (lb.tls.client), each built once in a thread
TlsContexts = dict[tls_client.Recipe, "asyncio.Future[ssl.SSLContext]"]

# What the logs say for each status (HAProxy's wording)
REASONS = {
    L4OK: "Layer4 check passed",
    L4CON: "Layer4 connection problem",
    L4TOUT: "Layer4 timeout",
    L6OK: "Layer6 check passed",
    L6RSP: "Layer6 invalid response",
    L6TOUT: "Layer6 timeout",
    L7OK: "Layer7 check passed",
    L7STS: "Layer7 wrong status",
    L7RSP: "Layer7 invalid response",
    L7TOUT: "Layer7 timeout",
}

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-9][0-9][0-9])(?: ([^\r\n]*))?\r?\n")


@dataclass(frozen=True, slots=True)
class Result:
    status: int  # index into CHECK_STATUSES
    code: int = 0  # HTTP status, 0 if none
    info: str = ""  # detail for the log: an error message, a reason phrase
    ms: int = 0  # check duration

    def describe(self) -> str:
        """`reason: ..., code: ..., info: "...", check duration: Nms`, as HAProxy logs it."""
        text = f"reason: {REASONS[self.status]}"
        if self.code:
            text += f", code: {self.code}"
        if self.info:
            text += f', info: "{self.info}"'
        return f"{text}, check duration: {self.ms}ms"


def _error_text(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _handshake_text(exc: OSError) -> str:
    """A failed TLS handshake, as HAProxy names it, with OpenSSL's reason."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = f"certificate verify failed: {exc.verify_message}"
    elif isinstance(exc, ssl.SSLError):
        detail = (exc.reason or str(exc)).lower().replace("_", " ")
    else:
        detail = _error_text(exc)
    return f"SSL handshake failure ({detail})"


class ServerCheck:
    """One server's checks and health counter."""

    def __init__(
        self, backend: config.Backend, server: config.Server, shared: Shared,
        spread: int = 0, on_change: Callable[[ServerCheck], None] | None = None,
        contexts: TlsContexts | None = None,
    ) -> None:
        """`contexts`: the TLS client contexts of the checks of one configuration (Checker)."""
        self.backend = backend
        self.server = server
        self.shared = shared
        self.spread = spread / 100  # spread-checks, as a fraction of the interval
        self.on_change = on_change  # told after the server went UP or DOWN
        self.wake = asyncio.Event()  # set: reconsider the interval now (see wake_down)
        self.base = shared.layout.servers[(backend.name, server.name)]
        self.hold_flag = shared.layout.backends[backend.name] + BE_HOLD
        self.siblings = [
            (s, shared.layout.servers[(backend.name, s.name)]) for s in backend.servers
        ]
        self.health = server.rise  # up, but one failure away from down (HAProxy's start)
        self.timeout = backend.timeouts.check
        http = backend.http_check
        if http is None:
            self.request = b""
            self.expect = (0, 0)
        else:
            host = http.host or str(server.address)
            self.request = (
                f"{http.method} {http.path} HTTP/1.1\r\nHost: {host}\r\n"
                "Connection: close\r\nUser-Agent: pylb-check\r\n\r\n"
            ).encode("latin-1")
            self.expect = http.expect
        self.name = f"{backend.name}/{server.name}"
        self.kind = "backup server" if server.backup else "server"
        # A server with ssl: true is checked over TLS, as HAProxy's check-ssl does, with
        # the settings its requests use (verify, CAs, names); see _tls_context
        self.tls_recipe = tls_client.recipe(server, backend.mode)
        self.tls: ssl.SSLContext | None = None
        self.contexts: TlsContexts = {} if contexts is None else contexts
        self.sni = tls_client.server_hostname(server)

    async def run(self, first_delay: float) -> None:
        """Check on a fixed schedule (a slow check delays the next one, never doubles
        it), surviving whatever a check raises."""
        loop = asyncio.get_running_loop()
        await asyncio.sleep(first_delay)
        due = loop.time()
        while True:
            try:
                self.record(await self.probe())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("health check of %s %s crashed", self.kind, self.name)
            interval = self.interval()
            due += interval
            now = loop.time()
            if due < now:  # missed turns are skipped, not made up
                due += (now - due) // interval * interval + interval
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), due - now)
                due = loop.time()  # woken: the interval changed, check now
            except TimeoutError:
                pass

    def interval(self) -> float:
        """Seconds to the next check, by the health counter (HAProxy's inter, fastinter,
        downinter), with spread-checks' jitter."""
        server = self.server
        if self.health >= server.rise + server.fall - 1:
            interval = server.inter
        elif self.health == 0 and not self._awaited():
            interval = server.downinter or server.inter
        else:
            interval = server.fastinter or server.inter
        if self.spread:
            interval *= 1 + random.uniform(-self.spread, self.spread)
        return max(interval, 0.001)

    def _awaited(self) -> bool:
        """Are requests held for this backend, none of whose servers is usable?"""
        return self.shared.words[self.hold_flag] != 0 and self._usable() == (0, 0)

    async def _tls_context(self, recipe: tls_client.Recipe) -> ssl.SSLContext:
        """The check's TLS context, built in a thread: loading the system's CAs takes tens
        of milliseconds, too long for the master's loop. Checks of servers configured
        alike share one build (a reload builds anew: the CAs may have changed)."""
        build = self.contexts.get(recipe)
        if build is None:
            build = asyncio.ensure_future(asyncio.to_thread(tls_client.build, *recipe))
            self.contexts[recipe] = build
        return await asyncio.shield(build)  # a check stopped meanwhile stops no other

    async def probe(self) -> Result:
        """One check, bounded by `timeout check`."""
        if self.tls_recipe is not None and self.tls is None:
            self.tls = await self._tls_context(self.tls_recipe)
        started = time.monotonic()
        connected = False
        handshaken = self.tls is None
        writer: asyncio.StreamWriter | None = None

        def result(status: int, code: int = 0, info: str = "") -> Result:
            return Result(status, code, info, int((time.monotonic() - started) * 1000))

        address = self.server.address
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(address.host, address.port)
                connected = True
                if not handshaken:  # TLS on the connection made: its failures are Layer6
                    await writer.start_tls(self.tls, server_hostname=self.sni)
                    handshaken = True
                if not self.request:
                    return result(L4OK if self.tls is None else L6OK)
                writer.write(self.request)
                line = await reader.readline()
        except TimeoutError:  # before OSError: TimeoutError is one
            if connected and not handshaken:
                return result(L6TOUT)
            return result(L7TOUT if connected and self.request else L4TOUT)
        except OSError as exc:
            if connected and not handshaken:
                return result(L6RSP, info=_handshake_text(exc))
            return result(L7RSP if connected else L4CON, info=_error_text(exc))
        except ValueError:  # status line over the stream's limit
            return result(L7RSP, info="Status line too long")
        finally:
            if writer is not None:
                writer.close()
        if not line:
            return result(L7RSP, info="Empty response")
        match = _STATUS_LINE.fullmatch(line)
        if match is None:
            return result(L7RSP, info="Invalid HTTP status line")
        code = int(match[1])
        phrase = (match[2] or b"").decode("latin-1").strip()
        lo, hi = self.expect
        if lo <= code <= hi:
            return result(L7OK, code)
        return result(L7STS, code, phrase)

    def record(self, result: Result) -> None:
        """Publish a check's outcome and move the health counter; change the server's
        state when the counter crosses a threshold."""
        words = self.shared.words
        base = self.base
        words[base + SRV_CHECK_STATUS] = result.status
        words[base + SRV_CHECK_CODE] = result.code
        words[base + SRV_CHECK_MS] = result.ms
        rise, fall = self.server.rise, self.server.fall
        top = rise + fall - 1
        passed = result.status in PASSED
        moved = False
        if passed and self.health < top:
            moved = True
            self.health = top if self.health + 1 >= rise else self.health + 1
        elif not passed and self.health > 0:
            moved = True
            words[base + SRV_CHKFAIL] += 1  # like HAProxy: not counted once fully down
            self.health = 0 if self.health - 1 < rise else self.health - 1
        up = words[base + SRV_OP] == UP
        if up and self.health == 0:
            self._set(DOWN, result)
        elif not up and self.health >= rise:
            self._set(UP, result)
        elif moved:
            self._log_progress(passed, result)

    def _set(self, state: int, result: Result) -> None:
        words = self.shared.words
        words[self.base + SRV_OP] = state
        now = int(time.time())
        if state == DOWN:
            words[self.base + SRV_CHKDOWN] += 1
            words[self.base + SRV_DOWNSINCE] = now
        elif words[self.base + SRV_DOWNSINCE]:  # the time it spent down (show stat downtime)
            words[self.base + SRV_DOWNTIME] += now - words[self.base + SRV_DOWNSINCE]
            words[self.base + SRV_DOWNSINCE] = 0
        self.shared.changed(self.base)
        if self.on_change is not None:
            self.on_change(self)
        active, backup = self._usable()
        if state == UP:
            log.info(
                "%s %s is UP, %s. %d active and %d backup servers online.",
                self.kind.title(), self.name, result.describe(), active, backup,
            )
            return
        log.warning(
            "%s %s is DOWN, %s. %d active and %d backup servers left.",
            self.kind.title(), self.name, result.describe(), active, backup,
        )
        if not active and not backup:
            log.error("backend %s has no server available!", self.backend.name)

    def _usable(self) -> tuple[int, int]:
        """Servers of the backend that can take new traffic: (active, backup)."""
        words = self.shared.words
        counts = [0, 0]
        for server, base in self.siblings:
            if (
                words[base + SRV_OP] == UP
                and words[base + SRV_ADMIN] == READY
                and words[base + SRV_WEIGHT] > 0
            ):
                counts[server.backup] += 1
        return counts[0], counts[1]

    def _log_progress(self, passed: bool, result: Result) -> None:
        """A step of the counter that changes no state: `status: 1/3 UP` as HAProxy says."""
        rise, fall = self.server.rise, self.server.fall
        if self.health >= rise:
            weight = self.shared.words[self.base + SRV_WEIGHT]
            where = f"{self.health - rise + 1}/{fall} {'UP' if weight else 'DRAIN'}"
        else:
            where = f"{self.health}/{rise} DOWN"
        log.log(
            logging.INFO if passed else logging.WARNING,
            "Health check for %s %s %s, %s, status: %s.",
            self.kind, self.name, "succeeded" if passed else "failed", result.describe(), where,
        )


class Checker:
    """All the health checks of pylb, run by the master."""

    def __init__(
        self, cfg: config.Config, shared: Shared, health: dict[str, int] | None = None,
        on_up: Callable[[str], None] | None = None,
    ) -> None:
        """`health`: the counters of the generation before a reload, by server
        ("backend/server"), so that a server carries on where it was (no re-rise).
        `on_up`: called with a backend's name when one of its servers comes UP."""
        self.on_up = on_up
        spread = cfg.global_.spread_checks
        contexts: TlsContexts = {}  # this configuration's: a reload builds anew
        self.checks = [
            ServerCheck(backend, server, shared, spread, self._changed, contexts)
            for backend in cfg.backends.values()
            for server in backend.servers
            if server.check
        ]
        self.tasks: list[asyncio.Task[None]] = []
        if health is not None:
            for check in self.checks:
                if check.name in health:
                    top = check.server.rise + check.server.fall - 1
                    check.health = min(health[check.name], top)

    def start(self) -> None:
        """One task per checked server; the first checks are spread over the first
        interval (each server's own: after a reload, a DOWN server that held requests wait
        for keeps its fastinter) so that many servers are not all probed at once."""
        count = len(self.checks)
        for position, check in enumerate(self.checks):
            delay = check.interval() * position / count
            self.tasks.append(asyncio.get_running_loop().create_task(check.run(delay)))

    def _changed(self, check: ServerCheck) -> None:
        backend = check.backend.name
        if check.shared.words[check.base + SRV_OP] == UP:
            if self.on_up is not None:
                self.on_up(backend)  # requests waiting for it go now
            return
        self.wake_down(backend)

    def wake_down(self, backend: str) -> None:
        """The backend may have lost its last usable server (to a check, `disable server`,
        a weight of 0) or turned hold-when-down on: its DOWN servers that held requests now
        want checked at fastinter are checked now, not at the end of a downinter."""
        for check in self.checks:
            if check.backend.name == backend and check.health == 0 and check._awaited():
                check.wake.set()

    def health(self) -> dict[str, int]:
        return {check.name: check.health for check in self.checks}

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.tasks.clear()

