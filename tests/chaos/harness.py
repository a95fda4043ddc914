"""The chaos world: real pylb processes, real backends and real clients on loopback.

A `World` owns a working directory, three echo backends (tests/backends.py), one counting
server behind a `maxconn` (tests/test_limits.py), an echo backend for WebSocket tunnels and
a TCP echo server for TCP-mode sessions (each behind its own frontend and backend, which
the mutations leave alone), a pylb master (started in the foreground, replaced by `-sf`
daemons and restarted after a `kill -9`), the background clients and the ledger of every
request that failed. Its `step_*` methods are the steps the state machine draws (they can
be called one by one, as tests/chaos/test_regressions.py does), and `check()` is the
invariant after each of them:

- the master is alive (after its `kill -9`: the ports were free within 1 s and the
  restarted pylb serves) and `show proc` answers;
- no request failed, except those that may: in flight on a worker killed with -9, or begun
  while the master was down (killed, not yet restarted), or pylb's known losses
  (`in-handover`: see where it is allowed);
- no long-lived tunnel (WebSocket or TCP mode, open across the whole run) lost a message,
  got one twice or out of order, or was closed by pylb, unless a step that kills
  processes (a worker's or the master's `kill -9`) happened while it was open: those
  tunnels are opened again once the step is over, and their losses do not count. Reloads
  by every method, `-sf` takeovers and configuration changes must move them whole;
- after a reload (any method, `-sf` too), within 1 s only the current generation's
  workers, the master and its worker template remain, but for an old worker whose row in
  `show proc` says why it stays (the reason goes in the step's detail). After `-sf`, the
  old pylb goes whole: no `show proc` speaks for it;
- the counting server never saw more requests at once than its `maxconn`;
- every kind of client made progress since the step.

Every wait is bounded and synchronised on an event: a log line (the log file every pylb
process of the world writes to), an answer on the stats socket, a port.

The configuration is a `Spec` rendered to YAML; a *mutation* is one valid change drawn
from a small grammar (servers added, removed, renamed; maxconn, weight, balance, health
checks, cookie persistence, a stick table, an http-request rule, a map, a second bind, a
second frontend), a *typo* an invalid file pylb must refuse.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml
from backends import (
    TCP_BANNER,
    WS_GREETING,
    EchoBackend,
    HttpConn,
    IncompleteResponse,
    TcpBackend,
    free_port,
    recv_exact,
    wait_until,
)
from test_limits import CountingServer

REPO = Path(__file__).resolve().parents[2]
PYLB = [sys.executable, str(REPO / "bin" / "pylb")]
HOST = "127.0.0.1"
WORKERS = 2
LIM_MAXCONN = 2  # the counting server's maxconn: fixed, so the invariant is exact
CLIENT_TIMEOUT = 8.0  # a client's socket timeout: longer than any wait pylb should cause
START_TIMEOUT = 15.0
RELOAD_TIMEOUT = 35.0  # pylb gives a new generation 30 s
PORT_FREE_WITHIN = 1.0  # after a master's kill -9
PROGRESS_TIMEOUT = 10.0
KILL_GRACE = 0.5  # after a killed worker's replacement accepts, its failures may still show
OLD_MASTER_EXIT = 20.0  # after -sf, the old master must be gone by then
OLD_GONE_WITHIN = 1.0  # after a reload, only the current generation by then (or a reason)
EXIT_SLACK = 0.3  # an old worker with nothing left (no reason to stay) is gone by then
LONG_TUNNELS = {"long-ws": 3, "long-tcp": 3}  # tunnels open across the whole run
LONG_BURST = 3  # numbered messages sent at once on a long-lived tunnel, then read back
LONG_PAUSE = 0.05  # seconds between two bursts
ALGORITHMS = ("roundrobin", "static-rr", "leastconn", "source", "uri", "random",
              "hdr(X-User)")
MAP_TEXT = "/probe hit\n/ka root\n# a comment\n"


# -- the configuration ---------------------------------------------------------------------


@dataclass
class ServerSpec:
    echo: int  # which echo backend
    weight: int = 1
    maxconn: int = 0


@dataclass
class Spec:
    """The configuration, as the grammar of mutations sees it."""

    servers: dict[str, ServerSpec] = field(default_factory=lambda: {
        "s1": ServerSpec(0), "s2": ServerSpec(1)})
    balance: str = "roundrobin"
    checks: bool = False
    cookie: bool = False
    stick: str | None = None  # the stick table's size, or no table
    header_rule: bool = False
    map_rule: bool = False
    second_bind: bool = False
    second_frontend: bool = False
    next_server: int = 3  # names of new servers: s3, s4...

    def new_name(self) -> str:
        name = f"s{self.next_server}"
        self.next_server += 1
        return name


MUTATIONS = ("add-server", "remove-server", "rename-server", "maxconn", "weight", "balance",
             "checks", "cookie", "stick", "header-rule", "map", "second-bind",
             "second-frontend", "none")

# Reload steps that switch a feature of the spec on or off: (attribute, what the log says)
TOGGLES = {
    "checks": ("checks", "health checks"),
    "cookie": ("cookie", "cookie persistence"),
    "header-rule": ("header_rule", "set-header rule"),
    "map": ("map_rule", "map rule"),
    "second-bind": ("second_bind", "second bind"),
}


def mutate(spec: Spec, kind: str, choice: int) -> str:
    """Apply one valid change to `spec` (`choice` picks among the possibilities); what was
    done, in words."""
    rnd = random.Random(choice)
    names = list(spec.servers)
    if kind == "remove-server" and len(names) == 1:
        kind = "add-server"
    if kind == "add-server" and len(names) >= 4:
        kind = "remove-server"
    if kind == "add-server":
        name = spec.new_name()
        spec.servers[name] = ServerSpec(rnd.randrange(3), rnd.randint(1, 3))
        return f"add server {name} (echo e{spec.servers[name].echo})"
    if kind == "remove-server":
        name = rnd.choice(names)
        del spec.servers[name]
        return f"remove server {name}"
    if kind == "rename-server":
        old = rnd.choice(names)
        new = spec.new_name()
        spec.servers = {new if n == old else n: s for n, s in spec.servers.items()}
        return f"rename server {old} -> {new}"
    if kind == "maxconn":
        name = rnd.choice(names)
        spec.servers[name].maxconn = rnd.choice((0, 1, 2, 4))
        return f"maxconn of {name} = {spec.servers[name].maxconn}"
    if kind == "weight":
        name = rnd.choice(names)
        spec.servers[name].weight = rnd.randint(1, 4)
        return f"weight of {name} = {spec.servers[name].weight}"
    if kind == "balance":
        spec.balance = rnd.choice([a for a in ALGORITHMS if a != spec.balance])
        return f"balance {spec.balance}"
    if kind in TOGGLES:
        attr, what = TOGGLES[kind]
        setattr(spec, attr, not getattr(spec, attr))
        return f"{what} {'on' if getattr(spec, attr) else 'off'}"
    if kind == "stick":
        spec.stick = rnd.choice([s for s in (None, "1k", "2k") if s != spec.stick])
        return f"stick table {spec.stick or 'off'}"
    if kind == "second-frontend":
        spec.second_frontend = not spec.second_frontend
        return f"second frontend {'on' if spec.second_frontend else 'off'}"
    return "no change"


TYPOS = (
    ("    default_backend: ", "    default_backnd: "),
    ("    balance: ", "    balanse: "),
    ("  workers: ", "  wrokers: "),
    ("    servers:\n", "    server:\n"),
)


# -- the log every pylb process of the world writes to -----------------------------------


class LogFile:
    """The lines of a log file, read as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []
        self._offset = 0
        self._partial = b""
        self._lock = threading.Lock()

    def refresh(self) -> int:
        with self._lock:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except FileNotFoundError:
                return len(self.lines)
            self._offset += len(data)
            data = self._partial + data
            *complete, self._partial = data.split(b"\n")
            self.lines += [line.decode("utf-8", "replace") for line in complete]
            return len(self.lines)

    def mark(self) -> int:
        return self.refresh()

    def find(self, regex: str, start: int = 0) -> re.Match[str] | None:
        self.refresh()
        pattern = re.compile(regex)
        for line in self.lines[start:]:
            if m := pattern.search(line):
                return m
        return None

    def wait(self, regex: str, timeout: float, start: int = 0) -> re.Match[str] | None:
        """The first line at index >= start matching, or None after `timeout`."""
        pattern = re.compile(regex)
        deadline = time.monotonic() + timeout
        index = start
        while True:
            self.refresh()
            while index < len(self.lines):
                if m := pattern.search(self.lines[index]):
                    return m
                index += 1
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)

    def notable(self, start: int = 0) -> list[str]:
        self.refresh()
        return [line for line in self.lines[start:] if NOTABLE.search(line)]


