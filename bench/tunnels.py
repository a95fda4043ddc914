"""The tunnel scenario of bench/reload.py (`--tunnels N`): long-lived WebSocket and TCP
tunnels through an HTTP and a TCP frontend of one proxy, to the echo servers of
bench/tunnels_echo.py, while the proxy is reloaded; after each reload, the workers alive,
the proxy's memory and how long the old generation took to exit. reload.py parses the
options and calls `main`; the proxies (subjects), their reload methods and the checks both
scenarios share are reload.py's. See bench/README.md, "Tunnels through reloads".
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import re
import resource
import select
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from reload import (
    ALL_METHODS,
    DESCRIPTION,
    MIB,
    NOTABLE,
    POLL,
    RELOAD_WAIT,
    SPAWNED,
    TUNNEL_BURST,
    TUNNEL_SETTLE,
    WORKERS,
    Options,
    Subject,
    _running,
    align,
    count_reload,
    drain,
    log,
    make_subject,
    mib,
    plan,
    print_notable,
    report_end,
    run_scenario,
    spawn,
    stop_subject,
)

from bench import (
    READY_TIMEOUT,
    BenchError,
    Tools,
    fmt,
    free_ports,
    port_accepts,
    psutil,
    run_meta,
    wait_ready,
)

TUNNEL_WARMUP = 1.0  # seconds of talk before the first reload
ECHO_TIMEOUT = 10.0  # a tunnel without its echo this long is lost
CLIENT_ANSWER = 120.0  # the tunnel clients answer a command within this
ECHO_SCRIPT = Path(__file__).resolve().parent / "tunnels_echo.py"
# a stopping pylb worker's log line (lb.worker): "handed over to the next generation: 14 tunnels"
HANDED_RE = re.compile(r"handed over to the next generation: .*")
HANDED_TUNNELS = re.compile(r"(\d+) tunnels?\b")
# a proxy process that died of a segmentation fault (HAProxy -W: "exited with code 139")
CRASH_RE = re.compile(r"Segmentation fault|SIGSEGV|code 139|signal 11\b")


# --------------------------------------------------------------------------- proxies


@dataclass(frozen=True)
class TunnelLayout:
    """The tunnel scenario's second frontend: the subject's `port` is an HTTP frontend in
    front of `backends` (WebSocket echo servers), `tcp_port` a TCP frontend in front of
    `tcp_backends` (byte echo servers). The subjects of reload.py ask it for their
    configuration instead of bench.py's."""

    tcp_port: int
    tcp_backends: tuple[int, int]
    tunnels: int

    @property
    def maxconn(self) -> int:
        return max(4096, 4 * self.tunnels)

    def pylb_config(self, port: int, backends: tuple[int, int]) -> dict[str, Any]:
        """pylb: an HTTP and a TCP frontend, each with its roundrobin backend; `timeout
        tunnel` 1h (the clients talk all the time anyway)."""

        def servers(ports: tuple[int, int]) -> dict[str, Any]:
            return {f"s{i}": {"address": f"127.0.0.1:{p}"} for i, p in enumerate(ports, start=1)}

        return {
            "global": {"workers": WORKERS, "maxconn": self.maxconn},
            "defaults": {
                "mode": "http",
                "timeout": {"connect": "5s", "client": "30s", "server": "30s", "tunnel": "1h"},
            },
            "frontends": {
                "fe": {"bind": f"127.0.0.1:{port}", "mode": "http", "default_backend": "be"},
                "fe_tcp": {
                    "bind": f"127.0.0.1:{self.tcp_port}",
                    "mode": "tcp",
                    "default_backend": "be_tcp",
                },
            },
            "backends": {
                "be": {"mode": "http", "balance": "roundrobin", "servers": servers(backends)},
                "be_tcp": {
                    "mode": "tcp",
                    "balance": "roundrobin",
                    "servers": servers(self.tcp_backends),
                },
            },
        }

    def haproxy_config(self, port: int, backends: tuple[int, int]) -> str:
        """HAProxy: the same as pylb_config (`nbthread 1`, like bench.py)."""

        def servers(ports: tuple[int, int]) -> list[str]:
            return [f"server s{i} 127.0.0.1:{p}" for i, p in enumerate(ports, start=1)]

        sections = {
            "global": ["nbthread 1", f"maxconn {self.maxconn}"],
            "defaults": [
                "mode http",
                "timeout connect 5s",
                "timeout client 30s",
                "timeout server 30s",
                "timeout tunnel 1h",
                "option http-keep-alive",
            ],
            "frontend fe": [f"bind 127.0.0.1:{port}", "mode http", "default_backend be"],
            "frontend fe_tcp": [
                f"bind 127.0.0.1:{self.tcp_port}",
                "mode tcp",
                "default_backend be_tcp",
            ],
            "backend be": ["mode http", "balance roundrobin", *servers(backends)],
            "backend be_tcp": ["mode tcp", "balance roundrobin", *servers(self.tcp_backends)],
        }
        return "# generated by bench/reload.py (--tunnels)\n" + "".join(
            f"{title}\n" + "".join(f"    {line}\n" for line in lines) + "\n"
            for title, lines in sections.items()
        )


