#!/usr/bin/env python3
"""Does carrying state cost time that grows with its size?

Part `state`: for each size in `--sizes`, pylb (2 workers) runs with a stick table
(`type: string, size: 1m`, `stick-on: req.hdr(X-User)`) filled with SIZE entries over the
stats socket and a map file of SIZE lines used by a rule (`set-header X-Mapped
%[path,map(big,miss)]`). The script times, `--rounds` times each: a cold start (launch to
first answered request), a `reload` on the stats socket, the respawn of a worker killed
with SIGKILL, and a takeover by a new process (`pylb -D -p PIDFILE -sf OLDPID`). After each
measurement it checks that 50 sampled users still reach the server stored for them, that
the map still answers and that `show table` still counts SIZE entries.

Part `cpu`: CPU per request of a stick table on `src`, pylb against HAProxy (bench.py's
configurations plus the table), in interleaved rounds, and the same pair without a table,
so that the table's cost shows as the difference.

The helpers come from bench/bench.py (nginx, ports, processes, wrk, CPU sampling) and
bench/reload.py (log watching, adopting and reaping daemons). See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import random
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reload import NOTABLE, SPAWNED, LogWatch, _alive, become_subreaper, reap_adopted

from bench import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_MISSING,
    EXIT_OK,
    REPO,
    STOP_TIMEOUT,
    BenchError,
    Managed,
    MissingDependency,
    TargetResult,
    Tools,
    find_tools,
    fmt,
    format_table,
    free_ports,
    haproxy_config,
    measure,
    nginx_config,
    port_accepts,
    positive_int,
    psutil,
    pylb_config,
    pylb_env,
    pylb_yaml,
    raise_interrupt,
    result_json,
    run_meta,
    start,
    temp_dir,
    wait_ready,
    write,
)
from bench import Options as BenchOptions

PARTS = ("state", "cpu")
DEFAULTS = {"sizes": (0, 100_000, 1_000_000), "rounds": 5, "duration": 8}
QUICK = {"sizes": (0, 100_000), "rounds": 3, "duration": 4}
WORKERS = 2
TABLE = "be"  # bench.pylb_config's backend; a backend's stick table has its name
TABLE_CAPACITY = 1 << 20  # `size: 1m`
SAMPLE = 50  # keys checked after each measurement
FILL_BATCH = 5000  # `set table` lines per write
VARIANTS = ("plain", "stick")  # part cpu: without and with a stick table on src
VARIANT_TITLE = {"plain": "no table", "stick": "stick on src"}
PROXIES = ("haproxy", "pylb")

POLL = 0.002  # between two looks at what a measurement waits for
START_POLL = 0.01  # while pylb starts (a refused connect costs the starting pylb nothing)
SOCKET_TIMEOUT = 10.0  # one stats socket command (but `reload`)
PROBE_TIMEOUT = 2.0  # one probe request
LOG_WAIT = 1.0  # for the request-log line of a probe answered
START_TIMEOUT = 120.0
RELOAD_TIMEOUT = 60.0  # pylb's own reload timeout is 30 s
RESPAWN_TIMEOUT = 30.0
TAKEOVER_TIMEOUT = 60.0
FILL_TIMEOUT = (60.0, 120.0)  # seconds, plus seconds per million entries
# pylb counts a worker that dies within 5 s of its start (lb/master.py QUICK_DEATH) as
# crashing and delays its second quick replacement in a row: the bench kills older ones.
VICTIM_MIN_AGE = 5.5

LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) pylb\[(\d+)\] (.*)$")
FORKED = re.compile(r"worker \d+/\d+ gen \d+ started")
GEN_READY = re.compile(r"generation \d+ ready")
TOOK_OVER = re.compile(r"took over .* state|binding anew")
USED = re.compile(rf"^# table: {TABLE}, .*used:(\d+)", re.MULTILINE)
EXPECTED_LOG = re.compile(r"killed by signal 9")  # our SIGKILLed workers


def log(message: str) -> None:
    print(f"state: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    sizes: tuple[int, ...]
    rounds: int
    duration: int
    connections: int
    parts: tuple[str, ...]
    json_path: Path | None
    keep_tmp: bool
    quick: bool
    seed: int


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(not 0 <= s <= TABLE_CAPACITY for s in sizes):
        raise argparse.ArgumentTypeError(
            f"--sizes takes a comma list of entry counts from 0 to {TABLE_CAPACITY} "
            f"(the table has size 1m); got {text!r}"
        )
    return tuple(dict.fromkeys(sizes))


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(
        description="Time start, reload, respawn and takeover of pylb carrying a stick table "
        "and a map of growing size; CPU per request of a stick table, pylb vs HAProxy.",
    )
    p.add_argument(
        "--sizes", type=parse_sizes, help="comma list of table entries = map lines "
        "(default 0,100000,1000000)"
    )
    p.add_argument("--rounds", type=positive_int, help="rounds of each measurement (default 5)")
    p.add_argument("--duration", type=positive_int, help="seconds per wrk run (default 8)")
    p.add_argument("--connections", type=positive_int, default=50, help="wrk connections")
    p.add_argument("--only", choices=PARTS, help="run only the state or only the cpu part")
    p.add_argument(
        "--quick", action="store_true", help="sizes 0,100000, 3 rounds, 4 s wrk runs"
    )
    p.add_argument("--json", dest="json_path", type=Path, help="write every figure here")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument("--seed", type=int, default=1, help="seed of the sampled keys and victims")
    a = p.parse_args(argv)
    base = QUICK if a.quick else DEFAULTS
    return Options(
        sizes=a.sizes if a.sizes is not None else base["sizes"],
        rounds=a.rounds if a.rounds is not None else base["rounds"],
        duration=a.duration if a.duration is not None else base["duration"],
        connections=a.connections,
        parts=(a.only,) if a.only else PARTS,
        json_path=a.json_path,
        keep_tmp=a.keep_tmp,
        quick=a.quick,
        seed=a.seed,
    )


# --------------------------------------------------------------------------- clients


def stats(sock: Path, line: str, timeout: float = SOCKET_TIMEOUT) -> str:
    """One command line on pylb's stats socket; the whole answer (it closes after it)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock))
            s.sendall(line.encode() + b"\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError as exc:
        raise BenchError(f"stats socket, {line!r}: {exc}") from exc
    return data.decode(errors="replace")


def table_used(sock: Path) -> int:
    text = stats(sock, "show table")
    m = USED.search(text)
    if m is None:
        raise BenchError(f"'show table' has no line for table {TABLE}: {text[:300]!r}")
    return int(m.group(1))


def show_proc(sock: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(current workers, old workers) as (pid, conns); conns is `?` for a worker that has
    not reported ready yet (the master only asks ready workers)."""
    current: list[tuple[int, str]] = []
    old: list[tuple[int, str]] = []
    into = None
    for line in stats(sock, "show proc").splitlines():
        if line.startswith("# workers"):
            into = current
        elif line.startswith("# old workers"):
            into = old
        elif into is not None and not line.startswith("#"):
            words = line.split()
            if len(words) >= 6 and words[1] == "worker":
                into.append((int(words[0]), words[-1]))
    return current, old


def server_for(n: int) -> str:
    """Where user u{n} is stuck by the fill: s1 for even n, s2 for odd n."""
    return "s2" if n % 2 else "s1"


def fill_table(sock: Path, count: int) -> float:
    """`set table` for users u0..u{count-1} over one prompt-mode connection, pipelined (a
    reader thread counts the prompts that end the answers); the seconds it took."""
    if count == 0:
        return 0.0
    timeout = FILL_TIMEOUT[0] + FILL_TIMEOUT[1] * count / 1e6
    began = time.monotonic()
    deadline = began + timeout
    wanted = count + 1  # `prompt` itself answers with a prompt
    seen: dict[str, Any] = {"prompts": 0, "errors": [], "failure": None}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(SOCKET_TIMEOUT)
        try:
            s.connect(str(sock))
            s.sendall(b"prompt\n")
        except OSError as exc:
            raise BenchError(f"fill: stats socket: {exc}") from exc

        def read() -> None:
            last = b""
            pending = b""
            try:
                while seen["prompts"] < wanted:
                    data = s.recv(1 << 20)
                    if not data:
                        seen["failure"] = "pylb closed the connection"
                        return
                    seen["prompts"] += (last + data).count(b"> ")
                    last = data[-1:]
                    if len(seen["errors"]) < 5:  # any answer but the empty one is an error
                        *lines, pending = (pending + data).split(b"\n")
                        for line in lines:
                            while line.startswith(b"> "):
                                line = line[2:]
                            if line.strip():
                                seen["errors"].append(line.decode(errors="replace"))
            except OSError as exc:
                seen["failure"] = str(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            for first in range(0, count, FILL_BATCH):
                lines = "".join(
                    f"set table {TABLE} key u{n} data.server_key {server_for(n)}\n"
                    for n in range(first, min(count, first + FILL_BATCH))
                )
                s.sendall(lines.encode())
                if time.monotonic() > deadline:
                    raise BenchError(f"fill: not all sent within {timeout:.0f}s")
        except OSError as exc:
            raise BenchError(f"fill: sending: {exc} ({seen['failure'] or 'reader ok'})") from exc
        reader.join(max(0.0, deadline - time.monotonic()))
        took = time.monotonic() - began
        if seen["prompts"] < wanted:
            raise BenchError(
                f"fill: {max(0, seen['prompts'] - 1)} of {count} answers after {took:.0f}s"
                f"{': ' + seen['failure'] if seen['failure'] else ''}"
            )
        if seen["errors"]:
            raise BenchError(f"fill: pylb answered: {' | '.join(seen['errors'][:3])}")
    return took


def get(
    port: int, path: str, headers: dict[str, str] | None = None, timeout: float = PROBE_TIMEOUT
) -> tuple[int, str] | None:
    """One GET on a new connection (closed after it): (status, body) or None."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


class RequestLog:
    """pylb's request log received as syslog datagrams (`log: unix@PATH` in the frontend):
    each line names the pid of the worker that served the request, so a probe with a unique
    path tells which worker answered it."""

    LINE = re.compile(r'pylb\[(\d+)\]: .*"GET (/probe-\S+) HTTP/')

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.served: dict[str, int] = {}

    def drain(self) -> None:
        """Read every datagram waiting (the kernel queues only a few: read them often)."""
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            m = self.LINE.search(data.decode(errors="replace"))
            if m:
                self.served[m.group(2)] = int(m.group(1))

    def pid_for(self, path: str, timeout: float = LOG_WAIT) -> int | None:
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            pid = self.served.pop(path, None)
            left = deadline - time.monotonic()
            if pid is not None or left <= 0:
                return pid
            select.select([self.sock], [], [], left)

    def close(self) -> None:
        self.sock.close()


class Prober:
    """Probe requests, each on a new connection, with a unique path `/probe-TAG-N`."""

    def __init__(self, port: int, reqlog: RequestLog, tag: str) -> None:
        self.port = port
        self.reqlog = reqlog
        self.tag = tag
        self.sent = 0
        self.unlogged = 0

    def served_by(self, wanted: Callable[[int], bool]) -> float | None:
        """One probe: the time its answer came if a worker `wanted` served it, else None."""
        self.sent += 1
        path = f"/probe-{self.tag}-{self.sent}"
        got = get(self.port, path)
        at = time.monotonic()
        if got is None or got[0] != 200:
            return None
        pid = self.reqlog.pid_for(path)
        if pid is None:
            self.unlogged += 1
            return None
        return at if wanted(pid) else None


# --------------------------------------------------------------------------- processes


def children(pid: int) -> set[int]:
    with contextlib.suppress(psutil.Error):
        return {p.pid for p in psutil.Process(pid).children()}
    return set()


def parent_of(pid: int) -> int | None:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).ppid()
    return None


def stop_process(proc: psutil.Process) -> None:
    """SIGTERM a process that is not our Popen child (a daemon), wait, then SIGKILL it and
    what is left of its tree. psutil refuses to signal a pid that was reused."""
    try:
        tree = [proc, *proc.children(recursive=True)]
        proc.terminate()
    except psutil.Error:
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    while _alive(proc.pid) and time.monotonic() < deadline:
        reap_adopted()
        time.sleep(0.05)
    for p in tree:
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE:
                p.kill()
    time.sleep(0.05)
    reap_adopted()


def stop_descendants() -> None:
    """Last line of defence: every process still below us (adopted orphans included)."""
    with contextlib.suppress(psutil.Error):
        procs = psutil.Process().children(recursive=True)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, left = psutil.wait_procs(procs, timeout=STOP_TIMEOUT)
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(left, timeout=STOP_TIMEOUT)
    reap_adopted()


def start_mine(stack: contextlib.ExitStack, name: str, argv: list[str], tmp: Path, **kw: Any
               ) -> Managed:
    """bench.start, and known to reload's reaper as ours (subprocess reaps it)."""
    proc = start(stack, name, argv, tmp, **kw)
    SPAWNED.add(proc.pid)
    return proc


Event = Callable[[], float | None]


def now() -> float:
    return time.monotonic()


def until(
    events: dict[str, Event],
    t0: float,
    timeout: float,
    what: str,
    alive: Callable[[], bool] | None = None,
    poll: float = POLL,
) -> dict[str, float]:
    """Look at every event not yet seen, in turn, until all are; each event's time (an
    event returns the monotonic time it happened, or None) in seconds after t0."""
    times: dict[str, float] = {}
    deadline = t0 + timeout
    while True:
        for name, event in events.items():
            if name not in times:
                at = event()
                if at is not None:
                    times[name] = at - t0
        if len(times) == len(events):
            return times
        missing = ", ".join(n for n in events if n not in times)
        seen = ", ".join(f"{n} {s * 1000:.0f} ms" for n, s in times.items()) or "nothing"
        if alive is not None and not alive():
            raise BenchError(f"{what}: pylb master exited before: {missing} (seen: {seen})")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: no {missing} within {timeout:.0f}s (seen: {seen})")
        time.sleep(poll)


def log_times(
    lines: list[str], pid: int | None, patterns: dict[str, re.Pattern[str]], wall0: float
) -> dict[str, float]:
    """Seconds after wall0 of the first line of process `pid` (None: any) matching each
    pattern (pylb's log stamps are local wall-clock time to the millisecond)."""
    out: dict[str, float] = {}
    for line in lines:
        m = LOG_LINE.match(line)
        if not m or (pid is not None and int(m.group(3)) != pid):
            continue
        stamp = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
        stamp += int(m.group(2)) / 1000
        for name, pattern in patterns.items():
            if name not in out and pattern.search(m.group(4)):
                out[name] = stamp - wall0
    return out


# --------------------------------------------------------------------------- part state


def nginx_state_config(tmp: Path, hello: tuple[int, ...], named: tuple[int, ...]) -> str:
    """bench.py's nginx, plus servers answering "NAME X-MAPPED" (which server got the
    request, and what pylb's map rule put in X-Mapped)."""
    text = nginx_config(tmp, (*hello, *named))
    old = 'location / { return 200 "hello\\n"; }'
    for i, port in enumerate(named, start=1):
        new = f'location / {{ return 200 "s{i} $http_x_mapped\\n"; }}'
        pattern = re.compile(rf"(listen 127\.0\.0\.1:{port};\s+){re.escape(old)}")
        text, n = pattern.subn(lambda m, new=new: m.group(1) + new, text)
        if n != 1:
            raise BenchError("bench.nginx_config changed: cannot make the naming servers")
    return text


def write_map(path: Path, lines: int) -> None:
    with path.open("w") as f:
        for first in range(0, lines, 100_000):
            f.write("".join(f"/k{n} v{n}\n" for n in range(first, min(lines, first + 100_000))))


@dataclass
class SizeResult:
    size: int
    startup: list[dict[str, float]] = field(default_factory=list)
    fill_s: float | None = None
    rounds: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {"reload": [], "respawn": [], "takeover": []}
    )
    checks: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notable_log: list[str] = field(default_factory=list)
    probes: dict[str, int] = field(default_factory=dict)

    def checks_after(self, what: str) -> list[dict[str, Any]]:
        return [c for c in self.checks if c["after"].split()[0] == what]