NOTABLE = re.compile(r"error|Traceback|exception|fail|killed|exit status [1-9]|did not|"
                     r"no worker|gone|keeps dying|closing|refused|cannot", re.IGNORECASE)


# -- the ledger: requests, failures, steps ---------------------------------------------------


@dataclass
class Failure:
    client: str
    start: float
    end: float
    reason: str
    step: int = -1  # index of the step it is put down to (see Ledger.classify)
    begun: int = -1  # index of the step during which it began
    failed: int = -1  # index of the step during which it failed
    allowed: str | None = None  # why it may fail, or None: a real failure
    decided: bool = False  # `allowed` was decided when it was recorded: no step's window

    def describe(self, t0: float) -> str:
        return (f"{self.client} request begun at +{self.start - t0:.3f}s failed at"
                f" +{self.end - t0:.3f}s: {self.reason}")


@dataclass
class Step:
    index: int
    kind: str
    detail: str
    start: float
    end: float = 0.0
    allow: list[Allow] = field(default_factory=list)


HANDOVER_WINDOW = 3.0  # seconds an older generation may still be handing over


@dataclass
class Allow:
    """Failures that may happen: those from `begin` to `end` of requests begun from
    `begun_after` on (and before `begun_before`)."""

    begin: float
    end: float
    label: str
    begun_after: float = float("-inf")
    reason: str = ""  # only failures whose reason says this
    begun_before: float = float("inf")

    def covers(self, failure: Failure) -> bool:
        return (self.begin <= failure.end <= self.end
                and self.begun_after <= failure.start < self.begun_before
                and self.reason in failure.reason)


@dataclass
class Stats:
    """What a run did, for bench/chaos.py's table (shared by every world of a run)."""

    steps: Counter[str] = field(default_factory=Counter)
    step_time: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)  # answered requests, by client
    failures: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    worlds: int = 0
    echo: bool = False  # print each world's steps to stderr as it closes (the bench)


class Ledger:
    def __init__(self, stats: Stats) -> None:
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.ok: Counter[str] = Counter()
        self.failures: list[Failure] = []
        self.steps: list[Step] = []
        self.checked = 0  # failures classified so far
        self.stats = stats

    def success(self, client: str) -> None:
        with self.lock:
            self.ok[client] += 1
            self.stats.ok[client] += 1

    def fail(self, client: str, start: float, reason: str, *, allowed: str | None = None,
             decided: bool = False) -> None:
        with self.lock:
            self.failures.append(Failure(client, start, time.monotonic(), reason,
                                         allowed=allowed, decided=decided))

    def successes(self, client: str) -> int:
        with self.lock:
            return self.ok[client]

    def begin(self, kind: str, detail: str = "") -> Step:
        with self.lock:
            step = Step(len(self.steps), kind, detail, time.monotonic())
            self.steps.append(step)
            self.stats.steps[kind] += 1
            return step

    def classify(self) -> list[Failure]:
        """Attribute the failures not yet seen to their step and window; the real ones."""
        with self.lock:
            new = self.failures[self.checked:]
            self.checked = len(self.failures)
            steps = list(self.steps)
        real = []
        for failure in new:
            # a request that waited too long (a timeout, a 5xx) is put down to the step
            # during which it began; any other failure to the step during which it failed
            failure.begun = max((s.index for s in steps if s.start <= failure.start),
                                default=-1)
            failure.failed = max((s.index for s in steps if s.start <= failure.end),
                                 default=-1)
            waited = "timed out" in failure.reason or "status 5" in failure.reason
            failure.step = failure.begun if waited else failure.failed
            for step in [] if failure.decided else reversed(steps):
                for allow in step.allow:  # the latest step's window says why first
                    if failure.allowed is None and allow.covers(failure):
                        failure.allowed = allow.label
            kind = steps[failure.step].kind if failure.step >= 0 else "start"
            self.stats.failures[(kind, failure.client, _reason_class(failure.reason),
                                 failure.allowed or "REAL")] += 1
            if failure.allowed is None:
                real.append(failure)
        return real


def _reason_class(reason: str) -> str:
    for word in ("refused", "reset", "timed out", "timeout", "end of stream", "Broken pipe",
                 "status", "body", "101", "echo", "server got"):
        if word in reason:
            return reason.split(":")[0] if word == "status" else word
    return reason[:40]


# -- the clients -------------------------------------------------------------------------------