# --------------------------------------------------------------------------- echo


@dataclass(frozen=True)
class EchoPorts:
    """The ports of the tunnel scenario's echo server (bench/tunnels_echo.py server)."""

    ws: tuple[int, int]  # HTTP: 101 on an Upgrade, then echo
    tcp: tuple[int, int]  # echo


def start_echo(stack: contextlib.ExitStack, tmp: Path) -> EchoPorts:
    a, b, c, d = free_ports(4)
    ports = EchoPorts((a, b), (c, d))
    argv = [
        sys.executable,
        str(ECHO_SCRIPT),
        "server",
        "--ws",
        f"{a},{b}",
        "--tcp",
        f"{c},{d}",
    ]
    echo = spawn("echo", argv, tmp / "echo.log")
    stack.callback(echo.stop)
    wait_ready(echo, list(ports.ws))
    deadline = time.monotonic() + 20
    while not all(port_accepts(p) for p in ports.tcp):
        if time.monotonic() > deadline or not echo.alive():
            raise BenchError(f"echo server not listening on {ports.tcp}; log {echo.log_path}")
        time.sleep(0.05)
    return ports


def echo_stats(port: int) -> dict[str, int]:
    """The echo server's counters (connections upgraded, TCP connections accepted...)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/stats")
        return json.loads(conn.getresponse().read())
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise BenchError(f"echo server on {port}: /stats: {exc}") from exc
    finally:
        conn.close()


def tcp_echoes(port: int) -> None:
    """A TCP frontend that relays to the echo server (raises BenchError if not)."""
    deadline = time.monotonic() + READY_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"probe\n")
                got = b""
                while not got.endswith(b"\n"):
                    chunk = s.recv(64)
                    if not chunk:
                        break
                    got += chunk
                if got == b"probe\n":
                    return
                last = f"answer {got!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise BenchError(f"TCP frontend 127.0.0.1:{port} does not echo: {last}")


def raise_fd_limit() -> int:
    """Raise the soft limit of open files to the hard one (the proxies and the clients
    inherit it); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return fd_limit()