class StatePylb:
    """pylb for one size: its directory and files, the master now serving, and every
    process started (all stopped when the size is done)."""

    def __init__(
        self,
        stack: contextlib.ExitStack,
        tools: Tools,
        rundir: Path,
        size: int,
        backends: tuple[int, int],
        reqlog: RequestLog,
        rng: random.Random,
    ) -> None:
        assert tools.pylb is not None
        self.pylb = tools.pylb
        self.rundir = rundir
        self.size = size
        self.backends = backends
        self.reqlog = reqlog
        self.rng = rng
        self.port = free_ports(1)[0]
        self.sock = rundir / "lb.sock"
        self.pidfile = rundir / "pylb.pid"
        self.launch_log = rundir / "launch.log"  # stdout/stderr of every pylb started
        self.watch = LogWatch(rundir / "pylb.log")  # global.log: every master and worker
        self.master: psutil.Process | None = None
        self.masters: list[psutil.Process] = []
        self.procs: list[Managed] = []
        self.prober = Prober(self.port, reqlog, f"{size}")
        stack.callback(self.stop)

    # -- files and processes
    def config(self) -> dict[str, Any]:
        opts = BenchOptions(
            duration=0, connections=0, workers=WORKERS, mode="http", checks=False,
            json_path=None, only=("pylb",), warmup=0, keep_tmp=False,
        )
        cfg = pylb_config(opts, self.port, self.backends)
        cfg["global"]["log"] = "pylb.log"
        # expose-fd listeners: what `-x`/`-sf` takeovers need, as in HAProxy
        cfg["global"]["stats"] = {"socket": "lb.sock", "level": "admin",
                                  "expose-fd": "listeners"}
        cfg["maps"] = {"big": "big.map"}
        fe = cfg["frontends"]["fe"]
        fe["log"] = f"unix@{self.reqlog.path}"
        fe["http-request"] = ["set-header X-Mapped %[path,map(big,miss)]"]
        be = cfg["backends"][TABLE]
        be["stick-table"] = {"type": "string", "len": 32, "size": "1m"}
        be["stick-on"] = "req.hdr(X-User)"
        return cfg

    def write_files(self) -> None:
        write_map(self.rundir / "big.map", self.size)
        write(self.rundir / "lb.cfg", pylb_yaml(self.config()))
        check = subprocess.run(
            [self.pylb, "-c", "-f", "lb.cfg"], capture_output=True, text=True, timeout=60,
            cwd=self.rundir, env=pylb_env(),
        )
        if check.returncode != 0:
            raise BenchError(
                f"pylb -c rejected {self.rundir}/lb.cfg:\n{check.stdout}{check.stderr}"
            )

    def launch(self, name: str, *extra: str) -> Managed:
        argv = [self.pylb, "-f", "lb.cfg", "-p", "pylb.pid", *extra]
        with self.launch_log.open("a") as f:
            f.write(f"--- {name}: {' '.join(argv)}\n")
        proc = Managed(name, argv, self.launch_log, append=True, cwd=self.rundir,
                       env=pylb_env())
        SPAWNED.add(proc.pid)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        for master in self.masters:
            stop_process(master)
        self.master = None

    def master_alive(self) -> bool:
        return self.master is not None and _alive(self.master.pid)

    def reap(self) -> None:
        for proc in self.procs:
            proc.proc.poll()
        reap_adopted()

    def mark(self) -> int:
        self.watch.poll()
        return len(self.watch.lines)

    def tail(self, lines: int = 12) -> str:
        self.watch.poll()
        text = "\n".join(f"    {line}" for line in self.watch.lines[-lines:])
        launched = self.procs[-1].log_tail(5) if self.procs else ""
        if launched.strip():
            text += "\n  launch.log:\n" + "\n".join(f"    {x}" for x in launched.splitlines())
        return f"\n  pylb.log:\n{text}"

    def used(self) -> int:
        return table_used(self.sock)

    def logged(self, mark: int, pid: Callable[[], int | None], pattern: re.Pattern[str]
               ) -> Event:
        """An event: a line of process pid() matching `pattern` logged after `mark`."""
        def event() -> float | None:
            who = pid()
            if who is None:
                return None
            self.watch.poll()
            for line in self.watch.lines[mark:]:
                if f"pylb[{who}] " in line and pattern.search(line):
                    return now()
            return None
        return event

    # -- measurements
    def start_foreground(self, name: str) -> tuple[Managed, dict[str, float]]:
        """Launch pylb in the foreground; seconds to the first answered request and, from
        the log, to the first worker forked and to the generation ready (waited for too:
        a worker may answer before its sibling is ready)."""
        mark = self.mark()
        wall = time.time()
        t0 = now()
        proc = self.launch(name)

        def answered() -> float | None:
            got = get(self.port, "/", timeout=5.0)
            return now() if got is not None and got[0] == 200 else None

        try:
            events = {"answer": answered, "logged": self.logged(mark, lambda: proc.pid, GEN_READY)}
            got = until(events, t0, START_TIMEOUT, f"start ({name})", alive=proc.alive,
                        poll=START_POLL)
        except BenchError as exc:
            raise BenchError(f"{exc}{self.tail()}") from None
        self.reqlog.drain()
        self.master = psutil.Process(proc.pid)
        self.masters.append(self.master)
        times = {"answer": got["answer"]}
        self.watch.poll()
        times.update(log_times(self.watch.lines[mark:], proc.pid,
                               {"forked": FORKED, "ready": GEN_READY}, wall))
        return proc, times

    def measure_startup(self, rnd: int) -> dict[str, float]:
        proc, times = self.start_foreground(f"startup-{rnd}")
        proc.stop()
        if self.master in self.masters:
            self.masters.remove(self.master)
        self.master = None
        return times

    def measure_reload(self, rnd: int) -> dict[str, Any]:
        """`reload` on the stats socket under no load: the answer (Success=1 comes once the
        new generation accepts); then probes until one is served by a new worker; and
        the old workers gone."""
        assert self.master is not None
        master = self.master.pid
        old = {pid for pid, _ in show_proc(self.sock)[0]}
        mark = self.mark()
        wall = time.time()
        t0 = now()
        answer = stats(self.sock, "reload", RELOAD_TIMEOUT)
        answered = now() - t0
        if not answer.startswith("Success=1"):
            raise BenchError(f"reload answered {' | '.join(answer.split(chr(10)))!r}")
        self.reqlog.drain()

        def new_worker(pid: int) -> bool:
            return pid not in old and parent_of(pid) == master

        times = until(
            {
                "served": lambda: self.prober.served_by(new_worker),
                "old_gone": lambda: None if any(_alive(p) for p in old) else now(),
            },
            t0, RELOAD_TIMEOUT, f"reload {rnd}", alive=self.master_alive,
        )
        times["answer"] = answered
        self.watch.poll()
        times.update(log_times(self.watch.lines[mark:], master,
                               {"forked": FORKED, "ready": GEN_READY}, wall))
        return {"s": times}

    def measure_respawn(self, rnd: int) -> dict[str, Any]:
        """SIGKILL the oldest worker (at least VICTIM_MIN_AGE old, waited for): its
        replacement appears among the master's children, then `show proc` lists it with a
        connection count (the master asks only workers that reported ready: they accept
        on the listening sockets), then a probe is served by it (the request log names the
        worker of each probe)."""
        assert self.master is not None
        master = self.master.pid
        current = [pid for pid, _ in show_proc(self.sock)[0]]
        if len(current) != WORKERS:
            raise BenchError(f"respawn {rnd}: show proc lists workers {current}")
        try:
            born = {pid: psutil.Process(pid).create_time() for pid in current}
        except psutil.Error as exc:
            raise BenchError(f"respawn {rnd}: a worker vanished: {exc}") from exc
        victim = min(born, key=born.__getitem__)
        time.sleep(max(0.0, born[victim] + VICTIM_MIN_AGE - time.time()))
        before = children(master)
        new: list[int] = []

        def appeared() -> float | None:
            fresh = children(master) - before
            if fresh:
                new.append(min(fresh))
                return now()
            return None

        def ready() -> float | None:
            if not new:
                return None
            listed = dict(show_proc(self.sock)[0])
            return now() if listed.get(new[0], "?") != "?" else None

        def served() -> float | None:
            if not new:
                return None
            return self.prober.served_by(lambda pid: pid == new[0])

        self.reqlog.drain()
        t0 = now()
        os.kill(victim, signal.SIGKILL)
        times = until(
            {"pid": appeared, "ready": ready, "served": served},
            t0, RESPAWN_TIMEOUT, f"respawn {rnd}", alive=self.master_alive,
        )
        return {"s": times, "victim": victim, "replacement": new[0]}

    def measure_takeover(self, rnd: int) -> dict[str, Any]:
        """`pylb -f lb.cfg -p pylb.pid -D -sf OLD`: the launcher exits; the pidfile names
        the new master; the new master logs that it sent SIGUSR1 to the old one (it does
        once its workers accept); a probe is served by one of its workers; the old master
        is gone. Done = served and old gone."""
        assert self.master is not None
        old = self.master
        old_workers = [psutil.Process(p) for p in children(old.pid)]
        used_before = self.used()
        mark = self.mark()
        wall = time.time()
        new: list[int] = []
        t0 = now()
        launcher = self.launch(f"takeover-{rnd}", "-D", "-sf", str(old.pid))

        def launcher_done() -> float | None:
            status = launcher.proc.poll()
            if status is None:
                return None
            if status != 0:
                raise BenchError(f"takeover {rnd}: launcher exited with status {status}")
            return now()

        def pidfile() -> float | None:
            try:
                pid = int(self.pidfile.read_text().strip() or 0)
            except (OSError, ValueError):
                return None
            if pid and pid != old.pid:
                new.append(pid)
                return now()
            return None

        signalled = re.compile(
            rf"master: (sent SIGUSR1 to old process {old.pid}"
            rf"|old process {old.pid} is already gone)"
        )

        def served() -> float | None:
            if not new:
                return None
            return self.prober.served_by(lambda pid: parent_of(pid) == new[0])

        def old_gone() -> float | None:
            self.reap()
            return None if _alive(old.pid) else now()

        self.reqlog.drain()
        try:
            times = until(
                {"launcher": launcher_done, "pidfile": pidfile,
                 "ready": self.logged(mark, lambda: new[0] if new else None, signalled),
                 "served": served, "old_gone": old_gone},
                t0, TAKEOVER_TIMEOUT, f"takeover {rnd}",
            )
        finally:
            if new:
                with contextlib.suppress(psutil.Error):
                    self.master = psutil.Process(new[0])
                    self.masters.append(self.master)
        times["done"] = max(times["served"], times["old_gone"])
        deadline = now() + STOP_TIMEOUT
        while any(_alive(w.pid) for w in old_workers) and now() < deadline:
            self.reap()
            time.sleep(0.05)
        left = [w.pid for w in old_workers if _alive(w.pid)]
        if left:
            raise BenchError(f"takeover {rnd}: old workers {left} still running "
                             f"{STOP_TIMEOUT:.0f}s after their master exited")
        self.watch.poll()
        # The launcher takes the sockets and state over before it daemonizes: other pid.
        times.update(log_times(self.watch.lines[mark:], None, {"state_in": TOOK_OVER}, wall))
        times.update(log_times(self.watch.lines[mark:], new[0],
                               {"forked": FORKED, "gen_ready": GEN_READY}, wall))
        return {"s": times, "old": old.pid, "new": new[0], "used_before": used_before,
                "used_after": self.used()}

    def check(self, after: str) -> dict[str, Any]:
        """A sample of users routed to the server the fill gave them, with the map's value
        for their path; `show table` still counting every entry."""
        keys = self.rng.sample(range(self.size), min(SAMPLE, self.size))
        misroutes = map_wrong = failed = 0
        examples: list[str] = []
        for n in keys:
            got = get(self.port, f"/k{n}", {"X-User": f"u{n}"})
            self.reqlog.drain()
            if got is None or got[0] != 200:
                failed += 1
                examples.append(f"u{n}: {got}")
                continue
            words = got[1].split()
            server, mapped = (words + ["", ""])[:2]
            misroutes += server != server_for(n)
            map_wrong += mapped != f"v{n}"
            if server != server_for(n) or mapped != f"v{n}":
                examples.append(f"u{n} /k{n}: got {got[1].strip()!r}, "
                                f"want '{server_for(n)} v{n}'")
        if not keys:  # empty table and map: the map's default must still come
            got = get(self.port, "/k0")
            self.reqlog.drain()
            words = got[1].split() if got is not None and got[0] == 200 else []
            if len(words) != 2 or words[1] != "miss":
                map_wrong += 1
                examples.append(f"/k0 (empty map): got {got}, want 'sN miss'")
        used = self.used()
        ok = not (misroutes or map_wrong or failed) and used == self.size
        return {"after": after, "keys": len(keys), "misroutes": misroutes,
                "map_wrong": map_wrong, "no_answer": failed, "used": used,
                "used_expected": self.size, "ok": ok, "examples": examples[:5]}


