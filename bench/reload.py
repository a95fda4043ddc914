#!/usr/bin/env python3
"""Reload pylb (and HAProxy) over and over under load, and count what the clients lose.

For each reload method, one run starts the proxy in front of two nginx backends, drives wrk
(one thread, keep-alive, `--timeout 5s`) at it for `--duration` seconds and meanwhile reloads
it every 100 to 250 ms (random, start to start; a reload still in progress is waited for),
or `--rate R` times a second. Failures are wrk's socket errors (connect, read, write, timeout)
plus non-2xx answers. After each run the script checks that the old processes went away, that
no worker leaked (pylb: master + its worker template + the workers), and, once the proxy is
stopped, that none of its processes is left. It samples the RSS and open descriptors of the
proxy's current processes after the first reloads and after the last one, and (pylb,
`--respawn N`) kills a worker with SIGKILL N times under load and times its replacement, from
the kill to the master's log line that says the new worker accepts.

pylb methods: `usr2` (SIGUSR2 to the master), `hup` (SIGHUP), `socket` (`reload` on the stats
socket, answer awaited), `sf` (a new `bin/pylb -f CFG -p PIDFILE -sf OLDPID` each time).
HAProxy, for comparison: `usr2` (`haproxy -W`, SIGUSR2 to the master) and `sf` (the classic
`haproxy -f CFG -p PIDFILE -D -sf OLDPID -x STATS_SOCKET`).

`--tunnels N` runs the tunnel scenario instead of wrk: N long-lived tunnels (N/2 WebSocket
through an HTTP frontend, N/2 sessions through a TCP frontend of the same proxy, to the echo
backends of bench/tunnels_echo.py) talk numbered messages while the proxy is reloaded
`--tunnel-reloads` times, a second apart; after each reload the script records how many
worker processes are alive, the RSS of all the proxy's processes and how long the old
generation took to exit (pylb hands its tunnels over and exits; HAProxy keeps an old worker
as long as a tunnel it holds is open). pylb and HAProxy runs alternate. Its code is
bench/tunnels.py; this file parses its options and has what both scenarios share (the
proxies and their reload methods, process counting, the frame of a run and of the report).

The helpers (nginx, ports, process handling, wrk parsing) are bench/bench.py's. See
bench/README.md for how to run it and how to read the output.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import math
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from bench import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_MISSING,
    EXIT_OK,
    REPO,
    STOP_TIMEOUT,
    WRK_GRACE,
    BenchError,
    Managed,
    MissingDependency,
    Ports,
    Tools,
    WrkResult,
    comma_list,
    command_line,
    find_tools,
    fmt,
    free_ports,
    haproxy_config,
    http_ok,
    parse_wrk,
    plot_path_problem,
    positive_int,
    psutil,
    pylb_config,
    pylb_env,
    pylb_yaml,
    raise_interrupt,
    run_meta,
    start_nginx,
    temp_dir,
    wait_ready,
    write,
)
from bench import Options as BenchOptions

if TYPE_CHECKING:
    import plot
    from tunnels import TunnelLayout

PROXIES = ("pylb", "haproxy")
PYLB_METHODS = ("usr2", "hup", "socket", "sf")
HAPROXY_METHODS = ("usr2", "sf")
ALL_METHODS = PYLB_METHODS
WORKERS = 2
INTERVAL = (0.100, 0.250)  # seconds between the starts of two reloads, drawn uniformly
MIN_RELOADS = 100
RELOAD_WAIT = 40.0  # a reload not done by then hangs (pylb's own reload timeout is 30 s)
SIGNAL_ACK = 5.0  # a reload signal not acknowledged in the log by then had no effect
# HAProxy 2.6's master now and then leaves a SIGUSR2 unhandled (no "Reloading HAProxy" until
# some other event wakes it): after this long without it, the signal is sent again.
HAPROXY_RESEND = 0.25
HAPROXY_SENDS = 5
FIRST_RELOAD_DELAY = 0.5  # wrk connects before the first reload
LAST_RELOAD_MARGIN = 0.5  # no reload starts this close to wrk's end
DRAIN_TIMEOUT = 20.0  # after wrk: how long old processes get to go away
POLL = 0.005
NOTABLE_SHOWN = 20
PR_SET_CHILD_SUBREAPER = 36
LATE = 0.010  # with --rate: a reload that starts this much after its time is late
RATE_SHORTFALL = 0.95  # with --rate: fewer reloads a second than this share asked: WARNING
FLAT_AFTER = 3  # the "start" resource sample is taken after this many reloads
RESPAWN_DEFAULT = 10
RESPAWN_SPACING = 1.0  # seconds at least between two kills (start to start)
RESPAWN_FIRST = 0.5  # seconds of wrk before the first kill
RESPAWN_WAIT = 10.0  # a replacement not accepting by then is a failed respawn
MIB = 1024 * 1024

# the tunnel scenario (--tunnels, bench/tunnels.py): its defaults and what the help names
TUNNELS_DEFAULT = 200  # --tunnels without a number
TUNNEL_RELOADS = 10
TUNNEL_CHURN = 0.1  # share of the tunnels replaced by new ones after each reload
TUNNEL_INTERVAL = 0.5  # seconds between two bursts of one tunnel (x 0.5 to 1.5, at random)
TUNNEL_BURST = 4  # numbered lines per burst
TUNNEL_SETTLE = 1.0  # after a reload: watch the old generation this long, then sample

# pylb's process titles (setproctitle pads them with spaces) and module names before them
TEMPLATE_TITLE = "pylb: worker template"
WORKER_TITLE = re.compile(r"pylb: worker (\d+)/(\d+) \[gen (\d+)\]")
# the master's lines about its workers
STARTED_RE = re.compile(
    r"worker \d+/\d+ gen \d+ started \(pid \d+, (forked from the template|new interpreter)\)"
)
LOG_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")

DESCRIPTION = {
    ("pylb", "usr2"): "kill -USR2 master",
    ("pylb", "hup"): "kill -HUP master",
    ("pylb", "socket"): "'reload' on stats socket",
    ("pylb", "sf"): "pylb -p PIDFILE -sf OLDPID",
    ("haproxy", "usr2"): "haproxy -W, kill -USR2",
    ("haproxy", "sf"): "haproxy -D -sf OLDPID -x SOCK",
}

# pylb log lines worth showing next to failures (the log format has no level name).
NOTABLE = re.compile(
    r"fail|error|Traceback|exception|killed|exit status [1-9]|did not|no worker|closing|"
    r"gone|anew|keeps dying|timeout|refused|reset|broken",
    re.IGNORECASE,
)


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    duration: int
    connections: int
    methods: tuple[str, ...]
    only: tuple[str, ...]
    json_path: Path | None
    keep_tmp: bool
    seed: int | None
    rate: float | None  # reloads a second, start to start; None: random INTERVAL
    respawn: int  # kill -9 of a pylb worker this many times after each pylb run
    tunnels: int | None = None  # the tunnel scenario: this many tunnels (None: wrk)
    tunnel_reloads: int = TUNNEL_RELOADS
    tunnel_rounds: int = 1
    tunnel_churn: float = TUNNEL_CHURN
    tunnel_interval: float = TUNNEL_INTERVAL
    plot: Path | None = None  # --plot: the PNG chart of the figures
    command: str = ""  # the command line, for the chart's caption


parse_methods = comma_list("--methods", ALL_METHODS)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def even_tunnels(text: str) -> int:
    value = positive_int(text)
    if value < 2 or value % 2:
        raise argparse.ArgumentTypeError(f"expected an even number >= 2, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(
        description="Reload pylb (and HAProxy) every 100-250 ms (or --rate a second) under wrk "
        "and count failures.",
    )
    p.add_argument("--duration", type=positive_int, help="seconds per method (default 30)")
    p.add_argument("--connections", type=positive_int, help="wrk connections (default 50)")
    p.add_argument(
        "--methods",
        type=parse_methods,
        default=ALL_METHODS,
        help="comma list of usr2,hup,socket,sf (HAProxy has only usr2 and sf)",
    )
    p.add_argument("--only", choices=PROXIES, help="run only pylb or only haproxy")
    p.add_argument("--json", dest="json_path", type=Path, help="write the figures here")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument("--seed", type=int, help="seed of the random reload intervals")
    p.add_argument(
        "--plot",
        type=Path,
        metavar="PATH",
        help="after the run, also write the figures as a PNG chart (needs matplotlib)",
    )
    p.add_argument(
        "--rate",
        type=positive_float,
        help="reloads a second, start to start (default: every 100-250 ms, random)",
    )
    p.add_argument(
        "--respawn",
        type=non_negative_int,
        help=f"after each pylb run, kill -9 a worker N times under wrk and time its "
        f"replacement (default {RESPAWN_DEFAULT}; 0: skip)",
    )
    t = p.add_argument_group(
        "tunnel scenario",
        "long-lived WebSocket and TCP tunnels through reloads, instead of wrk",
    )
    t.add_argument(
        "--tunnels",
        type=even_tunnels,
        nargs="?",
        const=TUNNELS_DEFAULT,
        metavar="N",
        help=f"run the tunnel scenario with N tunnels, N/2 WebSocket + N/2 TCP "
        f"(N even; {TUNNELS_DEFAULT} without a number)",
    )
    t.add_argument(
        "--tunnel-reloads",
        type=positive_int,
        metavar="M",
        help=f"reloads per run, one every ~{TUNNEL_SETTLE:g} s (default {TUNNEL_RELOADS})",
    )
    t.add_argument(
        "--tunnel-rounds",
        type=positive_int,
        metavar="R",
        help="runs of each proxy and method, interleaved (default 1)",
    )
    t.add_argument(
        "--tunnel-churn",
        type=share,
        metavar="F",
        help=f"share of the tunnels closed and opened anew after each reload "
        f"(default {TUNNEL_CHURN:g})",
    )
    t.add_argument(
        "--tunnel-interval",
        type=positive_float,
        metavar="S",
        help=f"seconds between two bursts of {TUNNEL_BURST} messages on a tunnel "
        f"(default {TUNNEL_INTERVAL:g})",
    )
    a = p.parse_args(argv)
    tunnel_only = ("tunnel_reloads", "tunnel_rounds", "tunnel_churn", "tunnel_interval")
    wrk_only = ("duration", "connections", "rate", "respawn", "plot")
    if a.tunnels is None:
        given = [n for n in tunnel_only if getattr(a, n) is not None]
    else:
        given = [n for n in wrk_only if getattr(a, n) is not None]
    if given:
        names = ", ".join("--" + n.replace("_", "-") for n in given)
        p.error(f"{names}: only {'with' if a.tunnels is None else 'without'} --tunnels")
    if a.plot is not None and (problem := plot_path_problem(a.plot)):
        p.error(problem)
    return Options(
        duration=30 if a.duration is None else a.duration,
        connections=50 if a.connections is None else a.connections,
        methods=a.methods,
        only=(a.only,) if a.only else PROXIES,
        json_path=a.json_path,
        keep_tmp=a.keep_tmp,
        seed=a.seed,
        rate=a.rate,
        respawn=RESPAWN_DEFAULT if a.respawn is None else a.respawn,
        tunnels=a.tunnels,
        tunnel_reloads=a.tunnel_reloads or TUNNEL_RELOADS,
        tunnel_rounds=a.tunnel_rounds or 1,
        tunnel_churn=TUNNEL_CHURN if a.tunnel_churn is None else a.tunnel_churn,
        tunnel_interval=a.tunnel_interval or TUNNEL_INTERVAL,
        plot=a.plot,
        command=command_line("bench/reload.py", argv),
    )


def pacing(opts: Options) -> str:
    if opts.rate is not None:
        return f"{opts.rate:g} reloads/s (every {1000 / opts.rate:.0f} ms)"
    return f"a reload every {INTERVAL[0] * 1000:.0f}-{INTERVAL[1] * 1000:.0f} ms"


def log(message: str) -> None:
    print(f"reload: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes

SPAWNED: set[int] = set()  # pids of our own subprocess.Popen children (subprocess reaps them)


def become_subreaper() -> bool:
    """Make orphaned descendants (daemonized HAProxy, workers whose master died) our
    children, so that they can be counted and reaped."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_adopted() -> list[int]:
    """Reap exited children that subprocess does not know about (adopted orphans)."""
    reaped = []
    for child in psutil.Process().children():
        if child.pid in SPAWNED:
            continue
        with contextlib.suppress(ChildProcessError, OSError):
            pid, _status = os.waitpid(child.pid, os.WNOHANG)
            if pid:
                reaped.append(pid)
    return reaped