def fd_limit() -> int:
    """The soft limit of open files."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --------------------------------------------------------------------------- clients


class TunnelClients:
    """The tunnel clients (bench/tunnels_echo.py clients, own session): a command on its
    stdin, one JSON line on its stdout for each."""

    def __init__(self, rundir: Path, port: int, tcp_port: int, opts: Options, seed: int) -> None:
        assert opts.tunnels is not None
        watchdog = 120 + opts.tunnel_reloads * (TUNNEL_SETTLE + RELOAD_WAIT + 10)
        argv = [
            sys.executable,
            str(ECHO_SCRIPT),
            "clients",
            "--ws",
            str(port),
            "--tcp",
            str(tcp_port),
            "--interval",
            str(opts.tunnel_interval),
            "--burst",
            str(TUNNEL_BURST),
            "--echo-timeout",
            str(ECHO_TIMEOUT),
            "--seed",
            str(seed),
            "--max-seconds",
            str(watchdog),
        ]
        self.log_path = rundir / "clients.log"
        with open(self.log_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        SPAWNED.add(self.proc.pid)
        self._buf = b""

    def ask(self, command: str, timeout: float = CLIENT_ANSWER) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(command.encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise BenchError(f"tunnel clients: cannot send {command!r}: {exc}") from exc
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"tunnel clients: no answer to {command!r} in {timeout:.0f}s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    self.proc.wait(5)
                    raise BenchError(
                        f"tunnel clients exited with status {self.proc.returncode} "
                        f"(log {self.log_path})"
                    )
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        doc = json.loads(line)
        if doc.get("op") != command.split()[0]:
            raise BenchError(f"tunnel clients answered {doc.get('op')!r} to {command!r}: {doc}")
        return doc

    def close(self) -> None:
        """Wait for the clients to exit (after `stop`), or kill them."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(0 if self.proc.returncode is not None else 2)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()


def memory(procs: list[psutil.Process]) -> tuple[int, int]:
    """(RSS, PSS) summed over `procs`, in bytes."""
    rss = pss = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            full = proc.memory_full_info()
            rss, pss = rss + full.rss, pss + getattr(full, "pss", 0)
    return rss, pss


# --------------------------------------------------------------------------- one run


@dataclass
class TunnelSample:
    """After one reload, TUNNEL_SETTLE s after the script saw it done."""

    reload: int
    ok: bool
    reload_ms: float
    old: int  # processes of the older generations just before the reload (pylb -sf: and
    # the old master)
    old_gone_ms: float | None  # when the last of them was gone; None: one still ran
    old_left: int  # of them still running at the sample
    workers: int  # worker processes alive, every generation
    processes: int  # every process of the proxy
    rss: int
    pss: int
    open: int  # tunnels open as the clients see it
    lost: int  # tunnels lost so far
    msg_errors: int  # so far


@dataclass
class TunnelResult:
    proxy: str
    method: str
    description: str
    round: int
    tunnels: int
    port: int = 0
    tcp_port: int = 0
    opened: int = 0  # of the first `tunnels`
    open_failed: int = 0  # first ones and churned ones
    open_s: float | None = None
    churned: int = 0  # tunnels opened by churn
    reloads_asked: int = 0
    reloads: int = 0
    reload_failures: int = 0
    reload_errors: list[str] = field(default_factory=list)
    signals_resent: int = 0
    hung: str | None = None
    samples: list[TunnelSample] = field(default_factory=list)
    verify: dict[str, Any] | None = None
    final: dict[str, Any] | None = None  # the clients' counters at the end
    backend: dict[str, int] = field(default_factory=dict)  # echo server's counters, this run
    peak_processes: int = 0
    after_drain: int | None = None
    expected_after_drain: int = 0
    drain_s: float | None = None
    left_after_stop: list[str] = field(default_factory=list)
    outlived_stop: list[str] = field(default_factory=list)
    processes_seen: int = 0
    handed_tunnels: int | None = None  # pylb: tunnels its old workers logged as handed over
    crashes: list[str] = field(default_factory=list)  # log lines: a process segfaulted
    notable_log: list[str] = field(default_factory=list)
    log_path: str = ""
    error: str | None = None

    @property
    def lost(self) -> int | None:
        return None if self.final is None else self.final["lost"]

    @property
    def msg_errors(self) -> int | None:
        return None if self.final is None else self.final["msg_errors"]

    @property
    def stuck(self) -> int:
        return 0 if self.verify is None else self.verify["stuck"]

    @property
    def echo_max_ms(self) -> float | None:
        return None if self.final is None else self.final["echo_ms"]["max"]

    @property
    def gone_ms(self) -> list[float]:
        return [s.old_gone_ms for s in self.samples if s.old_gone_ms is not None]

    @property
    def stayed(self) -> int:
        return sum(s.old_gone_ms is None for s in self.samples)

    @property
    def reconnected(self) -> int | None:
        """Backend connections beyond the tunnels the clients opened (a proxy that
        connected to a server again for a tunnel it already had)."""
        if self.final is None or not self.backend:
            return None
        opened = self.final["opened"]
        return (
            self.backend.get("upgrades", 0)
            - opened["ws"]
            + self.backend.get("tcp", 0)
            - opened["tcp"]
        )

    @property
    def ok(self) -> bool:
        """No run error, no hung reload, nothing leaked; pylb: no tunnel lost or stuck, no
        message error, every old generation gone within TUNNEL_SETTLE."""
        if self.error or self.hung or self.left_after_stop or self.outlived_stop:
            return False
        if self.after_drain != self.expected_after_drain:
            return False
        if self.proxy != "pylb":
            return True
        return not (
            self.lost
            or self.msg_errors
            or self.stuck
            or self.stayed
            or self.open_failed
            or self.crashes
        )