def run_size(
    size: int, opts: Options, tools: Tools, tmp: Path, named: tuple[int, int],
    reqlog: RequestLog, rng: random.Random,
) -> SizeResult:
    result = SizeResult(size)
    rundir = tmp / f"size-{size}"
    rundir.mkdir()
    with contextlib.ExitStack() as stack:
        pylb = StatePylb(stack, tools, rundir, size, named, reqlog, rng)
        try:
            pylb.write_files()
            for rnd in range(1, opts.rounds + 1):
                log(f"size {size}: startup {rnd}/{opts.rounds}")
                result.startup.append(pylb.measure_startup(rnd))
            log(f"size {size}: start and fill the table with {size} entries")
            pylb.start_foreground("main")
            result.fill_s = fill_table(pylb.sock, size)
            used = pylb.used()
            if used != size:
                raise BenchError(f"after the fill, show table counts used:{used}, not {size}")
            result.checks.append(pylb.check("fill"))
            measures = {"reload": pylb.measure_reload, "respawn": pylb.measure_respawn,
                        "takeover": pylb.measure_takeover}
            for what, measure_one in measures.items():
                for rnd in range(1, opts.rounds + 1):
                    log(f"size {size}: {what} {rnd}/{opts.rounds}")
                    try:
                        result.rounds[what].append({"round": rnd, **measure_one(rnd)})
                    except BenchError as exc:
                        result.errors.append(f"size {size}: {exc}{pylb.tail()}")
                        log(f"FAILED: {result.errors[-1]}")
                        if not pylb.master_alive():
                            raise BenchError("the pylb master is gone: size abandoned") from None
                        continue
                    result.checks.append(pylb.check(f"{what} {rnd}"))
                    if not result.checks[-1]["ok"]:
                        log(f"check after {what} {rnd} FAILED: {result.checks[-1]}")
        except BenchError as exc:
            result.errors.append(f"size {size}: {exc}")
            log(f"FAILED: {result.errors[-1]}")
        finally:
            result.probes = {"sent": pylb.prober.sent, "unlogged": pylb.prober.unlogged}
            pylb.watch.poll()
            result.notable_log = [
                line for line in pylb.watch.lines
                if NOTABLE.search(line) and not EXPECTED_LOG.search(line)
            ]
    return result