def spawn(name: str, argv: list[str], log_path: Path, **kw: Any) -> Managed:
    """A process of this run (`append=True`: its output joins a log shared with others)."""
    proc = Managed(name, argv, log_path, **kw)
    SPAWNED.add(proc.pid)
    return proc


def title(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(proc.cmdline()).strip() or proc.name()
    return "?"


def created(proc: psutil.Process) -> float:
    with contextlib.suppress(psutil.Error):
        return proc.create_time()
    return math.inf


@dataclass
class Census:
    """The live processes of one pylb master, by role: its worker template and its workers
    are its children (the template's forks are re-parented to the master).

    A worker forked from the template carries the template's title until it sets its own:
    of the children that look like the template, the oldest is the template, the others
    are such workers (a worker is always younger than the template that forked it).
    Descendants that are not children (the template's short-lived middle child of its
    double fork, a worker before it is re-parented) are `transient`."""

    master: psutil.Process
    template: psutil.Process | None = None
    # (generation, index, process); 0, 0 for a worker that has not set its title yet
    workers: list[tuple[int, int, psutil.Process]] = field(default_factory=list)
    others: list[psutil.Process] = field(default_factory=list)  # children of no known role
    transient: list[psutil.Process] = field(default_factory=list)

    @property
    def current(self) -> list[psutil.Process]:
        """The workers of the newest generation (with those not titled yet: gen 0, new)."""
        if not self.workers:
            return []
        newest = max(gen for gen, _, _ in self.workers)
        return [proc for gen, _, proc in self.workers if gen in (0, newest)]

    def roles(self) -> str:
        text = f"1 master + {1 if self.template else 0} template + {len(self.workers)} workers"
        if self.others:
            text += f" + {len(self.others)} other"
        if self.transient:
            text += f" + {len(self.transient)} transient"
        return text


def pylb_census(master_pid: int) -> Census | None:
    """The processes of pylb master `master_pid` by role; None if it is gone."""
    try:
        master = psutil.Process(master_pid)
        children = master.children()
        below = master.children(recursive=True)
    except psutil.Error:
        return None
    census = Census(master)
    candidates: list[psutil.Process] = []
    direct = set()
    for proc in children:
        with contextlib.suppress(psutil.Error):
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            direct.add(proc.pid)
            name = title(proc)
            m = WORKER_TITLE.match(name)
            if m:
                census.workers.append((int(m.group(3)), int(m.group(1)), proc))
            elif name == TEMPLATE_TITLE or "lb.template" in name:
                candidates.append(proc)
            elif "lb.worker" in name:  # a new interpreter before its title
                census.workers.append((0, 0, proc))
            else:
                census.others.append(proc)
    candidates.sort(key=created)
    if candidates:
        census.template = candidates[0]
        census.workers += [(0, 0, proc) for proc in candidates[1:]]
    for proc in below:
        with contextlib.suppress(psutil.Error):
            if proc.pid not in direct and proc.status() != psutil.STATUS_ZOMBIE:
                census.transient.append(proc)
    return census


@dataclass
class Usage:
    """Summed RSS and open descriptors of a set of processes, and per role."""

    rss: int = 0  # bytes
    fds: int = 0
    procs: int = 0
    parts: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # role: rss, fds, n

    def add(self, role: str, procs: list[psutil.Process]) -> None:
        rss = fds = n = 0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                r, f = proc.memory_info().rss, proc.num_fds()
                rss, fds, n = rss + r, fds + f, n + 1
        self.rss, self.fds, self.procs = self.rss + rss, self.fds + fds, self.procs + n
        old = self.parts.get(role, (0, 0, 0))
        self.parts[role] = (old[0] + rss, old[1] + fds, old[2] + n)

    def json(self) -> dict[str, Any]:
        return {
            "rss_bytes": self.rss,
            "fds": self.fds,
            "processes": self.procs,
            "parts": {
                k: {"rss_bytes": v[0], "fds": v[1], "processes": v[2]}
                for k, v in self.parts.items()
            },
        }


def log_time(line: str) -> float | None:
    """The time (as time.time()) of a pylb log line: its local-time stamp, to the ms."""
    m = LOG_STAMP.match(line)
    if m is None:
        return None
    stamp = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")
    return stamp.timestamp() + int(m.group(2)) / 1000


def stop_checked(proc: Managed) -> list[str]:
    """Stop `proc` with SIGTERM and give what runs below it STOP_TIMEOUT to end by itself
    once it exited; name what still runs then (the proxy did not stop it: a leftover even
    if Managed.stop, called last, kills it), or a master that ignored SIGTERM."""
    try:
        below = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        below = []
    if proc.alive():
        with contextlib.suppress(ProcessLookupError):
            proc.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.proc.wait(STOP_TIMEOUT)
    outlived = []
    if proc.alive():
        outlived.append(
            f"{proc.pid} ({proc.name}: still running {STOP_TIMEOUT:.0f}s after SIGTERM)"
        )
    deadline = time.monotonic() + STOP_TIMEOUT
    running = below
    while running:
        reap_adopted()
        running = [p for p in running if _running(p)]
        if not running or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    outlived += [f"{p.pid} ({title(p)})" for p in running]
    proc.stop()
    return outlived


def _running(proc: psutil.Process) -> bool:
    """The very process (not a reused pid) still runs (not a zombie)."""
    with contextlib.suppress(psutil.Error):
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    return False


class LogWatch:
    """Reads a growing log file line by line and keeps every line; `wait_for` looks at
    each line once, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []
        self._checked = 0  # lines wait_for has looked at
        self._offset = 0
        self._partial = ""

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        self._offset += len(data)
        text = self._partial + data.decode(errors="replace")
        *new, self._partial = text.split("\n")
        self.lines.extend(new)

    def _next_match(self, pattern: re.Pattern[str]) -> re.Match[str] | None:
        while self._checked < len(self.lines):
            m = pattern.search(self.lines[self._checked])
            self._checked += 1
            if m:
                return m
        return None

    def skip(self) -> None:
        """Read what is there; `wait_for` will only look at lines written after this."""
        self.poll()
        self._checked = len(self.lines)

    def wait_for(
        self,
        pattern: re.Pattern[str],
        timeout: float,
        alive: Callable[[], bool] | None = None,
    ) -> re.Match[str] | None:
        """The next line matching `pattern` within `timeout` (None: not seen in time, or
        `alive()` turned false first); `match.string` is the whole line."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            m = self._next_match(pattern)
            if m:
                return m
            if time.monotonic() > deadline or (alive is not None and not alive()):
                self.poll()  # the last lines written before it exited
                return self._next_match(pattern)
            time.sleep(POLL)


@dataclass
class Outcome:
    ok: bool
    seconds: float
    detail: str = ""
    hung: bool = False
    resent: int = 0  # signals sent again because the first had no visible effect


# --------------------------------------------------------------------------- subjects


class Subject:
    """One proxy run with one reload method: start, reload, count processes, stop."""

    proxy = ""
    method = ""

    def __init__(
        self,
        tools: Tools,
        tmp: Path,
        port: int,
        backends: tuple[int, int],
        tunnel: TunnelLayout | None = None,
    ) -> None:
        self.tools = tools
        self.tmp = tmp
        self.port = port
        self.backends = backends
        self.tunnel = tunnel  # the tunnel scenario's configuration instead of bench.py's
        self.log_path = tmp / f"{self.proxy}.log"
        self.watch = LogWatch(self.log_path)
        self.seen: dict[tuple[int, float], str] = {}  # every process of this run
        self.outlived: list[str] = []  # processes the proxy left running when stopped

    # -- to implement
    def start(self) -> None:
        raise NotImplementedError

    def reload(self) -> Outcome:
        raise NotImplementedError

    def roots(self) -> list[int]:
        """Pids of the processes the script started or adopted that may still run."""
        raise NotImplementedError

    def expected(self) -> int:
        """How many processes the run should have once old ones went away."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def usage(self) -> Usage | None:
        """RSS and descriptors of the current processes (not those on their way out)."""
        return None

    def census(self) -> list[Census]:
        """pylb: the processes of each live master by role (HAProxy: none)."""
        return []

    def workers(self) -> list[psutil.Process]:
        """The live worker processes of every generation (pylb: not the masters nor the
        template; `haproxy -W`: the master's children; `haproxy -D`: the daemons)."""
        raise NotImplementedError

    def current_root(self) -> int:
        """The pid of the master (or daemon) the last reload made current."""
        raise NotImplementedError

    # -- common
    def signal_reload(
        self,
        master: Managed,
        sig: signal.Signals,
        ack: re.Pattern[str],
        done: re.Pattern[str],
        sends: int = 1,
        ack_wait: float = SIGNAL_ACK,
    ) -> tuple[Outcome, re.Match[str] | None]:
        """Send `sig` to `master`; the reload started when the log shows `ack` and is over
        when it shows `done` (nothing within RELOAD_WAIT: hung). Without `ack` within
        `ack_wait` the signal is sent again, `sends` times in all; then it had no effect:
        a failed reload, and the run goes on."""
        began = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            os.kill(master.pid, sig)
            if self.watch.wait_for(ack, ack_wait, master.alive) is not None:
                break
            if not master.alive():
                why = f"master exited with status {master.proc.returncode}"
                return Outcome(False, time.monotonic() - began, why, hung=True), None
            if attempt == sends:
                why = (
                    f"{sig.name} had no effect: no '{ack.pattern}' within {ack_wait:.0f}s"
                    f"{f', {sends} times' if sends > 1 else ''}"
                )
                return Outcome(False, time.monotonic() - began, why), None
        note = f"{sig.name} sent {attempt} times" if attempt > 1 else ""
        m = self.watch.wait_for(done, RELOAD_WAIT, master.alive)
        took = time.monotonic() - began
        if m is None:
            if not master.alive():
                why = f"master exited with status {master.proc.returncode} during the reload"
            else:
                why = f"{sig.name} acknowledged, but no '{done.pattern}' within {RELOAD_WAIT:.0f}s"
            return Outcome(False, took, why, hung=True), None
        return Outcome(True, took, note, resent=attempt - 1), m

    def reap(self) -> None:
        reap_adopted()

    def processes(self) -> list[psutil.Process]:
        """The live (not zombie) processes of this run: its roots, their descendants, and
        adopted orphans that belong to it (pids seen before)."""
        found: dict[int, psutil.Process] = {}
        for pid in self.roots():
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                for proc in [root, *root.children(recursive=True)]:
                    found[proc.pid] = proc
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process().children(recursive=True):
                if proc.pid not in found and self._seen(proc):
                    found[proc.pid] = proc
        live = []
        for proc in found.values():
            with contextlib.suppress(psutil.Error):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    live.append(proc)
        return live

    def _seen(self, proc: psutil.Process) -> bool:
        with contextlib.suppress(psutil.Error):
            return (proc.pid, proc.create_time()) in self.seen
        return False

    def sample(self) -> int:
        """Remember every process of the run now alive; their number."""
        procs = self.processes()
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                self.seen.setdefault((proc.pid, proc.create_time()), title(proc))
        return len(procs)

    def leftovers(self) -> list[str]:
        """Processes ever seen in this run that are still alive (zombies included)."""
        left = []
        for (pid, created), name in self.seen.items():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.create_time() == created:
                    left.append(f"{pid} ({name}, {proc.status()})")
        return left

    def log_lines(self) -> list[str]:
        self.watch.poll()
        return self.watch.lines


class PylbInPlace(Subject):
    """pylb reloaded in place: SIGUSR2, SIGHUP or `reload` on the stats socket."""

    proxy = "pylb"
    done_re = re.compile(r"master: reload (\d+) done|master: reload failed")

    def __init__(self, method: str, *args: Any, **kw: Any) -> None:
        self.method = method
        super().__init__(*args, **kw)
        self.cfg = self.tmp / "pylb.yaml"
        self.sock = self.tmp / "pylb.sock"
        self.pidfile = self.tmp / "pylb.pid"
        self.master: Managed | None = None
        self.reloads = 0

    def config(self) -> dict[str, Any]:
        opts = BenchOptions(
            duration=0,
            connections=0,
            workers=WORKERS,
            mode="http",
            checks=False,
            json_path=None,
            only=("pylb",),
            warmup=0,
            keep_tmp=False,
        )
        if self.tunnel is not None:
            cfg = self.tunnel.pylb_config(self.port, self.backends)
        else:
            cfg = pylb_config(opts, self.port, self.backends)
        cfg["global"]["stats"] = {
            "socket": str(self.sock),
            "level": "admin",
            "expose-fd": "listeners",
        }
        return cfg

    def write_config(self) -> None:
        assert self.tools.pylb is not None
        write(self.cfg, pylb_yaml(self.config()))
        check = subprocess.run(
            [self.tools.pylb, "-c", "-f", str(self.cfg)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
            env=pylb_env(),
        )
        if check.returncode != 0:
            raise BenchError(f"pylb -c rejected {self.cfg}:\n{check.stdout}{check.stderr}")

    def argv(self, *extra: str) -> list[str]:
        assert self.tools.pylb is not None
        return [self.tools.pylb, "-f", str(self.cfg), "-p", str(self.pidfile), *extra]

    def start(self) -> None:
        self.write_config()
        self.master = spawn("pylb", self.argv(), self.log_path, cwd=REPO, env=pylb_env())
        wait_ready(self.master, [self.port])

    def reload(self) -> Outcome:
        assert self.master is not None
        began = time.monotonic()
        if self.method == "socket":
            ok, detail = self._socket_reload()
            self.reloads += ok
            return Outcome(ok, time.monotonic() - began, detail, hung=detail == "no answer")
        sig = signal.SIGUSR2 if self.method == "usr2" else signal.SIGHUP
        ack = re.compile(rf"master: {sig.name}: reloading")
        outcome, m = self.signal_reload(self.master, sig, ack, self.done_re)
        if m is None:
            return outcome
        took = outcome.seconds
        if m.group(1) is None:
            return Outcome(False, took, m.group(0))
        self.reloads += 1
        if int(m.group(1)) != self.reloads:
            return Outcome(True, took, f"pylb counts reload {m.group(1)}, we sent {self.reloads}")
        return Outcome(True, took)

    def _socket_reload(self) -> tuple[bool, str]:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(RELOAD_WAIT)
                s.connect(str(self.sock))
                s.sendall(b"reload\n")
                answer = b""
                while chunk := s.recv(4096):
                    answer += chunk
        except TimeoutError:
            return False, "no answer"
        except OSError as exc:
            return False, f"stats socket: {exc}"
        text = answer.decode(errors="replace")
        if text.startswith("Success=1"):
            return True, ""
        return False, " | ".join(text.strip().splitlines()) or "empty answer"

    def roots(self) -> list[int]:
        return [self.master.pid] if self.master is not None and self.master.alive() else []

    def expected(self) -> int:
        return 1 + 1 + WORKERS  # master, its worker template, the workers

    def stop(self) -> None:
        if self.master is not None:
            self.outlived += stop_checked(self.master)

    def census(self) -> list[Census]:
        return [c for pid in self.roots() if (c := pylb_census(pid)) is not None]

    def workers(self) -> list[psutil.Process]:
        return [proc for c in self.census() for _, _, proc in c.workers]

    def current_root(self) -> int:
        return self.master.pid if self.master is not None else 0

    def usage(self) -> Usage | None:
        """The current master, its template and its newest generation's workers."""
        if self.master is None or (c := pylb_census(self.master.pid)) is None:
            return None
        use = Usage()
        use.add("master", [c.master])
        use.add("template", [c.template] if c.template is not None else [])
        use.add("workers", c.current)
        return use


class PylbTakeover(PylbInPlace):
    """pylb replaced by a new process each time: `pylb -f CFG -p PIDFILE -sf OLDPID`."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__("sf", *args, **kw)
        self.procs: list[Managed] = []  # every pylb started, in order

    def start(self) -> None:
        self.write_config()
        first = spawn("pylb", self.argv(), self.log_path, append=True, cwd=REPO, env=pylb_env())
        self.procs.append(first)
        self.master = first
        wait_ready(first, [self.port])

    def reload(self) -> Outcome:
        assert self.master is not None
        old = self.master.pid
        began = time.monotonic()
        new = spawn(
            "pylb",
            self.argv("-sf", str(old)),
            self.log_path,
            append=True,
            cwd=REPO,
            env=pylb_env(),
        )
        self.procs.append(new)
        done = re.compile(
            rf"pylb\[{new.pid}\] master: (sent SIGUSR1 to old process {old}"
            rf"|old process {old} is already gone)"
        )
        m = self.watch.wait_for(done, RELOAD_WAIT, new.alive)
        took = time.monotonic() - began
        if m is None:
            if not new.alive():
                return Outcome(
                    False, took, f"new pylb {new.pid} exited with status {new.proc.returncode}"
                )
            return Outcome(
                False, took, f"new pylb {new.pid} not ready within {RELOAD_WAIT:.0f}s", hung=True
            )
        self.master = new
        self.reloads += 1
        notes = [
            line for line in self.watch.lines[-50:] if f"pylb[{new.pid}]" in line and "anew" in line
        ]
        try:
            in_file = int(self.pidfile.read_text().strip() or 0)
        except (OSError, ValueError):
            in_file = 0
        if in_file != new.pid:
            notes.append(f"pidfile holds {in_file}, not {new.pid}")
        return Outcome(True, took, "; ".join(notes))

    def reap(self) -> None:
        for proc in self.procs:
            proc.proc.poll()
        super().reap()

    def roots(self) -> list[int]:
        return [p.pid for p in self.procs if p.alive()]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            self.outlived += stop_checked(proc)


class HaproxyMasterWorker(Subject):
    """`haproxy -W`: the master re-executes itself on SIGUSR2 and starts a new worker."""

    proxy = "haproxy"
    method = "usr2"
    loaded_re = re.compile(r"Loading (success|failure)")
    reloading_re = re.compile(r"Reloading HAProxy")

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.cfg = self.tmp / "haproxy.cfg"
        self.sock = self.tmp / "haproxy.sock"
        self.pidfile = self.tmp / "haproxy.pid"
        self.master: Managed | None = None

    def write_config(self) -> None:
        assert self.tools.haproxy is not None
        opts = BenchOptions(
            duration=0,
            connections=0,
            workers=1,
            mode="http",
            checks=False,
            json_path=None,
            only=("haproxy",),
            warmup=0,
            keep_tmp=False,
        )
        if self.tunnel is not None:
            base = self.tunnel.haproxy_config(self.port, self.backends)
        else:
            base = haproxy_config(opts, self.port, self.backends)
        text = base.replace(
            "global\n",
            f"global\n    stats socket {self.sock} mode 600 level admin expose-fd listeners\n",
            1,
        )
        write(self.cfg, text)
        check = subprocess.run(
            [self.tools.haproxy, "-c", "-f", str(self.cfg)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check.returncode != 0:
            raise BenchError(f"haproxy -c rejected {self.cfg}:\n{check.stdout}{check.stderr}")

    def start(self) -> None:
        assert self.tools.haproxy is not None
        self.write_config()
        argv = [self.tools.haproxy, "-W", "-f", str(self.cfg), "-p", str(self.pidfile)]
        self.master = spawn("haproxy", argv, self.log_path)
        wait_ready(self.master, [self.port])
        if self.watch.wait_for(self.loaded_re, RELOAD_WAIT, self.master.alive) is None:
            raise BenchError(f"haproxy -W did not report 'Loading success' ({self.log_path})")

    def reload(self) -> Outcome:
        assert self.master is not None
        outcome, m = self.signal_reload(
            self.master,
            signal.SIGUSR2,
            self.reloading_re,
            self.loaded_re,
            sends=HAPROXY_SENDS,
            ack_wait=HAPROXY_RESEND,
        )
        if m is None or m.group(1) == "success":
            return outcome
        return Outcome(False, outcome.seconds, m.group(0), resent=outcome.resent)

    def roots(self) -> list[int]:
        return [self.master.pid] if self.master is not None and self.master.alive() else []

    def expected(self) -> int:
        return 2  # master + one worker

    def stop(self) -> None:
        if self.master is not None:
            self.outlived += stop_checked(self.master)

    def workers(self) -> list[psutil.Process]:
        if self.master is None:
            return []
        with contextlib.suppress(psutil.Error):
            return [c for c in psutil.Process(self.master.pid).children() if _alive(c.pid)]
        return []

    def current_root(self) -> int:
        return self.master.pid if self.master is not None else 0

    def usage(self) -> Usage | None:
        """The master and its newest worker."""
        if self.master is None:
            return None
        try:
            master = psutil.Process(self.master.pid)
            children = [c for c in master.children() if _alive(c.pid)]
        except psutil.Error:
            return None
        use = Usage()
        use.add("master", [master])
        use.add("workers", sorted(children, key=created)[-1:])
        return use


class HaproxyClassic(HaproxyMasterWorker):
    """`haproxy -f CFG -p PIDFILE -D -sf OLDPID -x SOCK`: a new daemon each time, taking the
    listening sockets from the old one over its stats socket."""

    method = "sf"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.daemons: list[int] = []  # pids read from the pidfile, in order
        self.current = 0

    def _launch(self, extra: list[str]) -> tuple[bool, str, int]:
        """Run one launcher to its exit; (ok, why not, daemon pid)."""
        assert self.tools.haproxy is not None
        argv = [self.tools.haproxy, "-f", str(self.cfg), "-p", str(self.pidfile), "-D", *extra]
        launcher = spawn("haproxy", argv, self.log_path, append=True)
        try:
            status = launcher.proc.wait(RELOAD_WAIT)
        except subprocess.TimeoutExpired:
            launcher.stop()
            return False, f"launcher did not exit within {RELOAD_WAIT:.0f}s", 0
        if status != 0:
            return False, f"launcher exited with status {status}", 0
        try:
            pid = int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return False, "no pid in the pidfile", 0
        if pid in self.daemons:
            return False, f"pidfile still holds the old pid {pid}", 0
        self.daemons.append(pid)
        self.current = pid
        return True, "", pid

    def start(self) -> None:
        self.write_config()
        ok, why, pid = self._launch([])
        if not ok:
            raise BenchError(f"haproxy -D: {why}; log {self.log_path}")
        deadline = time.monotonic() + 20
        while not http_ok(self.port):
            if time.monotonic() > deadline or not psutil.pid_exists(pid):
                raise BenchError(f"haproxy -D (pid {pid}) not serving; log {self.log_path}")
            time.sleep(0.05)

    def reload(self) -> Outcome:
        began = time.monotonic()
        ok, why, _pid = self._launch(["-sf", str(self.current), "-x", str(self.sock)])
        return Outcome(ok, time.monotonic() - began, why, hung="did not exit" in why)

    def roots(self) -> list[int]:
        return [pid for pid in self.daemons if _alive(pid)]

    def expected(self) -> int:
        return 1

    def workers(self) -> list[psutil.Process]:
        found = []
        for pid in self.roots():
            with contextlib.suppress(psutil.Error):
                found.append(psutil.Process(pid))
        return found

    def current_root(self) -> int:
        return self.current

    def usage(self) -> Usage | None:
        """The current daemon."""
        if not self.current:
            return None
        use = Usage()
        with contextlib.suppress(psutil.Error):
            use.add("daemon", [psutil.Process(self.current)])
        return use

    def stop(self) -> None:
        pids = self.roots()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            reap_adopted()
            time.sleep(0.05)
        for pid in pids:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
        reap_adopted()


def _alive(pid: int) -> bool:
    """Running, i.e. existing and not a zombie (ours or anybody's)."""
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    return False


def make_subject(
    proxy: str,
    method: str,
    tools: Tools,
    tmp: Path,
    port: int,
    backends: tuple[int, int],
    tunnel: TunnelLayout | None = None,
) -> Subject:
    args = (tools, tmp, port, backends)
    if proxy == "pylb":
        if method == "sf":
            return PylbTakeover(*args, tunnel=tunnel)
        return PylbInPlace(method, *args, tunnel=tunnel)
    if method == "sf":
        return HaproxyClassic(*args, tunnel=tunnel)
    return HaproxyMasterWorker(*args, tunnel=tunnel)


# --------------------------------------------------------------------------- wrk


def start_wrk(wrk: str, port: int, connections: int, duration: int) -> subprocess.Popen[str]:
    argv = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "5s",
        "--latency",
        f"http://127.0.0.1:{port}/",
    ]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    SPAWNED.add(proc.pid)
    return proc


def finish_wrk(proc: subprocess.Popen[str], timeout: float) -> WrkResult:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {timeout:.0f}s") from exc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise BenchError(f"wrk exited with status {proc.returncode}:\n{out}")
    return parse_wrk(out)


@contextlib.contextmanager
def wrk_running(
    wrk: str, port: int, connections: int, duration: int
) -> Iterator[subprocess.Popen[str]]:
    proc = start_wrk(wrk, port, connections, duration)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- one run


class Record(Protocol):
    """What a run's result keeps in both scenarios (RunResult here, TunnelResult in
    bench/tunnels.py)."""

    reloads: int  # reloads done (confirmed by the proxy)
    reload_failures: int  # reloads refused or failed (the proxy said so)
    reload_errors: list[str]
    signals_resent: int
    left_after_stop: list[str]
    outlived_stop: list[str]
    processes_seen: int

    @property
    def ok(self) -> bool:
        """The run passed: it counts for the exit status."""
        ...


ResultT = TypeVar("ResultT", bound=Record)


def count_reload(result: Record, outcome: Outcome, label: str) -> None:
    """Count one reload as done or failed; a note named `label` if the proxy said more."""
    result.signals_resent += outcome.resent
    if outcome.ok:
        result.reloads += 1
    else:
        result.reload_failures += 1
    if outcome.detail:
        result.reload_errors.append(
            f"{label} ({'ok' if outcome.ok else 'FAILED'}): {outcome.detail}"
        )


@dataclass
class RunResult:
    proxy: str
    method: str
    description: str
    port: int = 0
    wrk: WrkResult | None = None
    reloads: int = 0  # reloads done (confirmed by the proxy)
    reload_failures: int = 0  # reloads refused or failed (the proxy said so)
    reload_s: list[float] = field(default_factory=list)
    reload_starts: list[float] = field(default_factory=list)  # s after the loop began
    late: int = 0  # reloads that started more than LATE after their time
    reload_errors: list[str] = field(default_factory=list)
    signals_resent: int = 0
    hung: str | None = None
    peak_processes: int = 0
    peak_workers: int = 0  # pylb: workers at once, the template not counted
    template_missing: int = 0  # pylb: samples in which a live master had no template
    workers_started: dict[str, int] = field(default_factory=dict)  # pylb: by how
    after_drain: int | None = None
    expected_after_drain: int = 0
    after_drain_list: list[str] = field(default_factory=list)
    roles_after_drain: str = ""  # pylb: "1 master + 1 template + 2 workers"
    templates_ok: bool | None = None  # pylb: exactly one template per master after drain
    usage_start: Usage | None = None  # after reload FLAT_AFTER
    usage_end: Usage | None = None  # after the last reload
    usage_drained: Usage | None = None  # after the drain
    # after every reload: s after the loop began, rss, fds (all current), the same of the
    # master alone (HAProxy -D: of the daemon)
    usage_series: list[tuple[float, int, int, int, int]] = field(default_factory=list)
    respawn_asked: int = 0
    respawn_ms: list[float] = field(default_factory=list)  # kill -> replacement accepts
    respawn_started_ms: list[float] = field(default_factory=list)  # kill -> "started" line
    respawn_how: dict[str, int] = field(default_factory=dict)
    respawn_victim_conns: list[int] = field(default_factory=list)  # client conns it held
    respawn_errors: list[str] = field(default_factory=list)
    respawn_wrk: WrkResult | None = None
    after_respawn: int | None = None
    roles_after_respawn: str = ""
    left_after_stop: list[str] = field(default_factory=list)
    outlived_stop: list[str] = field(default_factory=list)  # left running by the proxy
    processes_seen: int = 0
    notable_log: list[str] = field(default_factory=list)
    log_path: str = ""
    error: str | None = None

    @property
    def failures(self) -> int | None:
        return None if self.wrk is None else self.wrk.errors

    @property
    def per_100_reloads(self) -> float | None:
        if self.failures is None or self.reloads == 0:
            return None
        return self.failures * 100 / self.reloads

    @property
    def achieved_rate(self) -> float | None:
        """Reloads a second, start to start, from the first reload to the last."""
        starts = self.reload_starts
        if len(starts) < 2 or starts[-1] <= starts[0]:
            return None
        return (len(starts) - 1) / (starts[-1] - starts[0])

    @property
    def leak_ok(self) -> bool:
        return (
            self.after_drain == self.expected_after_drain
            and self.templates_ok is not False
            and self.after_respawn in (None, self.expected_after_drain)
            and not self.left_after_stop
            and not self.outlived_stop
        )

    @property
    def respawn_ok(self) -> bool:
        return not self.respawn_errors and len(self.respawn_ms) == self.respawn_asked

    @property
    def ok(self) -> bool:
        """No run error, no hung reload, nothing leaked, every respawn measured."""
        return not (self.error or self.hung or not self.leak_ok or not self.respawn_ok)


def reload_loop(
    subject: Subject,
    wrk: subprocess.Popen[str],
    opts: Options,
    result: RunResult,
    rng: random.Random,
) -> None:
    """Reload every INTERVAL or 1/--rate s (start to start) until shortly before wrk ends.
    With --rate the starts keep to a grid, except after a late start (a reload that ran
    over), from which the grid starts anew: no burst to catch up."""
    began = time.monotonic()
    end = began + opts.duration - LAST_RELOAD_MARGIN
    next_at = began + FIRST_RELOAD_DELAY
    while True:
        now = time.monotonic()
        if next_at > end or wrk.poll() is not None:
            return
        if next_at > now:
            time.sleep(next_at - now)
        started = time.monotonic()
        late = started - next_at > LATE
        result.late += late
        result.reload_starts.append(started - began)
        outcome = subject.reload()
        subject.reap()
        result.reload_s.append(outcome.seconds)
        count_reload(result, outcome, f"reload #{len(result.reload_s)} at {started - began:.2f}s")
        result.peak_processes = max(result.peak_processes, subject.sample())
        count_roles(subject, result)
        use = subject.usage()
        if use is not None:
            first = next(iter(use.parts.values()), (0, 0, 0))
            result.usage_series.append(
                (round(time.monotonic() - began, 3), use.rss, use.fds, first[0], first[1])
            )
            if len(result.reload_s) == FLAT_AFTER:
                result.usage_start = use
            result.usage_end = use
        if outcome.hung:
            result.hung = outcome.detail
            log(
                f"{subject.proxy} {subject.method}: reload HUNG: {outcome.detail}; "
                "no more reloads in this run"
            )
            return
        if opts.rate is None:
            next_at = started + rng.uniform(*INTERVAL)
        else:
            next_at = (started if late else next_at) + 1 / opts.rate


def count_roles(subject: Subject, result: RunResult) -> None:
    """pylb: workers at once (not the template), and masters seen without a template."""
    workers = 0
    for census in subject.census():
        workers += len(census.workers)
        result.template_missing += census.template is None
    result.peak_workers = max(result.peak_workers, workers)


def drain(subject: Subject) -> list[psutil.Process]:
    """Wait (bounded) until only the expected processes remain."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while True:
        subject.reap()
        subject.sample()
        procs = subject.processes()
        if len(procs) <= subject.expected() or time.monotonic() > deadline:
            return procs
        time.sleep(0.1)


def check_roles(subject: Subject) -> tuple[str, bool | None]:
    """pylb: the live processes by role, and whether each master has exactly one
    template (its forks re-titled: looked at again after a moment if not)."""
    for attempt in range(3):
        censuses = subject.census()
        if not censuses:
            return "", None
        ok = all(c.template is not None and not c.transient for c in censuses)
        if ok or attempt == 2:
            return "; ".join(c.roles() for c in censuses), ok
        time.sleep(0.2)
    return "", None


def stray_pylb() -> list[str]:
    """Processes below this script that look like pylb's (master, template, worker)."""
    found = []
    with contextlib.suppress(psutil.Error):
        for proc in psutil.Process().children(recursive=True):
            name = title(proc)
            if name.startswith("pylb:") or any(
                word in name for word in ("lb.template", "lb.worker", "bin/pylb")
            ):
                with contextlib.suppress(psutil.Error):
                    found.append(f"{proc.pid} ({name}, {proc.status()})")
    return found


def after_stop(subject: Subject) -> list[str]:
    """Processes of the run still there after the stop: any seen in the run, and any
    pylb-looking process below this script (a template or worker never sampled)."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while True:
        subject.reap()
        left = subject.leftovers()
        if subject.proxy == "pylb":
            left += [p for p in stray_pylb() if p not in left]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def stop_subject(subject: Subject, result: Record) -> None:
    """Stop the proxy; note what outlived it, what is left and how many processes it had."""
    subject.stop()
    result.outlived_stop = subject.outlived
    result.left_after_stop = after_stop(subject)
    result.processes_seen = len(subject.seen)


def count_started(lines: list[str]) -> dict[str, int]:
    """pylb: workers started, by how (forked from the template, new interpreter)."""
    counts: dict[str, int] = {}
    for line in lines:
        m = STARTED_RE.search(line)
        if m:
            how = "forked" if m.group(1).startswith("forked") else "new interpreter"
            counts[how] = counts.get(how, 0) + 1
    return counts


# --------------------------------------------------------------------------- respawn


def respawn_phase(subject: PylbInPlace, tools: Tools, opts: Options, result: RunResult) -> None:
    """Under a new wrk run, kill -9 a current worker `opts.respawn` times, at least
    RESPAWN_SPACING apart (start to start) and each time once the previous replacement
    accepts; time each from the kill to the master's `(pid P) accepts` line of the
    replacement (its millisecond stamp). wrk's errors here are not counted as failures:
    the requests in flight on a killed worker are lost."""
    result.respawn_asked = opts.respawn
    seconds = math.ceil(RESPAWN_FIRST + opts.respawn * RESPAWN_SPACING + 3)
    log(
        f"{subject.proxy} {subject.method}: respawn: kill -9 a worker {opts.respawn} times "
        f"under wrk -c{opts.connections} -d{seconds}s"
    )
    with wrk_running(tools.wrk, subject.port, opts.connections, seconds) as wrk:
        next_at = time.monotonic() + RESPAWN_FIRST
        for k in range(opts.respawn):
            now = time.monotonic()
            if next_at > now:
                time.sleep(next_at - now)
            if wrk.poll() is not None:
                result.respawn_errors.append(f"wrk ended after {k} kills: the rest not done")
                break
            killed_at = time.monotonic()
            why = respawn_once(subject, k, result)
            subject.reap()
            subject.sample()
            if why:
                result.respawn_errors.append(f"kill #{k + 1}: {why}")
                if subject.master is None or not subject.master.alive():
                    break
            next_at = killed_at + RESPAWN_SPACING
        result.respawn_wrk = finish_wrk(wrk, seconds + WRK_GRACE)


def respawn_once(subject: PylbInPlace, k: int, result: RunResult) -> str:
    """Kill one worker of the current generation (worker k % WORKERS + 1 when there) and
    wait for its replacement to accept; "" or why it failed."""
    master = subject.master
    if master is None or not master.alive() or (c := pylb_census(master.pid)) is None:
        return "the master is gone"
    titled = sorted((gen, index, proc) for gen, index, proc in c.workers if gen)
    if not titled:
        return "no titled worker to kill"
    newest = titled[-1][0]
    current = [(index, proc) for gen, index, proc in titled if gen == newest]
    index, victim = next(((i, p) for i, p in current if i == k % WORKERS + 1), current[0])
    started_re = re.compile(
        rf"worker {index}/{WORKERS} gen {newest} started \(pid (\d+), ([a-z ]+)\)"
    )
    result.respawn_victim_conns.append(client_connections(victim, subject.port))
    subject.watch.skip()
    kill_time = time.time()
    try:
        os.kill(victim.pid, signal.SIGKILL)
    except ProcessLookupError:
        return f"worker {victim.pid} gone before the kill"
    m = subject.watch.wait_for(started_re, RESPAWN_WAIT, master.alive)
    if m is None:
        return f"no replacement of worker {index} (pid {victim.pid}) within {RESPAWN_WAIT:.0f}s"
    new, how = int(m.group(1)), m.group(2)
    started = log_time(m.string)
    accepts = subject.watch.wait_for(
        re.compile(rf"\(pid {new}\) accepts"), RESPAWN_WAIT, master.alive
    )
    if accepts is None:
        return f"replacement {new} of worker {index} not accepting within {RESPAWN_WAIT:.0f}s"
    accepted = log_time(accepts.string)
    if started is None or accepted is None:
        return f"no time stamp in {accepts.string!r}"
    result.respawn_ms.append((accepted - kill_time) * 1000)
    result.respawn_started_ms.append((started - kill_time) * 1000)
    key = "forked" if how.startswith("forked") else how
    result.respawn_how[key] = result.respawn_how.get(key, 0) + 1
    return ""


def client_connections(proc: psutil.Process, port: int) -> int:
    """Established connections `proc` holds on the proxy's port (from wrk)."""
    with contextlib.suppress(psutil.Error):
        return sum(
            1
            for c in proc.net_connections(kind="tcp")
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
        )
    return 0


# --------------------------------------------------------------------------- run


def run_one(
    proxy: str,
    method: str,
    opts: Options,
    tools: Tools,
    tmp: Path,
    backends: tuple[int, int],
    rng: random.Random,
) -> RunResult:
    result = RunResult(proxy, method, DESCRIPTION[(proxy, method)])
    rundir = tmp / f"{proxy}-{method}"
    rundir.mkdir()
    result.port = free_ports(1)[0]
    subject = make_subject(proxy, method, tools, rundir, result.port, backends)
    result.log_path = str(subject.log_path)
    log(
        f"{proxy} {method} ({result.description}): wrk -c{opts.connections} "
        f"-d{opts.duration}s -> 127.0.0.1:{result.port}, {pacing(opts)}"
    )
    try:
        try:
            subject.start()
            subject.sample()
            with wrk_running(tools.wrk, result.port, opts.connections, opts.duration) as wrk:
                reload_loop(subject, wrk, opts, result, rng)
                result.wrk = finish_wrk(wrk, opts.duration + WRK_GRACE + RELOAD_WAIT)
            procs = drain(subject)
            result.after_drain = len(procs)
            result.expected_after_drain = subject.expected()
            result.after_drain_list = sorted(f"{p.pid} {title(p)}" for p in procs)
            result.roles_after_drain, result.templates_ok = check_roles(subject)
            result.usage_drained = subject.usage()
            if proxy == "pylb":
                result.workers_started = count_started(subject.log_lines())
            if (
                isinstance(subject, PylbInPlace)
                and opts.respawn
                and not result.hung
                and result.after_drain == result.expected_after_drain
            ):
                respawn_phase(subject, tools, opts, result)
                procs = drain(subject)
                result.after_respawn = len(procs)
                result.roles_after_respawn, ok = check_roles(subject)
                result.templates_ok = result.templates_ok is not False and ok is not False
            elif isinstance(subject, PylbInPlace) and opts.respawn:
                log(f"{proxy} {method}: respawn skipped (a reload hung or the drain did not end)")
        finally:
            stop_subject(subject, result)
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        result.error = str(exc)
        log(f"{proxy} {method}: FAILED: {exc}")
    lines = subject.log_lines()
    result.notable_log = [line for line in lines if NOTABLE.search(line)]
    print_check(result, opts)
    return result


def mib(n: int) -> str:
    return f"{n / MIB:.1f}"


def usage_change(a: Usage | None, b: Usage | None) -> tuple[str, str]:
    """("rss MiB start->end", "fds start->end") of two samples."""
    if a is None or b is None:
        return "-", "-"
    return f"{mib(a.rss)}->{mib(b.rss)}", f"{a.fds}->{b.fds}"


def usage_parts(a: Usage, b: Usage) -> str:
    parts = []
    for role in a.parts:
        ra, fa, na = a.parts[role]
        rb, fb, nb = b.parts.get(role, (0, 0, 0))
        count = f" x{na}" if na == nb and na != 1 else f" x{na}->{nb}" if na != nb else ""
        parts.append(f"{role}{count} {mib(ra)}->{mib(rb)} MiB, {fa}->{fb} fds")
    return "; ".join(parts)


def print_check(r: RunResult, opts: Options) -> None:
    name = f"{r.proxy} {r.method}"
    if r.after_drain is None:
        drained = "not measured"
    else:
        drained = (
            f"{r.after_drain} processes after drain (expected {r.expected_after_drain})"
            f"{'' if r.after_drain == r.expected_after_drain else ' MISMATCH'}"
        )
        if r.roles_after_drain:
            drained += f": {r.roles_after_drain}"
    workers = f" ({r.peak_workers} workers)" if r.proxy == "pylb" else ""
    left = (
        "none left after stop"
        if not r.left_after_stop
        else f"LEFT AFTER STOP: {', '.join(r.left_after_stop)}"
    )
    if r.outlived_stop:
        left += f"; OUTLIVED ITS MASTER (killed by the script): {', '.join(r.outlived_stop)}"
    print(
        f"check {name}: {r.processes_seen} processes seen in the run, peak "
        f"{r.peak_processes} at once{workers}; {drained}; {left}",
        flush=True,
    )
    if r.after_drain is not None and r.after_drain != r.expected_after_drain:
        for line in r.after_drain_list:
            print(f"    still there: {line}", flush=True)
    if r.templates_ok is False:
        print(f"WARNING: {name}: not exactly one worker template per master", flush=True)
    if r.template_missing:
        print(
            f"WARNING: {name}: {r.template_missing} samples found a master without its "
            "worker template",
            flush=True,
        )
    if r.workers_started:
        how = ", ".join(f"{n} {k}" for k, n in sorted(r.workers_started.items()))
        print(f"    {name}: workers started: {how}", flush=True)
    rate = r.achieved_rate
    if rate is not None:
        print(
            f"    {name}: {len(r.reload_starts)} reloads in "
            f"{r.reload_starts[-1] - r.reload_starts[0]:.1f}s = {rate:.2f}/s start to start"
            f"{f' (asked {opts.rate:g}/s)' if opts.rate else ''}; {r.late} started more "
            f"than {LATE * 1000:.0f} ms late",
            flush=True,
        )
    if r.usage_start is not None and r.usage_end is not None:
        print(
            f"    {name}: after reload {FLAT_AFTER} -> after the last: "
            f"{usage_parts(r.usage_start, r.usage_end)}",
            flush=True,
        )
    if r.usage_series:
        role = next(iter(r.usage_start.parts)) if r.usage_start else "first"
        print(
            f"    {name}: highest after any reload: {mib(max(u[1] for u in r.usage_series))} "
            f"MiB, {max(u[2] for u in r.usage_series)} fds in all; {role} "
            f"{mib(max(u[3] for u in r.usage_series))} MiB, "
            f"{max(u[4] for u in r.usage_series)} fds",
            flush=True,
        )
    if r.usage_drained is not None:
        print(
            f"    {name}: after the drain: {mib(r.usage_drained.rss)} MiB, "
            f"{r.usage_drained.fds} fds in {r.usage_drained.procs} processes",
            flush=True,
        )
    if r.respawn_asked:
        print(
            f"    {name}: respawn: {len(r.respawn_ms)}/{r.respawn_asked} measured; kill -> "
            f"accepts ms {fmt_ms(r.respawn_ms)}; kill -> started ms "
            f"{fmt_ms(r.respawn_started_ms)}; {respawn_how(r)}; wrk during it: "
            f"{respawn_wrk(r)} (the killed workers held {sum(r.respawn_victim_conns)} client "
            f"connections: {'+'.join(map(str, r.respawn_victim_conns)) or '-'}); after it: "
            f"{r.after_respawn} processes "
            f"({r.roles_after_respawn})",
            flush=True,
        )
        for line in r.respawn_errors:
            print(f"WARNING: {name}: respawn: {line}", flush=True)
    if r.error is None:
        if opts.rate is None and r.reloads < MIN_RELOADS:
            print(
                f"WARNING: {name}: only {r.reloads} reloads done (wanted >= {MIN_RELOADS})",
                flush=True,
            )
        if opts.rate is not None and (rate is None or rate < opts.rate * RATE_SHORTFALL):
            print(
                f"WARNING: {name}: {fmt(rate, '.2f')} reloads/s, asked {opts.rate:g}",
                flush=True,
            )
    if r.hung:
        print(f"WARNING: {name}: a reload hung: {r.hung}", flush=True)


def fmt_ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"p50 {statistics.median(values):.0f} max {max(values):.0f}"


def respawn_how(r: RunResult) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(r.respawn_how.items())) or "none started"


def respawn_wrk(r: RunResult) -> str:
    w = r.respawn_wrk
    if w is None:
        return "-"
    kinds = [f"{k} {n}" for k, n in w.socket_errors.items() if n]
    if w.non2xx:
        kinds.append(f"non-2xx {w.non2xx}")
    detail = f" ({', '.join(kinds)})" if kinds else ""
    return f"{w.requests} requests, {w.errors} errors{detail}"


# --------------------------------------------------------------------------- report


def align(rows: list[list[str]], left: int) -> str:
    """Rows as columns: the first `left` cells left-aligned, the others right-aligned;
    a short row (a failure) is joined as it is."""
    head = rows[0]
    full = [row for row in rows if len(row) == len(head)]
    width = [max(len(row[i]) for row in full) for i in range(len(head))]
    lines = []
    for row in rows:
        if len(row) != len(head):
            cells = [c.ljust(w) for c, w in zip(row[:-1], width, strict=False)]
            lines.append("  ".join([*cells, row[-1]]))
            continue
        cells = [c.ljust(w) for c, w in zip(row[:left], width[:left], strict=True)]
        cells += [c.rjust(w) for c, w in zip(row[left:], width[left:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def table(results: list[RunResult]) -> str:
    head = [
        "proxy",
        "method",
        "how",
        "requests",
        "req/s",
        "reloads",
        "reloads/s",
        "reload fail",
        "failures",
        "/100 reloads",
        "connect",
        "read",
        "write",
        "timeout",
        "non-2xx",
        "reload ms p50",
        "max",
        "procs ok",
    ]
    rows = [head]
    for r in results:
        if r.wrk is None:
            rows.append([r.proxy, r.method, r.description, f"FAILED: {r.error}"])
            continue
        sock = r.wrk.socket_errors
        rows.append(
            [
                r.proxy,
                r.method,
                r.description,
                str(r.wrk.requests),
                fmt(r.wrk.rps, ".0f"),
                str(r.reloads),
                fmt(r.achieved_rate, ".2f"),
                str(r.reload_failures),
                str(r.failures),
                fmt(r.per_100_reloads, ".1f"),
                str(sock["connect"]),
                str(sock["read"]),
                str(sock["write"]),
                str(sock["timeout"]),
                str(r.wrk.non2xx),
                fmt(statistics.median(r.reload_s) * 1000 if r.reload_s else None, ".0f"),
                fmt(max(r.reload_s) * 1000 if r.reload_s else None, ".0f"),
                "yes" if r.leak_ok else "NO",
            ]
        )
    return align(rows, 3)


def process_table(results: list[RunResult]) -> str:
    head = [
        "proxy",
        "method",
        "processes after drain",
        "peak procs",
        "peak workers",
        f"rss MiB {FLAT_AFTER}->last",
        f"fds {FLAT_AFTER}->last",
        "respawns",
        "respawn ms p50",
        "max",
        "respawn wrk errors",
    ]
    rows = [head]
    for r in results:
        if r.after_drain is None:
            rows.append([r.proxy, r.method, f"FAILED: {r.error}"])
            continue
        rss, fds = usage_change(r.usage_start, r.usage_end)
        procs = r.roles_after_drain or f"{r.after_drain} (expected {r.expected_after_drain})"
        if r.proxy != "pylb":
            respawns, p50, top, errors = "n/a", "n/a", "n/a", "n/a"
        elif not r.respawn_asked:
            respawns, p50, top, errors = "-", "-", "-", "-"
        else:
            respawns = f"{len(r.respawn_ms)}/{r.respawn_asked}"
            p50 = fmt(statistics.median(r.respawn_ms) if r.respawn_ms else None, ".0f")
            top = fmt(max(r.respawn_ms) if r.respawn_ms else None, ".0f")
            errors = str(r.respawn_wrk.errors) if r.respawn_wrk else "-"
        rows.append(
            [
                r.proxy,
                r.method,
                procs,
                str(r.peak_processes),
                str(r.peak_workers) if r.proxy == "pylb" else "-",
                rss,
                fds,
                respawns,
                p50,
                top,
                errors,
            ]
        )
    return align(rows, 3)


def report(opts: Options, tools: Tools, results: list[RunResult], subreaper: bool) -> None:
    print(
        f"\nreload under load: wrk -t1 -c{opts.connections} --timeout 5s, {opts.duration}s "
        f"per method, {pacing(opts)}; pylb workers={WORKERS}; failures = socket errors + "
        "non-2xx\n"
    )
    print(table(results))
    print(
        f"\nprocesses and resources (rss, fds: current processes after reload {FLAT_AFTER} "
        f"-> after the last reload; respawn: kill -9 of a pylb worker -> its replacement "
        "accepts)\n"
    )
    print(process_table(results))
    for r in results:
        if r.reload_errors:
            resent = f"; signals sent again: {r.signals_resent}" if r.signals_resent else ""
            print(f"\n{r.proxy} {r.method}: reload notes ({len(r.reload_errors)}{resent}):")
            for line in r.reload_errors[:10]:
                print(f"    {line}")
            if len(r.reload_errors) > 10:
                print(f"    ... {len(r.reload_errors) - 10} more")
    for r in results:
        if r.proxy != "pylb" or not (r.failures or r.reload_failures or r.hung or r.respawn_errors):
            continue
        if not r.notable_log:
            print(f"\n{r.proxy} {r.method}: no notable lines in {r.log_path}")
            continue
        print_notable(f"{r.proxy} {r.method}", r.log_path, r.notable_log)
    report_end(
        opts,
        subreaper,
        lambda: {"meta": meta(opts, tools), "results": [result_json(r) for r in results]},
    )
    if opts.plot:
        import plot  # here: only --plot needs it (and it imports matplotlib when drawing)

        plot.bars(opts.plot, chart(opts, run_meta(tools), results))
        print(f"\nchart written to {opts.plot}")


def print_notable(name: str, log_path: str, lines: list[str]) -> None:
    """The first NOTABLE_SHOWN notable lines of a run's proxy log."""
    print(f"\n{name}: notable lines of {log_path} ({len(lines)}):")
    for line in lines[:NOTABLE_SHOWN]:
        print(f"    {line}")
    if len(lines) > NOTABLE_SHOWN:
        print(f"    ... {len(lines) - NOTABLE_SHOWN} more")


def report_end(opts: Options, subreaper: bool, doc: Callable[[], dict[str, Any]]) -> None:
    """The end of either report: a note without the subreaper, and with --json, `doc()`
    written to the file."""
    if not subreaper:
        print("\nnote: PR_SET_CHILD_SUBREAPER unavailable: orphans are only found by pid")
    if opts.json_path:
        opts.json_path.write_text(json.dumps(doc(), indent=2) + "\n")
        print(f"\nJSON written to {opts.json_path}")


def meta(opts: Options, tools: Tools) -> dict[str, Any]:
    return {
        **run_meta(tools),
        "duration": opts.duration,
        "connections": opts.connections,
        "interval_ms": None if opts.rate else [INTERVAL[0] * 1000, INTERVAL[1] * 1000],
        "rate": opts.rate,
        "respawn": opts.respawn,
        "pylb_workers": WORKERS,
        "seed": opts.seed,
        "load_average": os.getloadavg(),
    }


def result_json(r: RunResult) -> dict[str, Any]:
    def use(u: Usage | None) -> dict[str, Any] | None:
        return None if u is None else u.json()

    return {
        "proxy": r.proxy,
        "method": r.method,
        "description": r.description,
        "error": r.error,
        "requests": r.wrk.requests if r.wrk else None,
        "rps": r.wrk.rps if r.wrk else None,
        "reloads": r.reloads,
        "reload_failures": r.reload_failures,
        "reloads_per_second": r.achieved_rate,
        "late_starts": r.late,
        "failures": r.failures,
        "failures_per_100_reloads": r.per_100_reloads,
        "reload_seconds": r.reload_s,
        "reload_starts": r.reload_starts,
        "reload_notes": r.reload_errors,
        "signals_resent": r.signals_resent,
        "hung": r.hung,
        "processes_seen": r.processes_seen,
        "peak_processes": r.peak_processes,
        "peak_workers": r.peak_workers,
        "template_missing_samples": r.template_missing,
        "workers_started": r.workers_started,
        "after_drain": r.after_drain,
        "expected_after_drain": r.expected_after_drain,
        "after_drain_processes": r.after_drain_list,
        "roles_after_drain": r.roles_after_drain,
        "templates_ok": r.templates_ok,
        "usage_start": use(r.usage_start),
        "usage_end": use(r.usage_end),
        "usage_drained": use(r.usage_drained),
        "usage_series": r.usage_series,
        "respawn": {
            "asked": r.respawn_asked,
            "kill_to_accepts_ms": r.respawn_ms,
            "kill_to_started_ms": r.respawn_started_ms,
            "how": r.respawn_how,
            "victim_client_connections": r.respawn_victim_conns,
            "errors": r.respawn_errors,
            "after": r.after_respawn,
            "roles_after": r.roles_after_respawn,
            "wrk": asdict(r.respawn_wrk) if r.respawn_wrk else None,
        },
        "left_after_stop": r.left_after_stop,
        "outlived_stop": r.outlived_stop,
        "notable_log": r.notable_log[:200],
        "log": r.log_path,
        "wrk": asdict(r.wrk) if r.wrk else None,
    }


# --------------------------------------------------------------------------- chart (--plot)


def chart(opts: Options, info: dict[str, Any], results: list[RunResult]) -> plot.Chart:
    """The report's figures as a chart, one group per method, one bar per proxy: failures,
    failures per 100 reloads, reload times, req/s and (pylb) respawn times."""
    import plot

    methods = tuple(dict.fromkeys(r.method for r in results))
    proxies = tuple(dict.fromkeys(r.proxy for r in results))
    by = {(r.proxy, r.method): r for r in results}

    def series(bar: Callable[[RunResult], plot.Bar]) -> dict[str, tuple[plot.Bar, ...]]:
        out = {}
        for proxy in proxies:
            got = tuple(run_bar(by.get((proxy, m)), bar) for m in methods)
            if any(b.value is not None or b.note for b in got):
                out[proxy] = got
        return out

    x = "reload method"
    panels = [
        plot.Panel("client failures during the reloads", "failed requests", methods,
                   series(lambda r: plot.Bar(r.failures)), ".0f", xlabel=x),
        plot.Panel("failures per 100 reloads", "failed requests per 100 reloads", methods,
                   series(lambda r: plot.Bar(r.per_100_reloads)), ".1f", xlabel=x),
        plot.Panel("reload time (start to confirmed)", "ms", methods,
                   series(lambda r: plot.Bar.of_values(r.reload_s, 1000)), ".0f", xlabel=x),
        plot.Panel("throughput under reloads", "requests/s", methods,
                   series(lambda r: plot.Bar(r.wrk.rps if r.wrk else None)), ".0f", xlabel=x),
    ]
    if any(r.respawn_ms for r in results):
        panels.append(plot.Panel(
            "pylb worker respawn (kill -9 to accepting)", "ms", methods,
            series(lambda r: plot.Bar.of_values(r.respawn_ms)), ".0f", xlabel=x,
        ))
    return plot.Chart(
        title=f"pylb reloads under load: {' vs '.join(proxies)}",
        panels=panels,
        caption=chart_caption(opts, info, results),
    )


def run_bar(r: RunResult | None, bar: Callable[[RunResult], plot.Bar]) -> plot.Bar:
    """A run's bar; FAILED for a run without figures, nothing for a run not made."""
    import plot

    if r is None:
        return plot.Bar(None)
    if r.wrk is None:
        return plot.Bar(None, note="FAILED")
    return bar(r)


def chart_caption(opts: Options, info: dict[str, Any], results: list[RunResult]) -> list[str]:
    """Lines that make the picture self-describing: command, when and where, what a bar is."""
    lines = [f"$ {opts.command}"] if opts.command else []
    reloads = ", ".join(f"{r.proxy} {r.method} {r.reloads}" for r in results)
    lines += [
        f"{info.get('time', '?')} on {info.get('host', '?')} ({info.get('cpus', '?')} cores); "
        f"one run per proxy and method: wrk -t1 -c{opts.connections} --timeout 5s for "
        f"{opts.duration}s, {pacing(opts)}; pylb workers={WORKERS}",
        f"failures = socket errors + non-2xx; reloads done: {reloads}",
        "reload and respawn bars: median of the run's reloads (respawns), whiskers: min–max; "
        "the other bars: one run each",
    ]
    return lines


# --------------------------------------------------------------------------- main


def plan(opts: Options) -> list[tuple[str, str]]:
    runs = [("pylb", m) for m in PYLB_METHODS if m in opts.methods and "pylb" in opts.only]
    runs += [
        ("haproxy", m) for m in HAPROXY_METHODS if m in opts.methods and "haproxy" in opts.only
    ]
    return runs


def run_all(opts: Options, tools: Tools, tmp: Path, runs: list[tuple[str, str]]) -> list[RunResult]:
    rng = random.Random(opts.seed)
    a, b = free_ports(2)
    with contextlib.ExitStack() as stack:
        nginx = start_nginx(stack, tools, tmp, Ports(nginx=(a, b), haproxy=0, pylb=0))
        SPAWNED.add(nginx.pid)
        return [run_one(proxy, method, opts, tools, tmp, (a, b), rng) for proxy, method in runs]


def run_scenario(
    opts: Options,
    proxies: Iterable[str],
    run: Callable[[Tools, Path], list[ResultT]],
    report: Callable[[Tools, list[ResultT], bool], None],
    prepare: Callable[[], None] | None = None,
) -> int:
    """The frame of either scenario: find the tools of `proxies` (none: nothing to run),
    `prepare()`, become a subreaper, `run(tools, tmp)` in a temporary directory,
    `report(tools, results, subreaper)`; the exit status (EXIT_OK if every result is ok)."""
    names = tuple(sorted(set(proxies)))
    if not names:
        print("reload: nothing to run (HAProxy has only usr2 and sf)", file=sys.stderr)
        return EXIT_FAILED
    try:
        tools = find_tools(names)
    except MissingDependency as exc:
        print(f"reload: {exc}", file=sys.stderr)
        return EXIT_MISSING
    if prepare is not None:
        prepare()
    subreaper = become_subreaper()
    try:
        with temp_dir(opts.keep_tmp) as tmp:
            results = run(tools, tmp)
    except KeyboardInterrupt:
        print("\nreload: interrupted; all started processes stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BenchError as exc:
        print(f"reload: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    report(tools, results, subreaper)
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, raise_interrupt)
    if opts.tunnels is not None:
        import tunnels  # here, not above: it imports this module

        return tunnels.main(opts)
    runs = plan(opts)
    return run_scenario(
        opts,
        (proxy for proxy, _ in runs),
        lambda tools, tmp: run_all(opts, tools, tmp, runs),
        lambda tools, results, subreaper: report(opts, tools, results, subreaper),
    )


if __name__ == "__main__":
    # bench/tunnels.py imports this module as `reload`: let it find this one, not a copy
    sys.modules.setdefault("reload", sys.modules[__name__])
    sys.exit(main())