def tunnel_reloads(
    subject: Subject, clients: TunnelClients, opts: Options, r: TunnelResult
) -> None:
    """opts.tunnel_reloads reloads while the clients talk; after each, watch the older
    generations for TUNNEL_SETTLE s (from the moment the reload is done), then sample, then
    replace the churned tunnels."""
    assert opts.tunnels is not None
    churn = round(opts.tunnels * opts.tunnel_churn)
    for k in range(1, opts.tunnel_reloads + 1):
        subject.reap()
        old = set(subject.workers())  # psutil.Process: pid and start time
        roots_before = subject.roots()
        r.reloads_asked += 1
        outcome = subject.reload()
        done = time.monotonic()
        subject.reap()
        count_reload(r, outcome, f"reload #{k}")
        current = subject.current_root()
        for pid in roots_before:
            if pid != current:
                with contextlib.suppress(psutil.Error):
                    old.add(psutil.Process(pid))
        gone: float | None = None
        deadline = done + TUNNEL_SETTLE
        while True:
            subject.reap()
            if not any(_running(p) for p in old):
                gone = time.monotonic() - done
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL)
        if (wait := deadline - time.monotonic()) > 0:
            time.sleep(wait)
        subject.reap()
        r.peak_processes = max(r.peak_processes, subject.sample())
        rss, pss = memory(subject.processes())
        status = clients.ask("status")
        r.samples.append(
            TunnelSample(
                reload=k,
                ok=outcome.ok,
                reload_ms=round(outcome.seconds * 1000, 1),
                old=len(old),
                old_gone_ms=None if gone is None else round(gone * 1000, 1),
                old_left=sum(_running(p) for p in old),
                workers=len(subject.workers()),
                processes=len(subject.processes()),
                rss=rss,
                pss=pss,
                open=status["open"],
                lost=status["lost"],
                msg_errors=status["msg_errors"],
            )
        )
        if outcome.hung:
            r.hung = outcome.detail
            log(f"{r.proxy} {r.method}: reload HUNG: {outcome.detail}; no more reloads")
            return
        if churn and k < opts.tunnel_reloads:
            answer = clients.ask(f"churn {churn}")
            r.churned += answer["opened"]
            r.open_failed += answer["failed"]