# --------------------------------------------------------------------------- part cpu


@dataclass
class CpuResult:
    runs: dict[str, list[TargetResult]] = field(default_factory=dict)  # "variant proxy"
    errors: list[str] = field(default_factory=list)


def start_cpu_proxy(
    stack: contextlib.ExitStack, proxy: str, variant: str, tools: Tools, tmp: Path,
    port: int, hello: tuple[int, int], bopts: BenchOptions,
) -> Managed:
    d = tmp / f"cpu-{proxy}-{variant}"
    d.mkdir()
    if proxy == "haproxy":
        assert tools.haproxy is not None
        text = haproxy_config(bopts, port, hello)
        if variant == "stick":
            head = "backend be\n"
            if head not in text:
                raise BenchError("bench.haproxy_config changed: no 'backend be' section")
            text = text.replace(head, head + "    stick-table type ip size 1m\n"
                                "    stick on src\n", 1)
        cfg = write(d / "haproxy.cfg", text)
        check = [tools.haproxy, "-c", "-f", str(cfg)]
        argv = [tools.haproxy, "-f", str(cfg), "-db"]
        kw: dict[str, Any] = {}
    else:
        assert tools.pylb is not None
        config = pylb_config(bopts, port, hello)
        if variant == "stick":
            config["backends"]["be"]["stick-table"] = {"type": "ip", "size": "1m"}
            config["backends"]["be"]["stick-on"] = "src"
        cfg = write(d / "pylb.yaml", pylb_yaml(config))
        check = [tools.pylb, "-c", "-f", str(cfg)]
        argv = [tools.pylb, "-f", str(cfg)]
        kw = {"cwd": d, "env": pylb_env()}
    done = subprocess.run(check, capture_output=True, text=True, timeout=30, **kw)
    if done.returncode != 0:
        raise BenchError(f"{proxy} -c rejected {cfg}:\n{done.stdout}{done.stderr}")
    proc = start_mine(stack, proxy, argv, d, **kw)
    wait_ready(proc, [port])
    return proc


