#!/usr/bin/env python3
"""Reload pylb (and HAProxy) over and over under load, and count what the clients lose.

For each reload method, one run starts the proxy in front of two nginx backends, drives wrk
(one thread, keep-alive, `--timeout 5s`) at it for `--duration` seconds and meanwhile reloads
it every 100 to 250 ms (random, start to start; a reload still in progress is waited for).
Failures are wrk's socket errors (connect, read, write, timeout) plus non-2xx answers. After
each run the script checks that the old processes went away, that no worker leaked, and,
once the proxy is stopped, that none of its processes is left.

pylb methods: `usr2` (SIGUSR2 to the master), `hup` (SIGHUP), `socket` (`reload` on the stats
socket, answer awaited), `sf` (a new `bin/pylb -f CFG -p PIDFILE -sf OLDPID` each time).
HAProxy, for comparison: `usr2` (`haproxy -W`, SIGUSR2 to the master) and `sf` (the classic
`haproxy -f CFG -p PIDFILE -D -sf OLDPID -x STATS_SOCKET`).

The helpers (nginx, ports, process handling, wrk parsing) are bench/bench.py's. See
bench/README.md for how to run it and how to read the output.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    find_tools,
    fmt,
    free_ports,
    haproxy_config,
    http_ok,
    parse_wrk,
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


def parse_methods(text: str) -> tuple[str, ...]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"--methods takes a comma list of {','.join(ALL_METHODS)}; got {text!r}"
        )
    return tuple(m for m in ALL_METHODS if m in names)


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(
        description="Reload pylb (and HAProxy) every 100-250 ms under wrk and count failures.",
    )
    p.add_argument("--duration", type=positive_int, default=30, help="seconds per method")
    p.add_argument("--connections", type=positive_int, default=50, help="wrk connections")
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
    a = p.parse_args(argv)
    return Options(
        duration=a.duration,
        connections=a.connections,
        methods=a.methods,
        only=(a.only,) if a.only else PROXIES,
        json_path=a.json_path,
        keep_tmp=a.keep_tmp,
        seed=a.seed,
    )


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
        return " ".join(proc.cmdline()) or proc.name()
    return "?"


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

    def wait_for(
        self,
        pattern: re.Pattern[str],
        timeout: float,
        alive: Callable[[], bool] | None = None,
    ) -> re.Match[str] | None:
        """The next line matching `pattern` within `timeout` (None: not seen in time, or
        `alive()` turned false first)."""
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

    def __init__(self, tools: Tools, tmp: Path, port: int, backends: tuple[int, int]) -> None:
        self.tools = tools
        self.tmp = tmp
        self.port = port
        self.backends = backends
        self.log_path = tmp / f"{self.proxy}.log"
        self.watch = LogWatch(self.log_path)
        self.seen: dict[tuple[int, float], str] = {}  # every process of this run

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

    def __init__(self, method: str, *args: Any) -> None:
        self.method = method
        super().__init__(*args)
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
        return 1 + WORKERS

    def stop(self) -> None:
        if self.master is not None:
            self.master.stop()


class PylbTakeover(PylbInPlace):
    """pylb replaced by a new process each time: `pylb -f CFG -p PIDFILE -sf OLDPID`."""

    def __init__(self, *args: Any) -> None:
        super().__init__("sf", *args)
        self.procs: list[Managed] = []  # every pylb started, in order

    def start(self) -> None:
        self.write_config()
        first = spawn("pylb", self.argv(), self.log_path, append=True, cwd=REPO,
                      env=pylb_env())
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
            proc.stop()


class HaproxyMasterWorker(Subject):
    """`haproxy -W`: the master re-executes itself on SIGUSR2 and starts a new worker."""

    proxy = "haproxy"
    method = "usr2"
    loaded_re = re.compile(r"Loading (success|failure)")
    reloading_re = re.compile(r"Reloading HAProxy")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
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
        text = haproxy_config(opts, self.port, self.backends).replace(
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
            self.master.stop()


class HaproxyClassic(HaproxyMasterWorker):
    """`haproxy -f CFG -p PIDFILE -D -sf OLDPID -x SOCK`: a new daemon each time, taking the
    listening sockets from the old one over its stats socket."""

    method = "sf"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
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
    proxy: str, method: str, tools: Tools, tmp: Path, port: int, backends: tuple[int, int]
) -> Subject:
    args = (tools, tmp, port, backends)
    if proxy == "pylb":
        return PylbTakeover(*args) if method == "sf" else PylbInPlace(method, *args)
    return HaproxyClassic(*args) if method == "sf" else HaproxyMasterWorker(*args)


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
    reload_errors: list[str] = field(default_factory=list)
    signals_resent: int = 0
    hung: str | None = None
    peak_processes: int = 0
    after_drain: int | None = None
    expected_after_drain: int = 0
    after_drain_list: list[str] = field(default_factory=list)
    left_after_stop: list[str] = field(default_factory=list)
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
    def leak_ok(self) -> bool:
        return self.after_drain == self.expected_after_drain and not self.left_after_stop


def reload_loop(
    subject: Subject,
    wrk: subprocess.Popen[str],
    opts: Options,
    result: RunResult,
    rng: random.Random,
) -> None:
    """Reload every INTERVAL (start to start) until shortly before wrk ends."""
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
        outcome = subject.reload()
        subject.reap()
        result.reload_s.append(outcome.seconds)
        result.signals_resent += outcome.resent
        if outcome.ok:
            result.reloads += 1
        else:
            result.reload_failures += 1
        if outcome.detail:
            result.reload_errors.append(
                f"reload #{len(result.reload_s)} at {started - began:.2f}s "
                f"({'ok' if outcome.ok else 'FAILED'}): {outcome.detail}"
            )
        result.peak_processes = max(result.peak_processes, subject.sample())
        if outcome.hung:
            result.hung = outcome.detail
            log(
                f"{subject.proxy} {subject.method}: reload HUNG: {outcome.detail}; "
                "no more reloads in this run"
            )
            return
        next_at = started + rng.uniform(*INTERVAL)


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


def after_stop(subject: Subject) -> list[str]:
    deadline = time.monotonic() + STOP_TIMEOUT
    while True:
        subject.reap()
        left = subject.leftovers()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


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
        f"-d{opts.duration}s -> 127.0.0.1:{result.port}, reloads every "
        f"{INTERVAL[0] * 1000:.0f}-{INTERVAL[1] * 1000:.0f} ms"
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
        finally:
            subject.stop()
            result.left_after_stop = after_stop(subject)
            result.processes_seen = len(subject.seen)
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        result.error = str(exc)
        log(f"{proxy} {method}: FAILED: {exc}")
    lines = subject.log_lines()
    result.notable_log = [line for line in lines if NOTABLE.search(line)]
    print_check(result)
    return result


def print_check(r: RunResult) -> None:
    name = f"{r.proxy} {r.method}"
    if r.after_drain is None:
        drained = "not measured"
    else:
        drained = (
            f"{r.after_drain} processes after drain (expected {r.expected_after_drain})"
            f"{'' if r.after_drain == r.expected_after_drain else ' MISMATCH'}"
        )
    left = (
        "none left after stop"
        if not r.left_after_stop
        else f"LEFT AFTER STOP: {', '.join(r.left_after_stop)}"
    )
    print(
        f"check {name}: {r.processes_seen} processes seen in the run, peak "
        f"{r.peak_processes} at once; {drained}; {left}",
        flush=True,
    )
    if r.after_drain is not None and r.after_drain != r.expected_after_drain:
        for line in r.after_drain_list:
            print(f"    still there: {line}", flush=True)
    if r.reloads < MIN_RELOADS and r.error is None:
        print(
            f"WARNING: {name}: only {r.reloads} reloads done (wanted >= {MIN_RELOADS})", flush=True
        )
    if r.hung:
        print(f"WARNING: {name}: a reload hung: {r.hung}", flush=True)


# --------------------------------------------------------------------------- report


def table(results: list[RunResult]) -> str:
    head = [
        "proxy",
        "method",
        "how",
        "requests",
        "req/s",
        "reloads",
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
    full = [row for row in rows if len(row) == len(head)]
    width = [max(len(row[i]) for row in full) for i in range(len(head))]
    lines = []
    for row in rows:
        if len(row) != len(head):
            lines.append(
                "  ".join(
                    [row[0].ljust(width[0]), row[1].ljust(width[1]), row[2].ljust(width[2]), row[3]]
                )
            )
            continue
        cells = [c.ljust(w) for c, w in zip(row[:3], width[:3], strict=True)]
        cells += [c.rjust(w) for c, w in zip(row[3:], width[3:], strict=True)]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def report(opts: Options, tools: Tools, results: list[RunResult], subreaper: bool) -> None:
    print(
        f"\nreload under load: wrk -t1 -c{opts.connections} --timeout 5s, {opts.duration}s "
        f"per method, a reload every {INTERVAL[0] * 1000:.0f}-{INTERVAL[1] * 1000:.0f} ms; "
        f"pylb workers={WORKERS}; failures = socket errors + non-2xx\n"
    )
    print(table(results))
    for r in results:
        if r.reload_errors:
            resent = f"; signals sent again: {r.signals_resent}" if r.signals_resent else ""
            print(f"\n{r.proxy} {r.method}: reload notes ({len(r.reload_errors)}{resent}):")
            for line in r.reload_errors[:10]:
                print(f"    {line}")
            if len(r.reload_errors) > 10:
                print(f"    ... {len(r.reload_errors) - 10} more")
    for r in results:
        if r.proxy != "pylb" or not (r.failures or r.reload_failures or r.hung):
            continue
        if not r.notable_log:
            print(f"\n{r.proxy} {r.method}: no notable lines in {r.log_path}")
            continue
        print(f"\n{r.proxy} {r.method}: notable lines of {r.log_path} ({len(r.notable_log)}):")
        for line in r.notable_log[:NOTABLE_SHOWN]:
            print(f"    {line}")
        if len(r.notable_log) > NOTABLE_SHOWN:
            print(f"    ... {len(r.notable_log) - NOTABLE_SHOWN} more")
    if not subreaper:
        print("\nnote: PR_SET_CHILD_SUBREAPER unavailable: orphans are only found by pid")
    if opts.json_path:
        doc = {"meta": meta(opts, tools), "results": [result_json(r) for r in results]}
        opts.json_path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nJSON written to {opts.json_path}")


def meta(opts: Options, tools: Tools) -> dict[str, Any]:
    return {
        **run_meta(tools),
        "duration": opts.duration,
        "connections": opts.connections,
        "interval_ms": [INTERVAL[0] * 1000, INTERVAL[1] * 1000],
        "pylb_workers": WORKERS,
        "seed": opts.seed,
    }


def result_json(r: RunResult) -> dict[str, Any]:
    return {
        "proxy": r.proxy,
        "method": r.method,
        "description": r.description,
        "error": r.error,
        "requests": r.wrk.requests if r.wrk else None,
        "rps": r.wrk.rps if r.wrk else None,
        "reloads": r.reloads,
        "reload_failures": r.reload_failures,
        "failures": r.failures,
        "failures_per_100_reloads": r.per_100_reloads,
        "reload_seconds": r.reload_s,
        "reload_notes": r.reload_errors,
        "signals_resent": r.signals_resent,
        "hung": r.hung,
        "processes_seen": r.processes_seen,
        "peak_processes": r.peak_processes,
        "after_drain": r.after_drain,
        "expected_after_drain": r.expected_after_drain,
        "after_drain_processes": r.after_drain_list,
        "left_after_stop": r.left_after_stop,
        "notable_log": r.notable_log[:200],
        "log": r.log_path,
        "wrk": asdict(r.wrk) if r.wrk else None,
    }


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


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, raise_interrupt)
    runs = plan(opts)
    if not runs:
        print("reload: nothing to run (HAProxy has only usr2 and sf)", file=sys.stderr)
        return EXIT_FAILED
    try:
        tools = find_tools(tuple(sorted({proxy for proxy, _ in runs})))
    except MissingDependency as exc:
        print(f"reload: {exc}", file=sys.stderr)
        return EXIT_MISSING
    subreaper = become_subreaper()
    try:
        with temp_dir(opts.keep_tmp) as tmp:
            results = run_all(opts, tools, tmp, runs)
    except KeyboardInterrupt:
        print("\nreload: interrupted; all started processes stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BenchError as exc:
        print(f"reload: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    report(opts, tools, results, subreaper)
    bad = any(r.error or r.hung or not r.leak_ok for r in results)
    return EXIT_FAILED if bad else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