def tunnel_run(
    rnd: int,
    proxy: str,
    method: str,
    opts: Options,
    tools: Tools,
    tmp: Path,
    echo: EchoPorts,
    rng: random.Random,
) -> TunnelResult:
    assert opts.tunnels is not None
    r = TunnelResult(proxy, method, DESCRIPTION[(proxy, method)], rnd, opts.tunnels)
    rundir = tmp / f"tunnels-r{rnd}-{proxy}-{method}"
    rundir.mkdir()
    r.port, r.tcp_port = free_ports(2)
    layout = TunnelLayout(r.tcp_port, echo.tcp, opts.tunnels)
    subject = make_subject(proxy, method, tools, rundir, r.port, echo.ws, layout)
    r.log_path = str(subject.log_path)
    log(
        f"round {rnd}: {proxy} {method} ({r.description}): {opts.tunnels} tunnels -> "
        f"127.0.0.1:{r.port} (http) + :{r.tcp_port} (tcp), {opts.tunnel_reloads} reloads"
    )
    clients: TunnelClients | None = None
    try:
        try:
            subject.start()
            tcp_echoes(r.tcp_port)
            subject.sample()
            before = echo_stats(echo.ws[0])
            clients = TunnelClients(rundir, r.port, r.tcp_port, opts, rng.randrange(1 << 30))
            answer = clients.ask(f"open {opts.tunnels}")
            r.opened, r.open_failed = answer["opened"], answer["failed"]
            r.open_s = answer["seconds"]
            time.sleep(TUNNEL_WARMUP)
            tunnel_reloads(subject, clients, opts, r)
            r.verify = clients.ask("verify", ECHO_TIMEOUT + 30)
            r.final = clients.ask("stop")
            clients.close()
            after = echo_stats(echo.ws[0])
            r.backend = {k: after[k] - before[k] for k in ("upgrades", "tcp")}
            began = time.monotonic()
            procs = drain(subject)  # the tunnels are closed: HAProxy's old workers go too
            r.drain_s = round(time.monotonic() - began, 2)
            r.after_drain = len(procs)
            r.expected_after_drain = subject.expected()
        finally:
            if clients is not None:
                clients.close()
            stop_subject(subject, r)
    except (BenchError, OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        r.error = str(exc) or repr(exc)
        log(f"{proxy} {method}: FAILED: {r.error}")
    lines = subject.log_lines()
    r.notable_log = [line for line in lines if NOTABLE.search(line)]
    r.crashes = [line for line in lines if CRASH_RE.search(line)]
    handed = [m.group(0) for line in lines if (m := HANDED_RE.search(line))]
    if handed:
        r.handed_tunnels = sum(int(n) for text in handed for n in HANDED_TUNNELS.findall(text))
    print_tunnel_check(r)
    return r


# --------------------------------------------------------------------------- report


def print_tunnel_check(r: TunnelResult) -> None:
    name = f"round {r.round} {r.proxy} {r.method}"
    if r.error:
        print(f"check {name}: FAILED: {r.error}", flush=True)
    workers = " ".join(str(s.workers) for s in r.samples) or "-"
    gone = (
        " ".join("stays" if s.old_gone_ms is None else f"{s.old_gone_ms:.0f}" for s in r.samples)
        or "-"
    )
    rss = " ".join(mib(s.rss) for s in r.samples) or "-"
    print(
        f"check {name}: {r.reloads}/{r.reloads_asked} reloads; workers alive after each: {workers}",
        flush=True,
    )
    print(f"    old generation gone after each (ms from the reload done): {gone}", flush=True)
    print(f"    total RSS MiB after each: {rss}", flush=True)
    if r.handed_tunnels is not None:
        print(
            f"    pylb log: {r.handed_tunnels} tunnels handed over by old workers in all",
            flush=True,
        )
    if r.crashes:
        print(f"    {len(r.crashes)} processes died of a segfault, e.g. {r.crashes[0]}", flush=True)
    if r.final is not None:
        f = r.final
        lost = ", ".join(f"{k} {n}" for k, n in sorted(f["lost_by_reason"].items())) or "none"
        print(
            f"    tunnels: {r.opened}/{r.tunnels} opened ({r.open_s}s), {r.churned} more by "
            f"churn, {r.open_failed} failed to open, {f['open']} open at the end; lost: "
            f"{lost} (ws {f['lost_by_kind']['ws']}, tcp {f['lost_by_kind']['tcp']}); message "
            f"errors {f['msg_errors']}; stuck at the end {r.stuck}; {f['messages']} messages "
            f"echoed, echo ms p50 {f['echo_ms']['p50']} p99 {f['echo_ms']['p99']} max "
            f"{f['echo_ms']['max']}",
            flush=True,
        )
        if r.backend:
            extra = r.reconnected
            same = "as many as" if extra == 0 else f"{extra} more than"
            print(
                f"    backends: {r.backend['upgrades']} WebSocket upgrades, {r.backend['tcp']} "
                f"TCP connections ({same} the tunnels opened)",
                flush=True,
            )
        for line in f["examples"][:10]:
            print(f"    client: {line}", flush=True)
    left = (
        "none left after stop"
        if not r.left_after_stop
        else (f"LEFT AFTER STOP: {', '.join(r.left_after_stop)}")
    )
    if r.outlived_stop:
        left += f"; OUTLIVED ITS MASTER: {', '.join(r.outlived_stop)}"
    if r.after_drain is not None:
        print(
            f"    once the tunnels closed: {r.after_drain} processes after {r.drain_s}s "
            f"(expected {r.expected_after_drain}"
            f"{')' if r.after_drain == r.expected_after_drain else ') MISMATCH'}; {left}",
            flush=True,
        )
    for line in r.reload_errors[:5]:
        print(f"    reload note: {line}", flush=True)
    if r.proxy == "pylb" and not r.error and not r.ok:
        print(
            f"WARNING: {name}: tunnels lost, message errors, an old generation that "
            f"stayed or a leak; log {r.log_path}",
            flush=True,
        )


def agg(values: list[float | None], spec: str) -> str:
    """`median` of the rounds, with `(min-max)` when they differ; `-` without values."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    mid = fmt(statistics.median(vals), spec)
    lo, hi = fmt(min(vals), spec), fmt(max(vals), spec)
    return mid if lo == hi else f"{mid} ({lo}-{hi})"


def grouped(results: list[TunnelResult]) -> list[list[TunnelResult]]:
    """The runs by proxy and method, in the order they first ran."""
    groups: dict[tuple[str, str], list[TunnelResult]] = {}
    for r in results:
        groups.setdefault((r.proxy, r.method), []).append(r)
    return list(groups.values())


def tunnel_summary(runs: list[TunnelResult]) -> dict[str, Any]:
    """One proxy and method over its rounds (failed runs left out of the figures)."""
    good = [r for r in runs if r.final is not None and r.samples]
    gone = sorted(g for r in good for g in r.gone_ms)

    def per(f: Callable[[TunnelResult], float | None]) -> list[float | None]:
        return [f(r) for r in good]

    return {
        "proxy": runs[0].proxy,
        "method": runs[0].method,
        "description": runs[0].description,
        "rounds": len(runs),
        "failed_rounds": len(runs) - len(good),
        "errors": [r.error for r in runs if r.error],
        "tunnels": runs[0].tunnels,
        "opened": per(lambda r: r.opened + r.churned),
        "reloads": per(lambda r: r.reloads),
        "reloads_asked": per(lambda r: r.reloads_asked),
        "lost": per(lambda r: r.lost),
        "msg_errors": per(lambda r: r.msg_errors),
        "stuck": per(lambda r: r.stuck),
        "open_failed": per(lambda r: r.open_failed),
        "workers_last": per(lambda r: r.samples[-1].workers),
        "workers_max": per(lambda r: max(s.workers for s in r.samples)),
        "rss_first_mib": per(lambda r: r.samples[0].rss / MIB),
        "rss_last_mib": per(lambda r: r.samples[-1].rss / MIB),
        "pss_first_mib": per(lambda r: r.samples[0].pss / MIB),
        "pss_last_mib": per(lambda r: r.samples[-1].pss / MIB),
        "old_gone_ms_p50": statistics.median(gone) if gone else None,
        "old_gone_ms_max": max(gone) if gone else None,
        "old_stayed": sum(r.stayed for r in good),
        "samples": sum(len(r.samples) for r in good),
        "echo_max_ms": per(lambda r: r.echo_max_ms),
        "segfaults": per(lambda r: len(r.crashes)),
        "ok": all(r.ok for r in runs),
    }


def tunnel_table(results: list[TunnelResult]) -> str:
    head = [
        "proxy",
        "method",
        "how",
        "tunnels",
        "opened",
        "reloads",
        "lost",
        "msg errors",
        "workers last",
        "max",
        "rss MiB 1st->last",
        "pss MiB 1st->last",
        "old gone ms p50",
        "max",
        "old stayed",
        "echo max ms",
        "segfaults",
    ]
    rows = [head]
    for runs in grouped(results):
        s = tunnel_summary(runs)
        if s["failed_rounds"] == s["rounds"]:
            rows.append([s["proxy"], s["method"], s["description"], f"FAILED: {s['errors'][0]}"])
            continue
        stays = s["old_gone_ms_p50"] is None
        rows.append(
            [
                s["proxy"],
                s["method"],
                s["description"],
                str(s["tunnels"]),
                agg(s["opened"], ".0f"),
                f"{agg(s['reloads'], '.0f')}/{agg(s['reloads_asked'], '.0f')}",
                agg(s["lost"], ".0f"),
                agg(s["msg_errors"], ".0f"),
                agg(s["workers_last"], ".0f"),
                agg(s["workers_max"], ".0f"),
                f"{agg(s['rss_first_mib'], '.1f')}->{agg(s['rss_last_mib'], '.1f')}",
                f"{agg(s['pss_first_mib'], '.1f')}->{agg(s['pss_last_mib'], '.1f')}",
                "stays" if stays else fmt(s["old_gone_ms_p50"], ".0f"),
                "stays" if stays else fmt(s["old_gone_ms_max"], ".0f"),
                f"{s['old_stayed']}/{s['samples']}",
                agg(s["echo_max_ms"], ".0f"),
                agg(s["segfaults"], ".0f"),
            ]
        )
    return align(rows, 3)


def tunnel_result_json(r: TunnelResult) -> dict[str, Any]:
    return {
        "round": r.round,
        "proxy": r.proxy,
        "method": r.method,
        "description": r.description,
        "error": r.error,
        "ok": r.ok,
        "tunnels": r.tunnels,
        "port": r.port,
        "tcp_port": r.tcp_port,
        "opened": r.opened,
        "open_seconds": r.open_s,
        "churned": r.churned,
        "open_failed": r.open_failed,
        "reloads": r.reloads,
        "reloads_asked": r.reloads_asked,
        "reload_failures": r.reload_failures,
        "reload_notes": r.reload_errors,
        "signals_resent": r.signals_resent,
        "hung": r.hung,
        "samples": [asdict(s) for s in r.samples],
        "lost": r.lost,
        "msg_errors": r.msg_errors,
        "stuck": r.stuck,
        "clients": r.final,
        "verify": r.verify,
        "backend_connections": r.backend,
        "backend_connections_beyond_tunnels": r.reconnected,
        "peak_processes": r.peak_processes,
        "after_drain": r.after_drain,
        "expected_after_drain": r.expected_after_drain,
        "drain_seconds": r.drain_s,
        "left_after_stop": r.left_after_stop,
        "outlived_stop": r.outlived_stop,
        "processes_seen": r.processes_seen,
        "handed_tunnels": r.handed_tunnels,
        "crashes": r.crashes,
        "notable_log": r.notable_log[:200],
        "log": r.log_path,
    }


def tunnel_header(opts: Options) -> str:
    assert opts.tunnels is not None
    churn = round(opts.tunnels * opts.tunnel_churn)
    return (
        f"tunnels through reloads: {opts.tunnels} tunnels ({opts.tunnels // 2} WebSocket + "
        f"{opts.tunnels // 2} TCP), {opts.tunnel_reloads} reloads per run, each followed by "
        f"{TUNNEL_SETTLE:g}s of watching and {churn} tunnels replaced by new ones; every tunnel "
        f"sends {TUNNEL_BURST} numbered lines every ~{opts.tunnel_interval:g}s; pylb "
        f"workers={WORKERS}, HAProxy nbthread 1; rounds={opts.tunnel_rounds}"
    )


def report_tunnels(
    opts: Options, tools: Tools, results: list[TunnelResult], subreaper: bool
) -> None:
    print(f"\n{tunnel_header(opts)}\n")
    print(tunnel_table(results))
    for r in results:
        if r.proxy != "pylb" or r.ok or not r.notable_log:
            continue
        print_notable(f"round {r.round} {r.proxy} {r.method}", r.log_path, r.notable_log)
    report_end(
        opts,
        subreaper,
        lambda: {
            "meta": {
                **run_meta(tools),
                "scenario": "tunnels",
                "tunnels": opts.tunnels,
                "reloads": opts.tunnel_reloads,
                "rounds": opts.tunnel_rounds,
                "churn": opts.tunnel_churn,
                "interval": opts.tunnel_interval,
                "burst": TUNNEL_BURST,
                "settle": TUNNEL_SETTLE,
                "echo_timeout": ECHO_TIMEOUT,
                "pylb_workers": WORKERS,
                "fd_limit": fd_limit(),  # as raise_fd_limit left it
                "seed": opts.seed,
                "load_average": os.getloadavg(),
            },
            "tunnel_summary": [tunnel_summary(runs) for runs in grouped(results)],
            "tunnel_results": [tunnel_result_json(r) for r in results],
        },
    )


# --------------------------------------------------------------------------- main


def tunnel_plan(opts: Options) -> list[tuple[int, str, str]]:
    """(round, proxy, method): the runs of reload.plan, proxies alternating (pylb usr2,
    haproxy usr2, pylb hup, ...), round after round."""
    # sorted() is stable: pylb before haproxy for the same method, as plan has them
    pairs = sorted(plan(opts), key=lambda run: ALL_METHODS.index(run[1]))
    return [
        (rnd, proxy, method) for rnd in range(1, opts.tunnel_rounds + 1) for proxy, method in pairs
    ]


def run_tunnels(
    opts: Options, tools: Tools, tmp: Path, runs: list[tuple[int, str, str]]
) -> list[TunnelResult]:
    rng = random.Random(opts.seed)
    with contextlib.ExitStack() as stack:
        echo = start_echo(stack, tmp)
        return [
            tunnel_run(rnd, proxy, method, opts, tools, tmp, echo, rng)
            for rnd, proxy, method in runs
        ]


def prepare(opts: Options) -> None:
    """Before the runs: raise the open files limit (warn if it stays too low for the
    tunnels) and say what will run."""
    assert opts.tunnels is not None
    limit = raise_fd_limit()
    if limit < 4 * opts.tunnels + 256:
        log(
            f"WARNING: open files limited to {limit} (ulimit -n): too few for "
            f"{opts.tunnels} tunnels"
        )
    log(tunnel_header(opts))


def main(opts: Options) -> int:
    """`reload.py --tunnels`: run the scenario and report; the exit status."""
    runs = tunnel_plan(opts)
    return run_scenario(
        opts,
        {proxy for _, proxy, _ in runs},
        lambda tools, tmp: run_tunnels(opts, tools, tmp, runs),
        lambda tools, results, subreaper: report_tunnels(opts, tools, results, subreaper),
        prepare=lambda: prepare(opts),
    )