def run_cpu(
    opts: Options, tools: Tools, tmp: Path, nginx: Managed, hello: tuple[int, int]
) -> CpuResult:
    bopts = BenchOptions(
        duration=opts.duration, connections=opts.connections, workers=WORKERS, mode="http",
        checks=False, json_path=None, only=PROXIES, warmup=1, keep_tmp=False,
    )
    result = CpuResult()
    ports = dict(zip([(v, p) for v in VARIANTS for p in PROXIES], free_ports(4), strict=True))
    with contextlib.ExitStack() as stack:
        procs = {
            key: start_cpu_proxy(stack, key[1], key[0], tools, tmp, port, hello, bopts)
            for key, port in ports.items()
        }
        for rnd in range(1, opts.rounds + 1):
            for variant, proxy in procs:
                name = f"{variant} {proxy}"
                log(f"cpu round {rnd}/{opts.rounds}: {proxy}, {VARIANT_TITLE[variant]}: "
                    f"wrk -t1 -c{opts.connections} -d{opts.duration}s")
                port = ports[(variant, proxy)]
                try:
                    res = measure(proxy, port, bopts, tools, nginx, procs[(variant, proxy)])
                except BenchError as exc:
                    res = TargetResult(proxy, port, error=str(exc).splitlines()[0])
                    result.errors.append(f"cpu round {rnd}, {name}: {exc}")
                    log(f"FAILED: {result.errors[-1]}")
                else:
                    if res.wrk is not None and res.wrk.errors:
                        result.errors.append(
                            f"cpu round {rnd}, {name}: wrk saw {res.wrk.non2xx} non-2xx and "
                            f"{sum(res.wrk.socket_errors.values())} socket errors"
                        )
                result.runs.setdefault(name, []).append(res)
    return result