class Clients:
    """Background load, each kind in its own threads, until stopped:

    - `keepalive`: one connection for many requests; sends back the persistence cookie;
    - `per-request`: a connection per request, every other one with `Connection: close`;
    - `slow`: `?delay=0.2` requests on a keep-alive connection;
    - `queued`: requests to the counting server, more clients than its `maxconn`;
    - `tunnel`: a WebSocket-style upgrade, then bytes echoed through the tunnel;
    - `long-ws`, `long-tcp` (LONG_TUNNELS): a WebSocket tunnel or a TCP-mode session each,
      open across the whole run, numbered messages echoed back in bursts (see `_long`).
    """

    KINDS = {"keepalive": 2, "per-request": 2, "slow": 1, "queued": 3, "tunnel": 1}

    def __init__(self, world: World) -> None:
        self.world = world
        self.ledger = world.ledger
        self.stop_event = threading.Event()
        self.rounds: Counter[str] = Counter()  # bursts echoed, by long-lived tunnel
        self.threads = [
            threading.Thread(target=self._run, args=(kind, i), daemon=True,
                             name=f"chaos-{kind}-{i}")
            for kind, count in self.KINDS.items() for i in range(count)
        ] + [
            threading.Thread(target=self._long, args=(kind, i), daemon=True,
                             name=f"chaos-{kind}-{i}")
            for kind, count in LONG_TUNNELS.items() for i in range(count)
        ]
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(CLIENT_TIMEOUT + 5)

    def hung(self) -> list[str]:
        return [t.name for t in self.threads if t.is_alive()]

    def _run(self, kind: str, index: int) -> None:
        op = getattr(self, "_" + kind.replace("-", "_"))
        state: dict[str, Any] = {"n": 0}
        try:
            while not self.stop_event.is_set():
                start = time.monotonic()
                try:
                    op(index, state)
                    self.ledger.success(kind)
                except Exception as exc:  # every failure is recorded, none ends the client
                    self.ledger.fail(kind, start, f"{type(exc).__name__}: {exc}")
                    conn = state.pop("conn", None)
                    if conn is not None:
                        conn.close()
                    self.stop_event.wait(0.02)
                state["n"] += 1
                self.stop_event.wait(0.01)
        finally:
            conn = state.pop("conn", None)
            if conn is not None:
                conn.close()

    def _conn(self, state: dict[str, Any], port: int) -> HttpConn:
        if "conn" not in state:
            state["conn"] = HttpConn(port, timeout=CLIENT_TIMEOUT)
        return state["conn"]

    def _check(self, response: Any) -> None:
        if response.status != 200:
            raise AssertionError(f"status {response.status}")
        server = response.header("X-Server")
        if server not in self.world.echo_names:
            raise AssertionError(f"body from {server!r}")

    def _keepalive(self, index: int, state: dict[str, Any]) -> None:
        conn = self._conn(state, self.world.port)
        headers = {"X-User": f"u{state['n'] % 7}"}
        if state.get("cookie"):
            headers["Cookie"] = state["cookie"]
        response = conn.request("GET", f"/ka/{index}/{state['n']}", headers=headers)
        self._check(response)
        for value in response.header_all("Set-Cookie"):
            state["cookie"] = value.split(";")[0]

    def _per_request(self, index: int, state: dict[str, Any]) -> None:
        headers = {"Connection": "close"} if state["n"] % 2 else None
        with HttpConn(self.world.port, timeout=CLIENT_TIMEOUT) as conn:
            self._check(conn.request("GET", f"/pr/{index}/{state['n']}", headers=headers))

    def _slow(self, index: int, state: dict[str, Any]) -> None:
        conn = self._conn(state, self.world.port)
        self._check(conn.request("GET", f"/slow/{state['n']}?delay=0.2"))

    def _queued(self, index: int, state: dict[str, Any]) -> None:
        conn = self._conn(state, self.world.lim_port)
        response = conn.request("GET", f"/q/{index}/{state['n']}")
        if response.status != 200:
            raise AssertionError(f"status {response.status}")

    def _tunnel(self, index: int, state: dict[str, Any]) -> None:
        with HttpConn(self.world.port, timeout=CLIENT_TIMEOUT) as conn:
            conn.send(b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\n\r\n")
            response = conn.read_response()
            if response.status != 101:
                raise AssertionError(f"status {response.status} instead of 101")
            if conn.reader.read_exact(len(WS_GREETING)) != WS_GREETING:
                raise AssertionError("no greeting through the tunnel")
            for i in range(4):
                message = b"ping %d %d\n" % (state["n"], i)
                conn.send(message)
                if conn.reader.read_exact(len(message)) != message:
                    raise AssertionError("echo through the tunnel differs")
                time.sleep(0.05)

    # -- the long-lived tunnels ---------------------------------------------------------

    def long_names(self) -> list[str]:
        return [f"{kind}/{i}" for kind, count in LONG_TUNNELS.items() for i in range(count)]

    def _long(self, kind: str, index: int) -> None:
        """One long-lived tunnel: bursts of LONG_BURST numbered messages, each burst read
        back before the next; every one must come back once and in order. A tunnel pylb
        closes (end of stream, reset), an echo that differs (lost, doubled, reordered
        bytes) or one that never comes is a failure, and the tunnel is opened again.

        The exception: a step that kills processes (`World.fault`) while the tunnel was
        open. Its failures are allowed ("killed-tunnel"), and once the step is over the
        tunnel is closed and opened again, so that the next one counts in full. At the
        stop, a TCP-mode session half-closes and the server says how many bytes it got:
        every byte sent, once."""
        name = f"{kind}/{index}"
        world = self.world
        sock: socket.socket | None = None
        opened = 0.0  # when the tunnel's opening began
        seq = sent = 0  # messages and bytes sent on this tunnel
        try:
            while not self.stop_event.is_set():
                start = time.monotonic()
                try:
                    if sock is None:
                        opened, seq, sent = start, 0, 0
                        sock = self._open_long(kind)
                    burst = b"".join(b"%s %d %s\n" % (name.encode(), n, b"x" * (n % 53))
                                     for n in range(seq, seq + LONG_BURST))
                    sock.sendall(burst)
                    sent += len(burst)
                    got = recv_exact(sock, len(burst))
                    if len(got) < len(burst) and burst.startswith(got):
                        echoed = seq + got.count(b"\n")
                        raise ConnectionError(
                            f"end of stream: the tunnel was closed, {echoed} messages"
                            f" echoed (opened +{opened - self.ledger.t0:.3f}s)")
                    if got != burst:
                        raise AssertionError(f"echo differs after message {seq - 1}:"
                                             f" sent {burst[:80]!r}, got {got[:80]!r}")
                    seq += LONG_BURST
                    self.ledger.success(kind)
                    self.rounds[name] += 1
                except Exception as exc:  # recorded; the tunnel is opened again
                    faulted = world.faulted(opened, time.monotonic())
                    self.ledger.fail(kind, start, f"{name}: {type(exc).__name__}: {exc}",
                                     allowed="killed-tunnel" if faulted else None,
                                     decided=True)
                    if sock is not None:
                        sock.close()
                        sock = None
                    self.stop_event.wait(0.05)
                    continue
                if world.fault_over(opened):  # it may be a killed master's orphan's
                    sock.close()
                    sock = None
                    continue
                self.stop_event.wait(LONG_PAUSE)
        finally:
            if sock is not None:
                self._close_long(kind, name, sock, sent, opened)

    def _open_long(self, kind: str) -> socket.socket:
        port = self.world.ws_port if kind == "long-ws" else self.world.tcp_port
        sock = socket.create_connection((HOST, port), timeout=CLIENT_TIMEOUT)
        try:
            if kind == "long-tcp":
                if (banner := recv_exact(sock, len(TCP_BANNER))) != TCP_BANNER:
                    raise AssertionError(f"banner {banner!r}")
                return sock
            sock.sendall(b"GET /long HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\n\r\n")
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                if not (byte := sock.recv(1)):
                    raise ConnectionError(f"end of stream in the answer: {head!r}")
                head += byte
            if not head.startswith(b"HTTP/1.1 101 "):
                raise AssertionError(f"status {head[9:12].decode(errors='replace')}"
                                     f" instead of 101")
            if (greeting := recv_exact(sock, len(WS_GREETING))) != WS_GREETING:
                raise AssertionError(f"greeting {greeting!r}")
            return sock
        except BaseException:
            sock.close()
            raise

    def _close_long(self, kind: str, name: str, sock: socket.socket, sent: int,
                    opened: float) -> None:
        """Half-close: the server got every byte once (TCP mode: it says how many), and
        then closes."""
        start = time.monotonic()
        expected = b"BYE %d\n" % sent if kind == "long-tcp" else b""
        try:
            sock.shutdown(socket.SHUT_WR)
            got = bytearray()
            while data := sock.recv(4096):
                got += data
            if got != expected:
                raise AssertionError(f"at the end, the server got {bytes(got)!r} instead of"
                                     f" {expected!r}")
        except Exception as exc:
            faulted = self.world.faulted(opened, time.monotonic())
            self.ledger.fail(kind, start, f"{name}: {type(exc).__name__}: {exc}",
                             allowed="killed-tunnel" if faulted else None, decided=True)
        finally:
            sock.close()


# -- processes ---------------------------------------------------------------------------------


@dataclass
class MasterRef:
    pid: int
    popen: subprocess.Popen[bytes] | None = None  # started by us in the foreground

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            return psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
            sock.listen()
            return True
        except OSError:
            return False


class StatsAnswer(Exception):
    pass


# -- the world -------------------------------------------------------------------------------


class World:
    """See the module's docstring. `strict`: a broken invariant raises AssertionError (tests);
    otherwise it is recorded in `stats.violations` and the world goes on (the bench)."""

    def __init__(self, workdir: Path, *, seed: int = 0, stats: Stats | None = None,
                 strict: bool = True) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rnd = random.Random(seed)
        self.stats = stats or Stats()
        self.strict = strict
        self.ledger = Ledger(self.stats)
        self.log = LogFile(workdir / "pylb.log")
        self.config_path = workdir / "pylb.yml"
        self.map_path = workdir / "m.map"
        self.map_path.write_text(MAP_TEXT)
        self.sock_path = workdir / "lb.sock"
        self.pidfile = workdir / "pylb.pid"
        self.port, self.port2, self.port3, self.lim_port = (free_port() for _ in range(4))
        self.ws_port, self.tcp_port = free_port(), free_port()
        self.echos = [EchoBackend(f"e{i}") for i in range(3)]
        self.echo_names = {e.name for e in self.echos}
        self.ws_echo = EchoBackend("ws")  # the long-lived tunnels' servers
        self.tcp_echo = TcpBackend("echo")
        self.lim = CountingServer("q1", delay=0.05)
        self.lim.httpd.handle_error = lambda *_: None  # type: ignore[method-assign]
        self.spec = Spec()
        self.master: MasterRef | None = None
        self.masters: list[MasterRef] = []  # every master ever started
        self.clients: Clients | None = None
        self.stalled: list[socket.socket] = []
        self.lim_allowance = 0  # requests over maxconn the counting server may see now...
        self.lim_allow_until = 0.0  # ...until then, and until the orphans are gone
        self.orphans: set[int] = set()  # workers of a master killed with -9
        self.takeovers = 0
        self.master_kills = 0
        # [start, end] of the steps that kill processes (end: inf while under way); a
        # long-lived tunnel open meanwhile may be cut
        self.faults: list[list[float]] = []
        self.retiring: list[tuple[threading.Thread, list[str]]] = []  # see _watch_retire
        # the long-lived tunnels' echoes at the last wait_progress: (after what, when, ...)
        self.tunnel_marks: tuple[str, float, dict[str, int]] | None = None
        self.closed = False

    # -- start, stop --------------------------------------------------------------------

    def render(self, spec: Spec | None = None) -> dict[str, Any]:
        spec = spec or self.spec
        servers = {}
        for name, s in spec.servers.items():
            server: dict[str, Any] = {"address": self.echos[s.echo].address,
                                      "weight": s.weight}
            if s.maxconn:
                server["maxconn"] = s.maxconn
            if spec.cookie:
                server["cookie"] = name
            if spec.checks:
                server.update({"check": True, "inter": "300ms"})
            servers[name] = server
        app: dict[str, Any] = {"balance": spec.balance}
        if spec.checks:
            app["http-check"] = {"method": "GET", "path": "/", "expect": 200}
        if spec.cookie:
            app["cookie"] = {"name": "SRV", "mode": "insert", "indirect": True,
                             "nocache": True}
        if spec.stick:
            app["stick-table"] = {"type": "ip", "size": spec.stick}
            app["stick-on"] = "src"
        app["servers"] = servers
        www: dict[str, Any] = {
            "bind": [f"{HOST}:{self.port}", f"{HOST}:{self.port2}"] if spec.second_bind
            else f"{HOST}:{self.port}",
            "default_backend": "app",
        }
        rules = []
        if spec.header_rule:
            rules.append("set-header X-A b")
        if spec.map_rule:
            rules.append("set-header X-M %[path,map(m,none)]")
        if rules:
            www["http-request"] = rules
        frontends: dict[str, Any] = {
            "www": www,
            "q": {"bind": f"{HOST}:{self.lim_port}", "default_backend": "lim"},
        }
        if spec.second_frontend:
            frontends["extra"] = {"bind": f"{HOST}:{self.port3}", "default_backend": "app"}
        frontends["ws"] = {"bind": f"{HOST}:{self.ws_port}", "default_backend": "wsb"}
        frontends["tcp"] = {"bind": f"{HOST}:{self.tcp_port}", "mode": "tcp",
                            "default_backend": "tcpb"}
        cfg: dict[str, Any] = {
            "global": {"workers": WORKERS, "log": str(self.workdir / "pylb.log"),
                       "hard-stop-after": "20s",
                       "stats": {"socket": str(self.sock_path), "level": "admin",
                                 "expose-fd": "listeners"}},
            "defaults": {"mode": "http",
                         "timeout": {"connect": "2s", "client": "10s", "server": "10s",
                                     "queue": "10s", "http-keep-alive": "10s"}},
            "frontends": frontends,
            "backends": {
                "app": app,
                "lim": {"servers": {"q1": {"address": self.lim.address,
                                           "maxconn": LIM_MAXCONN}}},
                "wsb": {"servers": {"w1": {"address": self.ws_echo.address}}},
                "tcpb": {"mode": "tcp",
                         "servers": {"t1": {"address": self.tcp_echo.address}}},
            },
        }
        if spec.map_rule:
            cfg["maps"] = {"m": str(self.map_path)}
        return cfg

    def write_config(self, text: str | None = None) -> None:
        if text is None:
            text = yaml.safe_dump(self.render(), sort_keys=False)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _start_foreground(self) -> MasterRef:
        out = open(self.workdir / "pylb.out", "ab")  # noqa: SIM115 (kept by the child)
        try:
            popen = subprocess.Popen(
                [*PYLB, "-f", str(self.config_path)], cwd=self.workdir, env=self._env(),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        finally:
            out.close()
        ref = MasterRef(popen.pid, popen)
        self.masters.append(ref)
        return ref

    def start(self, load: bool = True) -> None:
        """Start pylb on the initial configuration, then the clients."""
        self.stats.worlds += 1
        self.write_config()
        mark = self.log.mark()
        self.master = self._start_foreground()
        if not self.log.wait(rf"pylb\[{self.master.pid}\] master: generation 1 ready",
                             START_TIMEOUT, mark):
            raise AssertionError("pylb did not start:\n" + self.tail())
        if load:
            self.clients = Clients(self)
            self.wait_progress("start")

    def close(self) -> list[str]:
        """Stop everything; the problems seen on the way out (also raised when strict)."""
        if self.closed:
            return []
        self.closed = True
        problems: list[str] = []
        try:
            if self.clients is not None:
                problems += self._tunnels_moved()
                self.clients.stop()
                if hung := self.clients.hung():
                    problems.append(f"clients still running after the stop: {hung}")
            for sock in self.stalled:
                sock.close()
            self.stalled.clear()
            problems += self._retired(wait=True)
            problems += self._violations(self.ledger.classify())
            live = [m for m in self.masters if m.alive()]  # a takeover's too, if it hung
            for master in live:
                os.kill(master.pid, signal.SIGTERM)
            if not wait_until(lambda: not any(m.alive() for m in live), 15):
                problems.append("masters that did not exit on SIGTERM: "
                                f"{[m.pid for m in live if m.alive()]}")
            if not wait_until(lambda: not self.processes(), 15, 0.05):
                problems.append("pylb processes left after the stop: " + ", ".join(
                    f"{p.pid} {' '.join(p.cmdline())}" for p in self.processes()))
        finally:
            for process in self.processes():
                with contextlib.suppress(psutil.Error):
                    process.kill()
            for ref in self.masters:
                if ref.popen is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        ref.popen.wait(5)
            for echo in (*self.echos, self.ws_echo, self.tcp_echo):
                echo.stop()
            self.lim.stop()
        if self.stats.echo:
            print(f"world {self.workdir.name}: " + self.history(), file=sys.stderr, flush=True)
        if problems:
            self.stats.violations += problems
            if self.strict:
                raise AssertionError("\n".join(problems) + "\n" + self.tail())
        return problems

    def processes(self) -> list[psutil.Process]:
        """Live pylb processes of this world: titled `pylb: ...`, running in its workdir."""
        found = []
        for process in psutil.process_iter(["cmdline", "status"]):
            try:
                cmdline = process.info["cmdline"] or []
                if not cmdline or not cmdline[0].startswith("pylb:"):
                    continue
                if process.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                if Path(process.cwd()) == self.workdir:
                    found.append(process)
            except psutil.Error:
                continue
        return found

    def tail(self, lines: int = 40) -> str:
        self.log.refresh()
        return "pylb log, last lines:\n" + "\n".join(self.log.lines[-lines:])

    # -- the stats socket ---------------------------------------------------------------

    def cli(self, line: str | bytes, timeout: float = 5.0) -> str:
        data = line if isinstance(line, bytes) else line.encode() + b"\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.sock_path))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(data)
            out = bytearray()
            try:
                while chunk := sock.recv(65536):
                    out += chunk
            except ConnectionResetError:
                pass
        return out.decode("utf-8", "replace")

    def show_proc(self) -> tuple[int, int, dict[int, tuple[int, str]]]:
        """(generation, reloads, current workers: pid -> (generation, connections))."""
        answer = self.cli("show proc")
        lines = answer.splitlines()
        if len(lines) < 2 or lines[1].split()[:2] != [str(self.master_pid), "master"]:
            raise StatsAnswer(f"show proc: {answer!r}")
        master = lines[1].split()
        workers: dict[int, tuple[int, str]] = {}
        current = False
        for line in lines[2:]:
            if line.startswith("#"):
                current = line == "# workers"
            elif line and current:
                pid, _kind, gen, _reloads, _uptime, conns = line.split()
                workers[int(pid)] = (int(gen), conns)
        return int(master[2]), int(master[3]), workers

    def old_workers(self, answer: str | None = None) -> dict[int, str]:
        """The old workers `show proc` (or its `answer`) lists: pid -> why it stays ("" when
        it says nothing)."""
        old = False
        found = {}
        answer = self.cli("show proc") if answer is None else answer
        for line in answer.splitlines():
            if line.startswith("#"):
                old = line == "# old workers"
            elif old and line.strip():
                fields = line.split(None, 6)
                found[int(fields[0])] = fields[6].strip() if len(fields) > 6 else ""
        return found

    @property
    def master_pid(self) -> int:
        assert self.master is not None
        return self.master.pid

    # -- checks -------------------------------------------------------------------------

    def _violations(self, real: list[Failure]) -> list[str]:
        problems = []
        if real:
            t0 = self.ledger.t0
            lines = []
            steps = self.ledger.steps

            def where(index: int) -> str:
                if index < 0:
                    return "the start"
                return f"step {index} {steps[index].kind} ({steps[index].detail})"

            for f in real[:12]:
                when = f"during {where(f.begun)}"
                if f.failed != f.begun:
                    when = f"begun during {where(f.begun)}, failed during {where(f.failed)}"
                lines.append(f"  {f.describe(t0)}; {when}")
            problems.append(f"{len(real)} requests failed:\n" + "\n".join(lines))
        if self.lim.max_seen > LIM_MAXCONN + self.lim_allowance:
            problems.append(f"the counting server saw {self.lim.max_seen} requests at once,"
                            f" maxconn {LIM_MAXCONN}")
        return problems

    def problem(self, message: str) -> None:
        master = self.master
        if master is not None and "is gone" not in message and not master.alive():
            status = master.popen.returncode if master.popen is not None else "?"
            message += f" [the master {master.pid} is gone: exit status {status}]"
        self.stats.violations.append(message)
        if self.strict:
            report = message + "\n" + self.history() + "\n" + self.tail()
            # Hypothesis runs a failing example again to report it, and a failure that
            # depends on timing may show differently then (FlakyFailure): the first one
            # is written out here, in full, for pytest's captured output.
            print(f"chaos world {self.workdir}: {report}", file=sys.stderr, flush=True)
            raise AssertionError(report)

    def history(self) -> str:
        t0 = self.ledger.t0
        return "steps:\n" + "\n".join(
            f"  {s.index}: +{s.start - t0:.3f}s {s.kind} {s.detail}" for s in self.ledger.steps)

    def check(self) -> None:
        """The invariants (see the module's docstring)."""
        if self.master is None or self.closed:
            return
        if not self.master.alive():
            popen = self.master.popen
            how = f" (exit status {popen.returncode})" if popen is not None else ""
            self.problem(f"the master {self.master.pid} is gone{how}")
            self._recover()
            return
        try:
            self.show_proc()
        except (OSError, StatsAnswer) as exc:
            self.problem(f"show proc does not answer: {exc!r}")
        for message in self._retired(wait=False):
            self.problem(message)
        self._settle_limits()
        for message in self._violations(self.ledger.classify()):
            self.problem(message)

    def _settle_limits(self) -> None:
        """Once the workers of a killed master are gone, and the requests a killed worker
        left at the counting server are answered, its limit is exact again."""
        if self.orphans and not any(_not_zombie(p) for p in self.orphans):
            self.orphans.clear()
        if self.lim_allowance and not self.orphans and time.monotonic() > self.lim_allow_until:
            self.lim_allowance = 0
            with self.lim.cond:
                self.lim.max_seen = self.lim.in_flight

    def _recover(self) -> None:
        """Not strict, the master gone: a new one, so that the run goes on."""
        with self.fault():
            for process in self.processes():
                with contextlib.suppress(psutil.Error):
                    process.kill()
            wait_until(lambda: port_free(self.port), 5)
            self.write_config()
            mark = self.log.mark()
            self.master = self._start_foreground()
            self.log.wait(rf"pylb\[{self.master.pid}\] master: generation 1 ready",
                          START_TIMEOUT, mark)

    def wait_progress(self, what: str, kinds: tuple[str, ...] = ("keepalive", "per-request",
                                                                   "queued")) -> None:
        """Every kind of client gets at least one answer after `what`, and every
        long-lived tunnel an echo (that one is checked at the next step's end, or at the
        close: by then it has come, and nobody waits for it)."""
        if self.clients is None:
            return
        clients = self.clients
        before = {kind: self.ledger.successes(kind) for kind in kinds}
        stuck = [k for k in kinds if not wait_until(
            lambda k=k: self.ledger.successes(k) > before[k], PROGRESS_TIMEOUT)]
        if stuck:
            self.problem(f"no progress of {stuck} within {PROGRESS_TIMEOUT}s after {what}")
        for message in self._tunnels_moved():
            self.problem(message)
        self.tunnel_marks = (what, time.monotonic(),
                             {name: clients.rounds[name] for name in clients.long_names()})

    def _tunnels_moved(self) -> list[str]:
        """Every long-lived tunnel had an echo after the last `wait_progress`."""
        if self.clients is None or self.tunnel_marks is None:
            return []
        clients = self.clients
        what, since, rounds = self.tunnel_marks
        self.tunnel_marks = None
        stuck = [name for name in rounds if not wait_until(
            lambda name=name: clients.rounds[name] > rounds[name],
            max(0.0, since + PROGRESS_TIMEOUT - time.monotonic()))]
        return [f"no echo on the long-lived tunnels {stuck} within {PROGRESS_TIMEOUT}s"
                f" after {what}"] if stuck else []

    def probe(self, what: str) -> None:
        """A request on a new connection sees the configuration in force."""
        spec = self.spec
        try:
            with HttpConn(self.port, timeout=CLIENT_TIMEOUT) as conn:
                response = conn.request("GET", "/probe")
        except (OSError, IncompleteResponse) as exc:
            self.problem(f"after {what}: the probe failed: {exc!r}")
            return
        expected = {self.echos[s.echo].name for s in spec.servers.values()}
        problems = []
        if response.status != 200:
            problems.append(f"status {response.status}")
        else:
            headers = {n.lower(): v for n, v in json.loads(response.body)["headers"]}
            if response.header("X-Server") not in expected:
                problems.append(f"served by {response.header('X-Server')}, not one of"
                                f" {sorted(expected)}")
            if (headers.get("x-a") == "b") != spec.header_rule:
                problems.append(f"X-A header {headers.get('x-a')!r}")
            if headers.get("x-m") != ("hit" if spec.map_rule else None):
                problems.append(f"X-M header {headers.get('x-m')!r}")
            cookie = any(v.startswith("SRV=") for v in response.header_all("Set-Cookie"))
            if cookie != spec.cookie:
                problems.append(f"Set-Cookie SRV {'sent' if cookie else 'missing'}")
        for on, port, name in ((spec.second_bind, self.port2, "second bind"),
                               (spec.second_frontend, self.port3, "second frontend")):
            if on:
                try:
                    with HttpConn(port, timeout=CLIENT_TIMEOUT) as conn:
                        status = conn.request("GET", "/probe2").status
                    if status != 200:
                        problems.append(f"{name}: status {status}")
                except (OSError, IncompleteResponse) as exc:
                    problems.append(f"{name}: {exc!r}")
        if problems:
            self.problem(f"after {what}, the configuration is not in force: {problems}")

    def _finish(self, step: Step) -> None:
        step.end = time.monotonic()
        self.stats.step_time[step.kind] += step.end - step.start

    # -- faults: steps that may cut the long-lived tunnels ------------------------------

    @contextlib.contextmanager
    def fault(self) -> Iterator[None]:
        """A step that kills processes is under way: the long-lived tunnels open meanwhile
        may be cut, and are opened again once it is over."""
        span = [time.monotonic(), math.inf]
        self.faults.append(span)
        try:
            yield
        finally:
            span[1] = time.monotonic()

    def faulted(self, opened: float, now: float) -> bool:
        """Whether a fault step overlaps from `opened` to `now` (a tunnel's life)."""
        return any(start <= now and end >= opened for start, end in self.faults)

    def fault_over(self, opened: float) -> bool:
        """Whether a fault step that overlaps a tunnel opened at `opened` is over."""
        now = time.monotonic()
        return any(start <= now and opened <= end <= now for start, end in self.faults)

    # -- after a reload: only the current generation remains ----------------------------

    def _watch_retire(self, step: Step, since: float) -> None:
        """A reload of the current master was done at `since`: within OLD_GONE_WITHIN,
        only its current generation's workers, itself and its worker template remain
        (and the orphans of a killed master), but for old workers whose row in `show
        proc` says why they stay. Watched in a thread, the run going on: `check` reports
        what a finished watch found, `close` waits for them all."""
        master = self.master_pid
        generation = self.show_proc()[0]
        leaving = self._lingering(master, generation)  # what must go
        problems: list[str] = []
        thread = threading.Thread(target=self._retire_watch, daemon=True,
                                  args=(step, master, leaving, since, problems),
                                  name=f"chaos-retire-{step.index}")
        thread.start()
        self.retiring.append((thread, problems))

    def _retired(self, wait: bool) -> list[str]:
        """What the finished watches of old generations found (`wait`: all of them)."""
        problems = []
        for thread, found in list(self.retiring):
            if wait:
                thread.join(OLD_GONE_WITHIN + 10)
            if not thread.is_alive():
                problems += found
                self.retiring.remove((thread, found))
            elif wait:
                problems.append(f"{thread.name}: still watching")
        return problems

    def _lingering(self, master: int, generation: int) -> dict[int, str]:
        """This world's pylb processes other than `master`, its template, its workers of
        `generation` on and the orphans: pid -> title."""
        found = {}
        for process in self.processes():
            try:
                title = " ".join(process.cmdline()).strip()
                ppid = process.ppid()
            except psutil.Error:
                continue
            if process.pid == master or process.pid in self.orphans:
                continue
            if ppid == master:
                if title == "pylb: worker template":
                    continue
                m = re.fullmatch(r"pylb: worker \d+/\d+ \[gen (\d+)\]", title)
                if m and int(m.group(1)) >= generation:
                    continue
            found[process.pid] = title
        return found

    def _retire_watch(self, step: Step, master: int, leaving: dict[int, str], since: float,
                      problems: list[str]) -> None:
        def left() -> dict[int, str]:
            return {pid: title for pid, title in leaving.items()
                    if pid not in self.orphans and _not_zombie(pid)}

        deadline = since + OLD_GONE_WITHIN
        try:
            while (lingering := left()) and time.monotonic() < deadline:
                time.sleep(0.02)
            if not lingering:
                return
            # Past the deadline: an old worker that says why it stays may, one that says
            # nothing must be on its way out (what kept it just ended: it exits after
            # EXIT_GRACE, 50 ms).
            # (A takeover or a master's kill -9 since: the old pylb is the watch of that
            # step, or orphans.)
            staying: dict[int, str] = {}
            slack = time.monotonic() + EXIT_SLACK
            answer = ""
            while lingering:
                with contextlib.suppress(OSError):
                    answer = self.cli("show proc")
                if self.master_pid != master or f"\n{master} " not in answer:
                    return  # whose answer?
                staying |= {p: why for p, why in self.old_workers(answer).items() if why}
                if all(p in staying for p in lingering) or time.monotonic() >= slack:
                    break
                time.sleep(0.02)
                lingering = left()
            late = time.monotonic() - since
            for pid in sorted(lingering):
                if pid in staying:
                    step.detail += f"; old worker {pid} stays: {staying[pid]}"
                else:
                    problems.append(
                        f"{lingering[pid]!r} (pid {pid}) still runs {late:.2f}s after step"
                        f" {step.index} {step.kind} ({step.detail}), and show proc says"
                        f" nothing of why:\n{answer}")
        except Exception as exc:  # a watch that breaks says so
            problems.append(f"after step {step.index} {step.kind}: the watch of the old"
                            f" generation failed: {exc!r}")

    # -- steps ------------------------------------------------------------------------

    def step_reload(self, method: str, mutation: str = "none", choice: int = 0) -> None:
        """A valid reload by `method` (SIGUSR2, SIGHUP, socket) with one mutation."""
        spec = copy.deepcopy(self.spec)
        detail = mutate(spec, mutation, choice)
        step = self.ledger.begin(f"reload-{method}", detail)
        old_spec, self.spec = self.spec, spec
        self.write_config()
        gen, reloads, _ = self.show_proc()
        mark = self.log.mark()
        pid = self.master_pid
        answer = ""
        if method == "socket":
            answer = self.cli("reload", timeout=RELOAD_TIMEOUT)
        else:
            os.kill(pid, getattr(signal, method))
        found = self.log.wait(rf"pylb\[{pid}\] master: (reload \d+ done|reload failed.*)",
                              RELOAD_TIMEOUT, mark)
        done = time.monotonic()
        self._finish(step)
        if method == "socket" and not answer.startswith("Success=1\n"):
            self.spec = old_spec
            self.write_config()
            self.problem(f"reload ({detail}) refused: {answer!r}")
            return
        if found is None or not found.group(1).startswith("reload "):
            self.spec = old_spec
            self.write_config()
            self.problem(f"reload by {method} ({detail}): "
                         f"{found.group(1) if found else 'no answer in the log'}")
            return
        self._watch_retire(step, done)
        new_gen, new_reloads, _ = self.show_proc()
        if (new_gen, new_reloads) != (gen + 1, reloads + 1):
            self.problem(f"after a reload: generation {new_gen}, reloads {new_reloads};"
                         f" before {gen}, {reloads}")
        self.probe(f"reload by {method} ({detail})")
        self.wait_progress(f"reload by {method} ({detail})")

    def step_invalid_reload(self, method: str, typo: int) -> None:
        """A reload of a file with a typo: refused, and nothing changes."""
        good = yaml.safe_dump(self.render(), sort_keys=False)
        right, wrong = TYPOS[typo % len(TYPOS)]
        bad = good.replace(right, wrong, 1)
        assert bad != good, right
        step = self.ledger.begin(f"invalid-{method}", wrong.strip())
        before = self.show_proc()
        self.write_config(bad)
        mark = self.log.mark()
        pid = self.master_pid
        try:
            if method == "socket":
                answer = self.cli("reload", timeout=RELOAD_TIMEOUT)
                if not answer.startswith("Success=0\n--\n"):
                    self.problem(f"an invalid reload answered {answer!r}")
            else:
                os.kill(pid, getattr(signal, method))
            found = self.log.wait(rf"pylb\[{pid}\] master: (reload failed, the running "
                                  rf"configuration stays|reload \d+ done)", RELOAD_TIMEOUT, mark)
        finally:
            self.write_config(good)
        self._finish(step)
        if found is None or not found.group(1).startswith("reload failed"):
            self.problem(f"an invalid reload ({wrong.strip()}) was not refused: "
                         f"{found.group(1) if found else 'nothing logged'}")
        after = self.show_proc()
        if after != before:
            gen0, rel0, w0 = before
            gen1, rel1, w1 = after
            if (gen0, rel0, set(w0)) != (gen1, rel1, set(w1)):
                self.problem(f"an invalid reload changed something: {before} -> {after}")
        self.probe("an invalid reload")

    def _workers(self) -> tuple[int, list[tuple[int, int, float]]]:
        """The current generation and its workers: (pid, index, uptime in seconds)."""
        gen, _reloads, workers = self.show_proc()
        found = []
        for pid in sorted(workers):
            try:
                process = psutil.Process(pid)
                title = " ".join(process.cmdline())
                uptime = time.time() - process.create_time()
            except psutil.Error:
                continue
            if m := re.search(r"worker (\d+)/", title):
                found.append((pid, int(m.group(1)), uptime))
        return gen, found

    def step_kill_worker(self, index: int) -> None:
        """`kill -9` a worker of the current generation, however young: the master starts
        another at once (a kill from outside is no crash loop)."""
        gen, workers = self._workers()
        if not workers:
            self.problem("no current worker to kill")
            return
        victim, windex, uptime = workers[index % len(workers)]
        step = self.ledger.begin("kill-worker", f"pid {victim} (worker {windex},"
                                               f" up {uptime:.1f}s)")
        mark = self.log.mark()
        with self.fault():  # its tunnels are cut
            killed = time.monotonic()
            self.lim_allowance = LIM_MAXCONN  # its requests at the server run on
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
            started = self.log.wait(
                rf"pylb\[{self.master_pid}\] master: worker {windex}/\d+ gen {gen} started"
                rf" \(pid (\d+)[,)]", 10, mark)
            new = int(started.group(1)) if started else 0
            ready = started is not None and wait_until(
                lambda: self.show_proc()[2].get(new, (0, "?"))[1] != "?", 10, 0.05)
        step.allow.append(Allow(killed, time.monotonic() + KILL_GRACE, "killed-worker"))
        self.lim_allow_until = time.monotonic() + 1.0
        self._finish(step)
        if not ready:
            self.problem(f"worker {victim} killed: no replacement accepts within 10 s")
            return
        self.wait_progress(f"kill -9 of worker {victim}")

    def step_kill_master(self) -> None:
        """`kill -9` the master: the ports are free within 1 s, its workers finish what is
        in flight, and a new pylb started at once serves."""
        step = self.ledger.begin("kill-master", f"pid {self.master_pid}")
        self.master_kills += 1
        old = self.master
        assert old is not None
        try:
            self.orphans |= {p.pid for p in psutil.Process(old.pid).children()}
        except psutil.NoSuchProcess:
            pass
        ports = [self.port, self.lim_port]
        ports += [self.port2] if self.spec.second_bind else []
        ports += [self.port3] if self.spec.second_frontend else []
        ports += [self.ws_port, self.tcp_port]
        with self.fault():  # its tunnels stay with the orphans: opened again after
            # the killed master's keeper may have granted every slot: its orphaned workers
            # finish those requests while the new pylb grants its own
            self.lim_allowance = LIM_MAXCONN
            killed = time.monotonic()
            os.kill(old.pid, signal.SIGKILL)
            # pylb's one known loss: an idle keep-alive connection that an older generation
            # was handing to the master for the new one, in the instant the master dies (the
            # descriptor is in flight in the master's socket and closes with it)
            if any(s.kind.startswith(("reload", "takeover")) and s.start > killed - HANDOVER_WINDOW
                   for s in self.ledger.steps):
                step.allow.append(Allow(killed, killed + 0.1, "in-handover",
                                        reason="end of stream"))
            freed = wait_until(lambda: all(port_free(p) for p in ports), PORT_FREE_WITHIN, 0.005)
            took = time.monotonic() - killed
            mark = self.log.mark()
            self.master = self._start_foreground()
            ready = self.log.wait(rf"pylb\[{self.master.pid}\] master: generation 1 ready",
                                  START_TIMEOUT, mark)
            # begun while nobody accepted: may fail (refused, or closed unanswered)
            step.allow.append(Allow(killed, time.monotonic(), "master-down", begun_after=killed))
        self._finish(step)
        if old.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                old.popen.wait(1)
        if not freed:
            busy = [p for p in ports if not port_free(p)]
            self.problem(f"ports {busy} still held {PORT_FREE_WITHIN}s after the master's"
                         f" kill -9")
        if ready is None:
            self.problem("the restarted pylb did not start:\n" + self.tail())
            return
        step.detail += f", ports free in {took * 1000:.0f} ms"
        self.probe("a restart after kill -9 of the master")
        self.wait_progress("a restart after kill -9 of the master")

    def step_takeover(self, mutation: str = "none", choice: int = 0) -> None:
        """`pylb -f CFG -p PIDFILE -D -sf OLDPID`, with one mutation: the new process takes
        the sockets and the state, the old one finishes and exits."""
        spec = copy.deepcopy(self.spec)
        detail = mutate(spec, mutation, choice)
        step = self.ledger.begin("takeover", detail)
        self.takeovers += 1
        old = self.master
        assert old is not None
        old_spec, self.spec = self.spec, spec
        self.write_config()
        mark = self.log.mark()
        done = subprocess.run(
            [*PYLB, "-f", str(self.config_path), "-p", str(self.pidfile), "-D",
             "-sf", str(old.pid)],
            cwd=self.workdir, env=self._env(), stdin=subprocess.DEVNULL,
            capture_output=True, timeout=30)
        if done.returncode != 0:
            self._finish(step)
            self.spec = old_spec
            self.write_config()
            self.problem(f"takeover ({detail}): pylb -D exited {done.returncode}:"
                         f" {done.stderr.decode(errors='replace')}")
            return
        sent = self.log.wait(rf"pylb\[(\d+)\] master: sent SIGUSR1 to old process {old.pid}",
                             START_TIMEOUT, mark)
        if sent is None:
            self._finish(step)
            with contextlib.suppress(OSError, ValueError):  # stopped with the rest
                self.masters.append(MasterRef(int(self.pidfile.read_text())))
            self.problem(f"takeover ({detail}): the new pylb never said it was ready")
            return
        self.master = MasterRef(int(sent.group(1)))
        self.masters.append(self.master)
        told = time.monotonic()
        self._watch_retire(step, told)  # the old pylb goes whole
        gone = wait_until(lambda: not old.alive(), OLD_MASTER_EXIT, 0.02)
        self._finish(step)
        step.detail += f", the old master gone in {(time.monotonic() - told) * 1000:.0f} ms"
        if old.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                old.popen.wait(1)
        pid_text = self.pidfile.read_text().strip() if self.pidfile.exists() else ""
        if pid_text != str(self.master.pid):
            self.problem(f"takeover: pidfile says {pid_text!r}, the master is"
                         f" {self.master.pid}")
        if not gone:
            self.problem(f"takeover: the old master {old.pid} still runs"
                         f" {OLD_MASTER_EXIT}s later")
        self.probe(f"takeover ({detail})")
        self.wait_progress(f"takeover ({detail})")

    STATS_COMMANDS = (
        "show info", "show stat", "show servers state", "show proc", "show sess", "help",
        "show table", "show map", "show nope", "set server app/nope state ready",
        "set weight", "set weight app/{server} 2", "set server app/{server} state drain",
        "set server app/{server} state ready", "disable server app/{server}",
        "enable server app/{server}", "long", "garbage", "prompt", "show info;show stat;",
    )

    def step_stats(self, command: str, choice: int = 0) -> None:
        """One command on the stats socket, good or bad: answered, the master unmoved."""
        rnd = random.Random(choice)
        server = rnd.choice(sorted(self.spec.servers))
        if command == "long":
            line: str | bytes = b"show info " + b"x" * 70000 + b"\n"
        elif command == "garbage":
            line = bytes(b if b != 0x5F else 0x20 for b in rnd.randbytes(3000)) + b"\n"
        elif command == "prompt":
            line = b"prompt\nshow info\nquit\n"
        else:
            line = command.format(server=server)
        step = self.ledger.begin("stats", command.format(server=server))
        try:
            answer = self.cli(line, timeout=5)
        except OSError as exc:
            self._finish(step)
            self.problem(f"stats socket, {command!r}: {exc!r}")
            return
        if command.startswith("disable server"):  # and at once back: traffic must flow
            self.cli(f"enable server app/{server}")
        if "state drain" in command:
            self.cli(f"set server app/{server} state ready")
        self._finish(step)
        if command in ("show nope", "set server app/nope state ready", "set weight") and (
                answer.strip() == ""):
            self.problem(f"{command!r} answered nothing")
        started = time.monotonic()
        info = self.cli("show info")
        if not info.startswith("Name: pylb") or time.monotonic() - started > 1.0:
            self.problem(f"after {command!r}: show info answered {info[:80]!r} in"
                         f" {time.monotonic() - started:.2f}s")

    def step_stall(self, kind: str) -> None:
        """A client of the stats socket that connects and never sends (`silent`), or asks
        for `_handover` and never reads (`handover`): the master must not care."""
        step = self.ledger.begin("stall", kind)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(str(self.sock_path))
        if kind == "handover":
            sock.sendall(b"_handover\n")
        self.stalled.append(sock)
        try:
            started = time.monotonic()
            info = self.cli("show info")
            if not info.startswith("Name: pylb") or time.monotonic() - started > 1.0:
                self.problem(f"with a stalled {kind} client: show info answered"
                             f" {info[:80]!r}")
            self.wait_progress(f"a stalled {kind} client of the stats socket")
        finally:
            sock.close()  # the stall lasts one step
            self.stalled.remove(sock)
            self._finish(step)

    def step_pause(self, reload: bool) -> None:
        """`set maxconn frontend www 0`: new connections wait (through a reload, too), then
        the frontend resumes and serves them."""
        step = self.ledger.begin("pause", "with a reload" if reload else "")
        answer = self.cli("set maxconn frontend www 0")
        waiting = HttpConn(self.port, timeout=CLIENT_TIMEOUT)
        problems = []
        try:
            waiting.send(b"GET /paused HTTP/1.1\r\nHost: p\r\n\r\n")
            if answer != "\n":
                problems.append(f"set maxconn frontend www 0: {answer!r}")
            if reload:
                mark = self.log.mark()
                answer = self.cli("reload", timeout=RELOAD_TIMEOUT)
                if not answer.startswith("Success=1"):
                    problems.append(f"reload while paused: {answer!r}")
                if self.log.wait(rf"pylb\[{self.master_pid}\] master: reload \d+ done", 5,
                                 mark):
                    self._watch_retire(step, time.monotonic())
            else:
                time.sleep(0.2)
            waiting.sock.settimeout(0.2)
            try:
                early = waiting.sock.recv(1, socket.MSG_PEEK)
                problems.append(f"a paused frontend answered: {early!r}")
            except (TimeoutError, BlockingIOError):
                pass
            waiting.sock.settimeout(CLIENT_TIMEOUT)
        finally:
            answer = self.cli("set maxconn frontend www 4096")
            if answer != "\n":
                problems.append(f"set maxconn frontend www 4096: {answer!r}")
        try:
            status = waiting.read_response().status
            if status != 200:
                problems.append(f"the waiting request got {status}")
        except (OSError, IncompleteResponse) as exc:
            problems.append(f"the waiting request: {exc!r}")
        finally:
            waiting.close()
        self._finish(step)
        if problems:
            self.problem(f"pause: {problems}")
        self.wait_progress("a paused frontend resumed")


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextlib.contextmanager
def world(workdir: Path, **options: Any) -> Iterator[World]:
    """A started world, closed (and checked) at the end."""
    w = World(workdir, **options)
    try:
        w.start()
        yield w
    except BaseException:
        with contextlib.suppress(Exception):
            w.strict = False
            w.close()
        raise
    w.close()