# --------------------------------------------------------------------------- report


def spread(values: list[float], scale: float = 1000.0, spec: str = ".0f") -> str:
    """`median (min-max)`, scaled (seconds to ms by default)."""
    if not values:
        return "-"
    med = statistics.median(values) * scale
    return f"{med:{spec}} ({min(values) * scale:{spec}}-{max(values) * scale:{spec}})"


def figure(rounds: list[dict[str, Any]], key: str) -> list[float]:
    return [r["s"][key] for r in rounds if key in r.get("s", {})]


def startup_figure(result: SizeResult, key: str) -> list[float]:
    return [r[key] for r in result.startup if key in r]


def checks_cell(checks: list[dict[str, Any]]) -> str:
    if not checks:
        return "-"
    bad = [c for c in checks if not c["ok"]]
    if not bad:
        return f"ok ({len(checks)}x{checks[0]['keys']} keys)"
    parts = []
    for key, what in (("misroutes", "misroutes"), ("map_wrong", "map wrong"),
                      ("no_answer", "no answer")):
        total = sum(c[key] for c in checks)
        if total:
            parts.append(f"{total} {what}")
    wrong_used = sum(c["used"] != c["used_expected"] for c in checks)
    if wrong_used:
        parts.append(f"used wrong {wrong_used}x")
    return f"{', '.join(parts)} in {len(bad)}/{len(checks)} checks"


def state_tables(opts: Options, results: list[SizeResult]) -> list[str]:
    n = opts.rounds
    out = []
    rows = [["size", "first answer", "first worker forked", "generation ready"]]
    for r in results:
        rows.append([str(r.size)] + [spread(startup_figure(r, k)) for k in
                                     ("answer", "forked", "ready")])
    out.append(
        f"startup: launch of `pylb -f lb.cfg` (foreground) to the first answered request; the "
        f"map is indexed by the master before it forks, the stick table starts empty.\n"
        f"ms, median (min-max) of {n}; forked/ready from pylb's log stamps\n\n"
        + format_table(rows)
    )
    rows = [["size", "fill s", "entries/s", "check after fill"]]
    for r in results:
        rate = r.size / r.fill_s if r.fill_s else None
        rows.append([str(r.size), fmt(r.fill_s, ".1f"), fmt(rate, ".0f"),
                     checks_cell(r.checks_after("fill"))])
    out.append(
        "fill: `set table be key uN data.server_key s1|s2`, one prompt-mode connection, "
        "pipelined (not a figure of merit: the setup)\n\n" + format_table(rows)
    )
    rows = [["size", "Success=1", "workers forked", "gen ready", "new gen serves",
             "old gen gone", "checks"]]
    for r in results:
        rr = r.rounds["reload"]
        rows.append([str(r.size)] + [spread(figure(rr, k)) for k in
                                     ("answer", "forked", "ready", "served", "old_gone")]
                    + [checks_cell(r.checks_after("reload"))])
    out.append(
        "reload: `reload` on the stats socket, no load; ms after sending it, median (min-max) "
        f"of {n}.\nforked/ready: pylb's log; new gen serves: first probe (new connection each) "
        "served by a new worker, probing from the answer on\n\n" + format_table(rows)
    )
    rows = [["size", "new pid", "ready (show proc)", "replacement serves", "checks"]]
    for r in results:
        rr = r.rounds["respawn"]
        rows.append([str(r.size)] + [spread(figure(rr, k)) for k in ("pid", "ready", "served")]
                    + [checks_cell(r.checks_after("respawn"))])
    out.append(
        f"respawn: SIGKILL one worker; ms after the kill, median (min-max) of {n}.\nnew pid: "
        "a new child of the master; ready: `show proc` gives it a conns count (it reported "
        "ready); serves: first probe served by it\n\n" + format_table(rows)
    )
    rows = [["size", "launcher exits", "state in", "new ready", "new serves", "old gone",
             "done", "used before=after", "checks"]]
    for r in results:
        rr = r.rounds["takeover"]
        same = [x["used_before"] == x["used_after"] for x in rr]
        used = "-" if not rr else (f"{rr[0]['used_before']}={rr[-1]['used_after']}"
                                   if all(same) else f"DIFFERS {sum(not s for s in same)}x")
        rows.append([str(r.size)] + [spread(figure(rr, k)) for k in
                                     ("launcher", "state_in", "ready", "served", "old_gone",
                                      "done")]
                    + [used, checks_cell(r.checks_after("takeover"))])
    out.append(
        f"takeover: `pylb -f lb.cfg -p pylb.pid -D -sf OLD`; ms after launching it, median "
        f"(min-max) of {n}.\nstate in: new master logs it took over the sockets and state; "
        "new ready: it logs SIGUSR1 sent to OLD (its workers accept); serves: first probe "
        "served by its worker; done = serves and old gone\n\n" + format_table(rows)
    )
    return out


# A figure grows when its range at the largest size lies above the one at the smallest and
# the medians differ by more than both of these.
GROWTH_MIN_S = 0.010
GROWTH_MIN_SHARE = 0.10
GROWTH = (
    ("startup: first answer", lambda r: startup_figure(r, "answer")),
    ("reload: Success=1", lambda r: figure(r.rounds["reload"], "answer")),
    ("reload: new gen serves", lambda r: figure(r.rounds["reload"], "served")),
    ("respawn: replacement serves", lambda r: figure(r.rounds["respawn"], "served")),
    ("takeover: done", lambda r: figure(r.rounds["takeover"], "done")),
)


def growth(results: list[SizeResult]) -> tuple[str, dict[str, Any]]:
    """For each headline figure: medians by size, and whether the largest size's range lies
    above the smallest's (grows) or not (flat within the run-to-run spread)."""
    rows = [["figure", *(f"size {r.size}" for r in results), "largest - smallest", "verdict"]]
    doc: dict[str, Any] = {}
    ordered = sorted(results, key=lambda r: r.size)
    for title, get_values in GROWTH:
        values = {r.size: get_values(r) for r in results}
        meds = {s: statistics.median(v) if v else None for s, v in values.items()}
        lo, hi = values[ordered[0].size], values[ordered[-1].size]
        verdict, diff = "-", None
        if lo and hi and len(ordered) > 1:
            diff = statistics.median(hi) - statistics.median(lo)
            grows = min(hi) > max(lo) and diff > max(GROWTH_MIN_S, GROWTH_MIN_SHARE * min(lo))
            verdict = "GROWS" if grows else "flat (within spread)"
        rows.append([title, *(fmt(meds[r.size] * 1000 if meds[r.size] is not None else None,
                                  ".0f") for r in results),
                     fmt(diff * 1000 if diff is not None else None, "+.0f"), verdict])
        doc[title] = {"median_s": {str(k): v for k, v in meds.items()}, "diff_s": diff,
                      "verdict": verdict}
    return "growth with size (medians, ms)\n\n" + format_table(rows), doc


def cpu_summary(opts: Options, cpu: CpuResult) -> tuple[str, dict[str, Any]]:
    def us(name: str) -> list[float]:
        return [r.proxy_us_per_req for r in cpu.runs.get(name, [])
                if r.proxy_us_per_req is not None]

    def rps(name: str) -> list[float]:
        return [r.wrk.rps for r in cpu.runs.get(name, []) if r.wrk is not None]

    def errors(name: str) -> int:
        return sum(r.wrk.errors for r in cpu.runs.get(name, []) if r.wrk is not None)

    rows = [["config", "proxy", "CPU us/req", "req/s", "wrk errors"]]
    doc: dict[str, Any] = {"us_per_request": {}, "ratios": {}, "table_cost_us": {}}
    for variant in VARIANTS:
        for proxy in PROXIES:
            name = f"{variant} {proxy}"
            rows.append([VARIANT_TITLE[variant] if proxy == PROXIES[0] else "", proxy,
                         spread(us(name), 1, ".1f"), spread(rps(name), 1, ".0f"),
                         str(errors(name))])
            doc["us_per_request"][name] = us(name)
    lines = []
    for variant in VARIANTS:
        h, p = cpu.runs.get(f"{variant} haproxy", []), cpu.runs.get(f"{variant} pylb", [])
        pairs = [b.proxy_us_per_req / a.proxy_us_per_req for a, b in zip(h, p, strict=False)
                 if a.proxy_us_per_req and b.proxy_us_per_req]
        med_h, med_p = us(f"{variant} haproxy"), us(f"{variant} pylb")
        of_medians = (statistics.median(med_p) / statistics.median(med_h)
                      if med_h and med_p else None)
        doc["ratios"][variant] = {"of_medians": of_medians, "per_round": pairs}
        lines.append(f"pylb/haproxy CPU per request, {VARIANT_TITLE[variant]:<12}: "
                     f"{fmt(of_medians, '.2f')} (per round: {spread(pairs, 1, '.2f')})")
    for proxy in PROXIES:
        a, b = us(f"plain {proxy}"), us(f"stick {proxy}")
        cost = statistics.median(b) - statistics.median(a) if a and b else None
        doc["table_cost_us"][proxy] = cost
        share = (f" ({cost / statistics.median(a) * 100:+.0f}%)" if cost is not None else "")
        lines.append(f"cost of the stick table, {proxy:<7}: {fmt(cost, '+.1f')} us/req{share} "
                     "(median with - median without)")
    text = (
        f"CPU per request: wrk -t1 -c{opts.connections} -d{opts.duration}s keep-alive, "
        f"{opts.rounds} interleaved rounds; proxy process tree CPU / requests, median "
        "(min-max)\nHAProxy nbthread 1; pylb 2 workers; stick: HAProxy `stick-table type ip "
        "size 1m` + `stick on src`, pylb `stick-table: {type: ip, size: 1m}` + `stick-on: src`"
        "\n\n" + format_table(rows) + "\n\n" + "\n".join(lines)
    )
    return text, doc


def code_state() -> dict[str, tuple[int, int]]:
    """(mtime, size) of every file of pylb's code: others may be editing the checkout, and
    every worker started (reload, respawn, takeover) runs the code on disk at that time."""
    out = {}
    for path in sorted((REPO / "lb").rglob("*.py")) + [REPO / "bin" / "pylb"]:
        with contextlib.suppress(OSError):
            st = path.stat()
            out[str(path.relative_to(REPO))] = (st.st_mtime_ns, st.st_size)
    return out


def changed_code(before: dict[str, tuple[int, int]]) -> list[str]:
    after = code_state()
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def git_state() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "lb", "bin"],
                               capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return f"{head or 'unknown'}; {len(dirty)} uncommitted changes under lb/ and bin/"


def machine(tools: Tools) -> dict[str, Any]:
    info = run_meta(tools)
    try:
        timed = subprocess.run([sys.executable, "-m", "timeit", "sum(range(1000))"],
                               capture_output=True, text=True, timeout=120)
        info["timeit_sum_range_1000"] = timed.stdout.strip() or timed.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["timeit_sum_range_1000"] = f"unknown ({exc})"
    if tools.pylb:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            done = subprocess.run([tools.pylb, "-v"], capture_output=True, text=True,
                                  timeout=30, env=pylb_env())
            info["versions"]["pylb"] = (done.stdout + done.stderr).strip()
    info["machine"] = platform.machine()
    info["kernel"] = platform.release()
    info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    info["pylb_checkout"] = git_state()
    return info


def header(opts: Options, info: dict[str, Any]) -> str:
    versions = ", ".join(f"{k}: {v}" for k, v in info["versions"].items())
    return (
        f"pylb state benchmark, {info['time']} on {info['host']} ({info['cpus']} CPUs, "
        f"{info['machine']}, Linux {info['kernel']}, load average at start "
        f"{' '.join(map(str, info['loadavg_at_start']))})\n"
        f"calibration: python -m timeit \"sum(range(1000))\": {info['timeit_sum_range_1000']}\n"
        f"python {info['python']}; {versions}\n"
        f"pylb checkout: {info['pylb_checkout']}\n"
        f"parts {','.join(opts.parts)}; sizes {','.join(map(str, opts.sizes))}; rounds "
        f"{opts.rounds}; pylb workers {WORKERS}; wrk -t1 -c{opts.connections} "
        f"-d{opts.duration}s{' (--quick)' if opts.quick else ''}"
    )


def size_json(r: SizeResult) -> dict[str, Any]:
    return {
        "size": r.size,
        "startup_s": r.startup,
        "fill_s": r.fill_s,
        "reload": r.rounds["reload"],
        "respawn": r.rounds["respawn"],
        "takeover": r.rounds["takeover"],
        "checks": r.checks,
        "probes": r.probes,
        "errors": r.errors,
        "notable_log": r.notable_log[:200],
    }


def report(
    opts: Options, info: dict[str, Any], sizes: list[SizeResult], cpu: CpuResult | None
) -> list[str]:
    """Print everything; the failures (empty: all measured, all checks ok)."""
    print(header(opts, info))
    failures: list[str] = []
    doc: dict[str, Any] = {"meta": {**info, "sizes": list(opts.sizes), "rounds": opts.rounds,
                                    "duration": opts.duration,
                                    "connections": opts.connections, "workers": WORKERS}}
    if sizes:
        for text in state_tables(opts, sizes):
            print("\n" + text)
        text, doc["growth"] = growth(sizes)
        print("\n" + text)
        doc["state"] = [size_json(r) for r in sizes]
        for r in sizes:
            failures += r.errors
            failures += [f"size {r.size}: check after {c['after']}: {c}" for c in r.checks
                         if not c["ok"]]
            failures += [f"size {r.size}: takeover {x['round']}: show table used "
                         f"{x['used_before']} before, {x['used_after']} after"
                         for x in r.rounds["takeover"] if x["used_before"] != x["used_after"]]
            if r.probes.get("unlogged"):
                print(f"\nnote: size {r.size}: {r.probes['unlogged']} of {r.probes['sent']} "
                      "probes had no request-log line (dropped datagram)")
        notable = [(r.size, line) for r in sizes for line in r.notable_log]
        if notable:
            print(f"\npylb log lines worth a look ({len(notable)}; SIGKILLed workers left out):")
            for size, line in notable[:20]:
                print(f"    size {size}: {line}")
    if cpu is not None:
        text, doc["cpu"] = cpu_summary(opts, cpu)
        print("\n" + text)
        doc["cpu"]["runs"] = {k: [result_json(r) for r in v] for k, v in cpu.runs.items()}
        failures += cpu.errors
    doc["failures"] = failures
    changed = info.get("code_changed_during_run")
    if changed:
        print(f"\nWARNING: pylb's code changed on disk during the run (workers started after "
              f"that ran the new code): {', '.join(changed)}")
    if failures:
        print(f"\nFAILED ({len(failures)}):")
        for line in failures:
            print(f"  - {line}")
    if opts.json_path:
        opts.json_path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nJSON written to {opts.json_path}")
    return failures


# --------------------------------------------------------------------------- main


def run_all(
    opts: Options, tools: Tools, tmp: Path
) -> tuple[list[SizeResult], CpuResult | None]:
    rng = random.Random(opts.seed)
    hello = tuple(free_ports(2))
    named = tuple(free_ports(2))
    sizes: list[SizeResult] = []
    cpu = None
    with contextlib.ExitStack() as stack:
        stack.callback(stop_descendants)  # runs last
        conf = write(tmp / "nginx.conf", nginx_state_config(tmp, hello, named))
        argv = [tools.nginx, "-p", str(tmp), "-e", str(tmp / "nginx-error.log"), "-c",
                str(conf), "-g", "daemon off;"]
        nginx = start_mine(stack, "nginx", argv, tmp)
        wait_ready(nginx, list(hello))
        if not all(port_accepts(p) for p in named):
            raise BenchError(f"nginx does not accept on {named}; log {nginx.log_path}")
        if "state" in opts.parts:
            reqlog = RequestLog(tmp / "reqlog.sock")
            stack.callback(reqlog.close)
            for size in opts.sizes:
                sizes.append(run_size(size, opts, tools, tmp, named, reqlog, rng))
        if "cpu" in opts.parts:
            cpu = run_cpu(opts, tools, tmp, nginx, hello)
    return sizes, cpu


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, raise_interrupt)
    try:
        tools = find_tools(("haproxy", "pylb") if "cpu" in opts.parts else ("pylb",))
    except MissingDependency as exc:
        print(f"state: {exc}", file=sys.stderr)
        return EXIT_MISSING
    if not become_subreaper():
        log("PR_SET_CHILD_SUBREAPER unavailable: daemons are stopped by pid only")
    code = code_state()
    try:
        info = machine(tools)
        with temp_dir(opts.keep_tmp) as tmp:
            sizes, cpu = run_all(opts, tools, tmp)
    except KeyboardInterrupt:
        print("\nstate: interrupted; all started processes stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BenchError as exc:
        print(f"state: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    info["code_changed_during_run"] = changed_code(code)
    failures = report(opts, info, sizes, cpu)
    return EXIT_FAILED if failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
