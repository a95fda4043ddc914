#!/usr/bin/env python3
"""Benchmark pylb against HAProxy and against the bare backend.

An nginx backend (two server blocks on two free loopback ports) stays up for the whole run.
wrk drives it directly, through HAProxy and through pylb (and through other pylb checkouts,
`--pylb-tree`) in interleaved rounds: in every round each proxy is started afresh, warmed up,
measured and stopped, one at a time. For each proxy it measures the CPU time (user and system,
whole process tree) spent per request. The report gives every figure's median and range over
the rounds, and ratios computed round by round from the paired runs; `--profile` adds a
py-spy profile of pylb's workers. Figures are printed and optionally written as JSON; nothing
is asserted.

With `--tls` both proxies terminate TLS on their front bind (the same generated ECDSA P-256
certificate); each proxy run then measures keep-alive requests over TLS (wrk, https), full
handshakes (`openssl s_time -new` clients: one new connection, one full handshake and one
request each) and resumed handshakes (`openssl s_time -reuse`).

See bench/README.md for how to run it and how to read the output.
"""

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import plot

try:
    import psutil
except ImportError:  # pragma: no cover - depends on the interpreter used
    psutil = None

try:
    import yaml
except ImportError:  # pragma: no cover - depends on the interpreter used
    yaml = None

REPO = Path(__file__).resolve().parent.parent
PYLB_BIN = REPO / "bin" / "pylb"
TARGETS = ("direct", "haproxy", "pylb")
APT_PACKAGE = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk", "openssl": "openssl"}
EXTRA_BIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
BODY = b"hello\n"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
WRK_GRACE = 30.0
WRK_TIMEOUT = "10s"  # wrk's --timeout for bench.py's own runs (its default, 2s, is short for 1m)
MIB = 1 << 20
SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
PROFILE_RATE = 250
PROFILE_TOP_SELF = 25
PROFILE_TOP_TOTAL = 15
PROFILE_COMMON = 0.95  # functions on at least this share of the stacks: startup and event loop
PYSPY_START_TIMEOUT = 15.0
PYSPY_STOP_TIMEOUT = 60.0
# --tls: what a proxy run measures, in this order; s_time's mode for each handshake measure
TLS_MEASURES = ("keepalive", "full", "resumed")
HANDSHAKE_MEASURES = {"full": "-new", "resumed": "-reuse"}
TLS_CLIENTS = 4  # openssl s_time processes at once (each makes one connection at a time)
TLS_SERVER_NAME = "localhost"  # the certificate's DNS name (it also names IP 127.0.0.1)
# s_time sends `GET <-www> HTTP/1.0\r\n\r\n` on every connection: a Host header (as every
# real client sends) is smuggled in through -www, and s_time's own ` HTTP/1.0` ends up in
# the User-Agent. TLS_REQUEST is the request it makes, byte for byte (the probe sends it too).
STIME_WWW = f"/ HTTP/1.0\r\nHost: {TLS_SERVER_NAME}\r\nUser-Agent: openssl-s_time"
TLS_REQUEST = f"GET {STIME_WWW} HTTP/1.0\r\n\r\n".encode()
TLS_ALPN = "http/1.1"
TLS_MIN_VERSION = "TLSv1.2"  # both proxies: TLS 1.2 and 1.3 allowed
STIME_GRACE = 30.0
# issue 14's targets, on the median of the per-round ratios pylb/haproxy
TLS_TARGETS = (
    ("full", "handshake CPU ratio", "<=", 1 / 0.7),
    ("full", "handshakes per core ratio", ">=", 0.7),
    ("keepalive", "cpu_per_request", "<=", 2.0),
)

EXIT_OK, EXIT_FAILED, EXIT_MISSING, EXIT_INTERRUPTED = 0, 1, 2, 130


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


class MissingDependency(Exception):
    """A program or module the benchmark needs is not installed (exit 2)."""


def log(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class PylbTree:
    """Another pylb checkout: run as `root`/bin/pylb with `root` as cwd and first on PYTHONPATH."""

    label: str
    root: Path
    env: tuple[tuple[str, str], ...] = ()  # set for its processes (--pylb-pure)

    @property
    def target(self) -> str:
        return f"pylb@{self.label}"


@dataclass(frozen=True)
class TlsFiles:
    """--tls: the certificate both proxies serve, made in the run's temp dir (make_tls_files)."""

    crt: Path  # PEM: the ECDSA P-256 certificate, then its private key (the `crt` of both)
    ca: Path  # PEM: the CA that signed it (the clients verify against it)
    description: str = ""


@dataclass(frozen=True)
class Options:
    duration: int
    connections: int
    workers: int
    mode: str
    checks: bool
    json_path: Path | None
    only: tuple[str, ...]
    warmup: int
    keep_tmp: bool
    # bench.py's own options; the other scripts build Options with the fields above only
    rounds: int = 1
    size: int | None = None
    pylb_trees: tuple[PylbTree, ...] = ()
    profile: Path | None = None
    wrk_timeout: str | None = None
    haproxy_splice: bool = True  # tcp mode: HAProxy relays with splice() both ways
    haproxy_pipesize: int | None = None  # its tune.pipesize (None: the kernel's, 64 KiB)
    tls: bool = False  # --tls: both proxies terminate TLS on their front bind
    tls_measures: tuple[str, ...] = TLS_MEASURES
    tls_clients: int = TLS_CLIENTS
    tls_profile: str = "full"  # the load of the --profile run under --tls
    profile_native: bool = False  # py-spy --native (blocking samples)
    skipped: tuple[str, ...] = ()  # targets asked for but not run (direct under --tls)
    tls_files: TlsFiles | None = None  # set once the certificate is made (run_all)
    plot: Path | None = None  # --plot: the PNG chart of the figures
    command: str = ""  # the command line, for the chart's caption

    @property
    def targets(self) -> tuple[str, ...]:
        """Every target of a round, in the order they run."""
        return self.only + tuple(t.target for t in self.pylb_trees)

    @property
    def profile_target(self) -> str | None:
        pylbs = [t for t in self.targets if is_pylb(t)]
        return pylbs[0] if pylbs else None


def is_pylb(target: str) -> bool:
    return target == "pylb" or target.startswith("pylb@")


def comma_list(option: str, allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma list of `allowed` names, in `allowed`'s order."""

    def parse(text: str) -> tuple[str, ...]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names or any(n not in allowed for n in names):
            raise argparse.ArgumentTypeError(
                f"{option} takes a comma list of {','.join(allowed)}; got {text!r}"
            )
        return tuple(n for n in allowed if n in names)

    return parse


parse_only = comma_list("--only", TARGETS)
parse_measures = comma_list("--tls-measures", TLS_MEASURES)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_size(text: str) -> int:
    """BYTES with an optional k, m or g suffix (1024-based): `100`, `64k`, `1m`, `1MB`."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", text.lower())
    if not m or int(m.group(1)) < 1:
        raise argparse.ArgumentTypeError(
            f"--size takes a number of bytes >= 1 with an optional k/m/g suffix "
            f"(1024-based), e.g. 1m; got {text!r}"
        )
    return int(m.group(1)) * SIZE_UNITS[m.group(2)]


def size_text(size: int | None) -> str:
    """`hello (6 B)` for the default body, else `1m (1048576 B)` and the like."""
    if size is None:
        return f"hello ({len(BODY)} B)"
    for suffix, unit in (("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if size % unit == 0:
            return f"{size // unit}{suffix} ({size} B)"
    return f"{size} B"


def parse_tree(text: str) -> PylbTree:
    label, sep, path = text.partition("=")
    if not sep or not path or not re.fullmatch(r"[A-Za-z0-9_.-]+", label):
        raise argparse.ArgumentTypeError(
            f"--pylb-tree takes LABEL=DIR (LABEL of letters, digits, _ . -); got {text!r}"
        )
    root = Path(path).expanduser().resolve()
    if not os.access(root / "bin" / "pylb", os.X_OK) or not (root / "lb" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(
            f"--pylb-tree {text!r}: {root} has no executable bin/pylb and lb/ package"
        )
    return PylbTree(label, root)


def plot_path_problem(path: Path) -> str | None:
    """Why --plot PATH cannot be written (checked before the run, not after it), or None."""
    if importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib: .venv/bin/pip install matplotlib (test extras)"
    if path.is_dir():
        return f"--plot {path}: is a directory"
    if not path.resolve().parent.is_dir():
        return f"--plot {path}: no directory {path.resolve().parent}"
    return None


def command_line(script: str, argv: list[str] | None) -> str:
    """`bench/bench.py --rounds 1 ...` as typed (quoted for a shell)."""
    return shlex.join([script, *(sys.argv[1:] if argv is None else argv)])


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(
        description="Compare pylb with HAProxy and with direct access to an nginx backend.",
    )
    p.add_argument("--duration", type=positive_int, default=10, help="seconds per wrk run")
    p.add_argument("--connections", type=positive_int, default=50, help="wrk connections")
    p.add_argument("--workers", type=positive_int, default=2, help="pylb global.workers")
    p.add_argument("--mode", choices=("http", "tcp"), default="http", help="proxy mode")
    p.add_argument(
        "--checks", action="store_true", help="enable health checks and cookie persistence"
    )
    p.add_argument("--json", dest="json_path", type=Path, help="write the figures here")
    p.add_argument(
        "--only", type=parse_only, default=TARGETS, help="comma list of direct,haproxy,pylb"
    )
    p.add_argument(
        "--warmup", type=int, default=1, help="seconds of unmeasured wrk before each run (0: none)"
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument(
        "--rounds", type=positive_int, default=5, help="interleaved rounds of all targets"
    )
    p.add_argument(
        "--size",
        type=parse_size,
        help="response body size in bytes, suffix k/m allowed (default: 'hello\\n')",
    )
    p.add_argument(
        "--pylb-tree",
        dest="pylb_trees",
        type=parse_tree,
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="extra target pylb@LABEL running DIR/bin/pylb with DIR's lb package (repeatable)",
    )
    p.add_argument(
        "--pylb-pure",
        action="store_true",
        help="extra target pylb@pure: this checkout with PYLB_PURE=1 (its hot path as Python)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        metavar="PATH",
        help="after the rounds, one unmeasured pylb run under py-spy; raw samples to PATH",
    )
    p.add_argument(
        "--haproxy-no-splice",
        action="store_true",
        help="tcp mode: HAProxy copies with recv/send (default: option splice-request and "
        "option splice-response, kernel splicing both ways)",
    )
    p.add_argument(
        "--haproxy-pipesize",
        type=parse_size,
        metavar="BYTES",
        help="tcp mode with splicing: HAProxy's tune.pipesize, e.g. 1m (default: the kernel's)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="both proxies terminate TLS (generated ECDSA P-256 certificate); measures "
        "keep-alive over TLS, full and resumed handshakes; skips direct",
    )
    p.add_argument(
        "--tls-measures",
        type=parse_measures,
        metavar="LIST",
        help=f"with --tls: comma list of {','.join(TLS_MEASURES)} (default: all)",
    )
    p.add_argument(
        "--tls-clients",
        type=positive_int,
        metavar="N",
        help=f"with --tls: openssl s_time processes at once in a handshake measure "
        f"(default {TLS_CLIENTS})",
    )
    p.add_argument(
        "--tls-profile",
        choices=TLS_MEASURES,
        help="with --tls and --profile: the load of the profiled run (default: full)",
    )
    p.add_argument(
        "--profile-native",
        action="store_true",
        help="with --profile: py-spy --native (C frames: OpenSSL, uvloop; blocking samples)",
    )
    p.add_argument(
        "--plot",
        type=Path,
        metavar="PATH",
        help="after the run, also write the figures as a PNG chart (needs matplotlib)",
    )
    a = p.parse_args(argv)
    if a.plot is not None and (problem := plot_path_problem(a.plot)):
        p.error(problem)
    if not a.tls:
        for name in ("tls_measures", "tls_clients", "tls_profile"):
            if getattr(a, name) is not None:
                p.error(f"--{name.replace('_', '-')} needs --tls")
    if (a.tls_profile or a.profile_native) and a.profile is None:
        p.error("--tls-profile and --profile-native need --profile")
    measures = a.tls_measures or TLS_MEASURES
    if a.tls_profile and a.tls_profile not in measures:
        p.error(f"--tls-profile {a.tls_profile} is not among --tls-measures")
    only, skipped = a.only, ()
    if a.tls and "direct" in only:
        only, skipped = tuple(t for t in only if t != "direct"), ("direct",)
        if not only and not a.pylb_trees and not a.pylb_pure:
            p.error("--tls needs a proxy: direct (nginx alone) serves no TLS")
    labels = [t.label for t in a.pylb_trees]
    if len(set(labels)) != len(labels):
        p.error(f"--pylb-tree labels must differ; got {', '.join(labels)}")
    opts = Options(
        duration=a.duration,
        connections=a.connections,
        workers=a.workers,
        mode=a.mode,
        checks=a.checks,
        json_path=a.json_path,
        only=only,
        warmup=max(0, a.warmup),
        keep_tmp=a.keep_tmp,
        rounds=a.rounds,
        size=a.size,
        pylb_trees=tuple(a.pylb_trees)
        + ((PylbTree("pure", REPO, (("PYLB_PURE", "1"),)),) if a.pylb_pure else ()),
        profile=a.profile,
        wrk_timeout=WRK_TIMEOUT,
        haproxy_splice=not a.haproxy_no_splice,
        haproxy_pipesize=a.haproxy_pipesize,
        tls=a.tls,
        tls_measures=measures,
        tls_clients=a.tls_clients or TLS_CLIENTS,
        tls_profile=a.tls_profile or ("full" if "full" in measures else measures[0]),
        profile_native=a.profile_native,
        skipped=skipped,
        plot=a.plot,
        command=command_line("bench/bench.py", argv),
    )
    if opts.profile is not None and opts.profile_target is None:
        p.error("--profile needs a pylb target (--only ...,pylb or --pylb-tree)")
    return opts


# --------------------------------------------------------------------------- dependencies


@dataclass(frozen=True)
class Tools:
    nginx: str
    wrk: str
    haproxy: str | None
    pylb: str | None
    pyspy: str | None = None
    openssl: str | None = None  # --tls: certificates, s_time and s_client


def find_program(name: str) -> str:
    path = os.pathsep.join([os.environ.get("PATH", ""), *EXTRA_BIN_DIRS])
    found = shutil.which(name, path=path)
    if found is None:
        raise MissingDependency(
            f"{name} not found; install it with: apt-get install {APT_PACKAGE[name]}"
        )
    return found


def find_pyspy() -> str | None:
    """py-spy next to this interpreter (the venv) or on PATH; None if there is none."""
    local = Path(sys.executable).parent / "py-spy"
    if os.access(local, os.X_OK):
        return str(local)
    return shutil.which("py-spy")


def find_tools(only: tuple[str, ...], profile: bool = False, tls: bool = False) -> Tools:
    if psutil is None:
        raise MissingDependency(
            "python module psutil not found; run with the project venv "
            "(.venv/bin/python bench/bench.py) or pip install psutil"
        )
    pylb = None
    if "pylb" in only:
        if yaml is None:
            raise MissingDependency("python module yaml not found; pip install pyyaml")
        if not os.access(PYLB_BIN, os.X_OK):
            raise MissingDependency(
                f"{PYLB_BIN} not found or not executable (pylb not built yet?); "
                "run without pylb: --only direct,haproxy"
            )
        pylb = str(PYLB_BIN)
    pyspy = find_pyspy()
    if profile and pyspy is None:
        raise MissingDependency(
            "py-spy not found (--profile needs it); install it into the venv: "
            ".venv/bin/pip install py-spy"
        )
    return Tools(
        nginx=find_program("nginx"),
        wrk=find_program("wrk"),
        haproxy=find_program("haproxy") if "haproxy" in only else None,
        pylb=pylb,
        pyspy=pyspy,
        openssl=find_program("openssl") if tls else None,
    )


def program_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (out.stdout + out.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


# --------------------------------------------------------------------------- ports


@dataclass(frozen=True)
class Ports:
    nginx: tuple[int, int]
    haproxy: int
    pylb: int


def free_ports(count: int) -> list[int]:
    """Ask the kernel for `count` distinct free loopback ports (all held open together)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pick_ports() -> Ports:
    a, b, c, d = free_ports(4)
    return Ports(nginx=(a, b), haproxy=c, pylb=d)


def pick_target_ports(targets: tuple[str, ...]) -> tuple[Ports, dict[str, int]]:
    """Ports of nginx and of every target (`direct` is nginx's first port)."""
    free = free_ports(2 + len(targets))
    nginx = (free[0], free[1])
    port = {t: nginx[0] if t == "direct" else p for t, p in zip(targets, free[2:], strict=True)}
    return Ports(nginx, port.get("haproxy", 0), port.get("pylb", 0)), port


# --------------------------------------------------------------------------- processes


def tree_cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU of a process and all its descendants (reaped children included)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    user = system = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = proc.cpu_times()
            user += t.user + t.children_user
            system += t.system + t.children_system
    return user, system


def tree_process_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """pid -> (title, user + system CPU seconds) of a process and each of its descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    out: dict[int, tuple[str, float]] = {}
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = proc.cpu_times()
            title = " ".join(" ".join(proc.cmdline()).split()) or proc.name()
            out[proc.pid] = (title, t.user + t.system)
    return out


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its descendants (reaped children included)."""
    return sum(tree_cpu_times(pid))


class Managed:
    """A child process in its own session, with output in a log file; stop() kills its tree."""

    def __init__(
        self, name: str, argv: list[str], log_path: Path, append: bool = False, **popen: Any
    ) -> None:
        """`append`: the log is shared with other processes (successive pylb masters)."""
        self.name = name
        self.argv = argv
        self.log_path = log_path
        with open(log_path, "ab" if append else "wb") as log_file:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **popen,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def cpu_times(self) -> tuple[float, float]:
        return tree_cpu_times(self.proc.pid)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the leader, wait, then SIGKILL whatever is left of the tree and group."""
        try:
            leftovers = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            leftovers = []
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _, still = psutil.wait_procs(leftovers, timeout=STOP_TIMEOUT)
        for proc in still:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


def start(stack: contextlib.ExitStack, name: str, argv: list[str], tmp: Path, **kw: Any) -> Managed:
    proc = Managed(name, argv, tmp / f"{name}.log", **kw)
    stack.callback(proc.stop)
    return proc


def http_ok(port: int, body: bytes = BODY, tls: ssl.SSLContext | None = None) -> bool:
    """GET / answers 200 with `body`; over TLS (verified with `tls`) when it is given."""
    conn = (
        http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        if tls is None
        else http.client.HTTPSConnection("127.0.0.1", port, timeout=2, context=tls)
    )
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.status == 200 and resp.read() == body
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def wait_ready(
    proc: Managed,
    ports: list[int],
    timeout: float = READY_TIMEOUT,
    body: bytes = BODY,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Wait until every port accepts and an HTTP request through it returns the backend body
    (over TLS, verified with the client context `tls`, when it is given)."""
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending:
        if not proc.alive():
            raise BenchError(
                f"{proc.name} exited with status {proc.proc.returncode} during startup; "
                f"log {proc.log_path}:\n{proc.log_tail()}"
            )
        if port_accepts(pending[0]) and http_ok(pending[0], body, tls):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise BenchError(
                f"{proc.name} not serving on 127.0.0.1:{pending[0]} after {timeout:.0f}s; "
                f"log {proc.log_path}:\n{proc.log_tail()}"
            )
        time.sleep(0.05)


# --------------------------------------------------------------------------- configs


def body_bytes(size: int | None) -> bytes:
    """The body nginx answers: `hello\\n`, or `size` bytes of printable lines."""
    if size is None:
        return BODY
    line = b"pylb bench body 0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOP\n"
    return (line * (size // len(line) + 1))[:size]


def nginx_config(tmp: Path, ports: tuple[int, ...], size: int | None = None) -> str:
    """Without `size`: `return 200 "hello\\n"`; with it: the file www/body.bin (sendfile)."""
    if size is None:
        location = 'location / { return 200 "hello\\n"; }'
        static = ""
    else:
        location = f"location / {{ root {tmp}/www; try_files /body.bin =404; }}"
        static = (
            "    sendfile on;\n"
            "    open_file_cache max=16 inactive=1h;\n"
            "    open_file_cache_valid 1h;\n"
        )
    servers = "\n".join(
        f"""    server {{
        listen 127.0.0.1:{port};
        {location}
    }}"""
        for port in ports
    )
    return f"""# generated by bench/bench.py
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type text/plain;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
{static}    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
{servers}
}}
"""


def haproxy_config(opts: Options, port: int, backends: tuple[int, ...]) -> str:
    """haproxy.cfg: one frontend, one roundrobin backend over the nginx ports.

    In tcp mode HAProxy splices both ways (`option splice-request`, `option
    splice-response`: the bytes go socket -> pipe -> socket in the kernel) unless
    `opts.haproxy_splice` is off (--haproxy-no-splice: recv/send through its buffers).
    Not `option splice-auto`: its heuristic left most of a 1 MiB response to recv/send
    here, and cost as much CPU per MB as no splicing at all."""
    defaults = [
        f"mode {opts.mode}",
        "timeout connect 5s",
        "timeout client 30s",
        "timeout server 30s",
    ]
    backend = ["balance roundrobin"]
    server_opts = [""] * len(backends)
    if opts.mode == "http":
        defaults.append("option http-keep-alive")
    elif opts.haproxy_splice:
        defaults += ["option splice-request", "option splice-response"]
    if opts.checks:
        if opts.mode == "http":
            backend += [
                "option httpchk GET /", "cookie SRV insert indirect nocache", "option forwardfor",
            ]
            server_opts = [f" check cookie s{i}" for i in range(1, len(backends) + 1)]
        else:
            server_opts = [" check"] * len(backends)
    glob = ["nbthread 1", "maxconn 4096"]
    if opts.mode == "tcp" and opts.haproxy_splice and opts.haproxy_pipesize:
        glob.append(f"tune.pipesize {opts.haproxy_pipesize}")
    bind = f"bind 127.0.0.1:{port}"
    if opts.tls:
        files = tls_files_of(opts)
        # the stats socket only to read its SSL counters (full and resumed sessions)
        glob.append(f"stats socket {haproxy_stats_path(files)} level user")
        bind += f" ssl crt {files.crt} alpn {TLS_ALPN} ssl-min-ver {TLS_MIN_VERSION}"
    servers = [
        f"server s{i} 127.0.0.1:{p}{extra}"
        for i, (p, extra) in enumerate(zip(backends, server_opts, strict=True), start=1)
    ]
    sections = {
        "global": glob,
        "defaults": defaults,
        "frontend fe": [bind, "default_backend be"],
        "backend be": backend + servers,
    }
    return "# generated by bench/bench.py\n" + "".join(
        f"{title}\n" + "".join(f"    {line}\n" for line in lines) + "\n"
        for title, lines in sections.items()
    )


def pylb_config(opts: Options, port: int, backends: tuple[int, ...]) -> dict[str, Any]:
    """pylb YAML config (as a dict) per /work/notes/config-spec.md."""
    servers: dict[str, dict[str, Any]] = {
        f"s{i}": {"address": f"127.0.0.1:{p}"} for i, p in enumerate(backends, start=1)
    }
    backend: dict[str, Any] = {"mode": opts.mode, "balance": "roundrobin"}
    if opts.checks:
        for name, server in servers.items():
            server["check"] = True
            if opts.mode == "http":
                server["cookie"] = name
        if opts.mode == "http":
            backend["http-check"] = {"method": "GET", "path": "/"}
            backend["cookie"] = {"name": "SRV", "mode": "insert", "indirect": True, "nocache": True}
    backend["servers"] = servers
    frontend: dict[str, Any] = {
        "bind": f"127.0.0.1:{port}", "mode": opts.mode, "default_backend": "be",
    }
    if opts.tls:
        files = tls_files_of(opts)
        frontend["bind"] = [{
            "address": f"127.0.0.1:{port}",
            "ssl": True,
            "crt": str(files.crt),
            "alpn": TLS_ALPN,
            "ssl-min-ver": TLS_MIN_VERSION,
        }]
    if opts.checks and opts.mode == "http":
        frontend["forwardfor"] = True  # X-Forwarded-For, as HAProxy's option forwardfor
    return {
        "global": {"workers": opts.workers, "maxconn": 4096},
        "defaults": {
            "mode": opts.mode,
            "timeout": {"connect": "5s", "client": "30s", "server": "30s"},
        },
        "frontends": {"fe": frontend},
        "backends": {"be": backend},
    }


def tls_files_of(opts: Options) -> TlsFiles:
    if opts.tls_files is None:
        raise BenchError("--tls: no certificate made yet (make_tls_files sets opts.tls_files)")
    return opts.tls_files


def haproxy_stats_path(files: TlsFiles) -> Path:
    return files.crt.parent / "haproxy.sock"


def pylb_yaml(config: dict[str, Any]) -> str:
    """Dump the config as YAML; "HOST:PORT" strings are written double-quoted."""

    class Dumper(yaml.SafeDumper):
        pass

    def represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = '"' if ":" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, represent_str)
    header = "# generated by bench/bench.py (format: /work/notes/config-spec.md)\n"
    return header + yaml.dump(config, Dumper=Dumper, sort_keys=False)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- wrk

WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
WRK_BYTES = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    non2xx: int
    socket_errors: dict[str, int]
    latency_ms: dict[str, float]
    transfer_bytes_per_s: float | None = None

    @property
    def errors(self) -> int:
        return self.non2xx + sum(self.socket_errors.values())


def to_ms(number: str, unit: str) -> float:
    return float(number) * WRK_UNITS[unit]


def parse_wrk(text: str) -> WrkResult:
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not done or not rps:
        raise BenchError(f"cannot parse wrk output:\n{text}")
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    kinds = ("connect", "read", "write", "timeout")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)([KMGT]?B)\b", text)
    latency = {
        f"p{m.group(1)}": to_ms(m.group(2), m.group(3))
        for m in re.finditer(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.MULTILINE)
    }
    return WrkResult(
        requests=int(done.group(1)),
        seconds=to_ms(done.group(2), done.group(3)) / 1e3,
        rps=float(rps.group(1)),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors={k: int(sock.group(i)) if sock else 0 for i, k in enumerate(kinds, 1)},
        latency_ms=latency,
        transfer_bytes_per_s=(
            float(transfer.group(1)) * WRK_BYTES[transfer.group(2)] if transfer else None
        ),
    )


def run_wrk(
    wrk: str,
    port: int,
    connections: int,
    duration: int,
    timeout: str | None = None,
    scheme: str = "http",
) -> WrkResult:
    """One wrk run; `timeout` is wrk's --timeout (wrk's own default when None); `scheme`
    https for a TLS front (wrk does not check the certificate)."""
    argv = [wrk, "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    if timeout:
        argv.append(f"--timeout={timeout}")
    argv.append(f"{scheme}://127.0.0.1:{port}/")
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=duration + WRK_GRACE)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {duration + WRK_GRACE:.0f}s") from exc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise BenchError(f"wrk exited with status {proc.returncode}:\n{out}")
    return parse_wrk(out)


# --------------------------------------------------------------------------- TLS


def openssl_run(argv: list[str], what: str, **kw: Any) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, **kw)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"{what}: {exc}") from exc
    if done.returncode != 0:
        raise BenchError(
            f"{what}: {' '.join(argv)} exited with {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    return done


def make_tls_files(openssl: str, tmp: Path) -> TlsFiles:
    """A CA and a certificate it signs, both ECDSA P-256, made with the openssl CLI in
    TMP/tls: cert.pem (the certificate, then its key: what both proxies serve) and ca.pem."""
    d = tmp / "tls"
    d.mkdir(exist_ok=True)
    ext = write(
        d / "leaf.ext",
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = serverAuth\n"
        f"subjectAltName = DNS:{TLS_SERVER_NAME}, IP:127.0.0.1\n",
    )
    p256 = ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out"]
    serial = f"0x{int.from_bytes(os.urandom(8), 'big') >> 1:x}"
    for argv in (
        [*p256, d / "ca.key"],
        ["req", "-x509", "-new", "-key", d / "ca.key", "-sha256", "-days", "30",
         "-subj", "/CN=pylb bench CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", d / "ca.pem"],
        [*p256, d / "leaf.key"],
        ["req", "-new", "-key", d / "leaf.key", "-subj", f"/CN={TLS_SERVER_NAME}",
         "-out", d / "leaf.csr"],
        ["x509", "-req", "-in", d / "leaf.csr", "-CA", d / "ca.pem", "-CAkey", d / "ca.key",
         "-set_serial", serial, "-days", "30", "-sha256", "-extfile", ext,
         "-out", d / "leaf.pem"],
        ["verify", "-CAfile", d / "ca.pem", d / "leaf.pem"],
    ):
        openssl_run([openssl, *map(str, argv)], "making the --tls certificate")
    crt = write(d / "cert.pem", (d / "leaf.pem").read_text() + (d / "leaf.key").read_text())
    text = openssl_run(
        [openssl, "x509", "-in", str(d / "leaf.pem"), "-noout", "-text"], "reading it back"
    ).stdout
    if "prime256v1" not in text or "ecdsa-with-SHA256" not in text:
        raise BenchError(f"{d / 'leaf.pem'} is not an ECDSA P-256 certificate:\n{text}")
    return TlsFiles(
        crt=crt,
        ca=d / "ca.pem",
        description=(
            f"ECDSA P-256 (prime256v1) certificate CN={TLS_SERVER_NAME}, SAN "
            f"DNS:{TLS_SERVER_NAME} IP:127.0.0.1, ecdsa-with-SHA256, signed by a generated "
            f"P-256 CA; the proxies send the certificate alone (no chain); {crt}"
        ),
    )


def tls_client_context(files: TlsFiles) -> ssl.SSLContext:
    """A client context that verifies the proxies' certificate against the generated CA."""
    ctx = ssl.create_default_context(cafile=str(files.ca))
    ctx.set_alpn_protocols([TLS_ALPN])
    return ctx


def tls_probe(port: int, files: TlsFiles) -> dict[str, Any]:
    """One verified TLS connection with the request s_time sends (TLS_REQUEST): what was
    negotiated, the answer's status line and its size in bytes (every answer of a handshake
    measure should be as long)."""
    ctx = tls_client_context(files)
    data = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname=TLS_SERVER_NAME) as tls:
                tls.sendall(TLS_REQUEST)
                while chunk := tls.recv(65536):
                    data += chunk
                info = {
                    "version": tls.version(),
                    "cipher": (tls.cipher() or ("?",))[0],
                    "alpn": tls.selected_alpn_protocol(),
                }
    except (OSError, ssl.SSLError) as exc:
        raise BenchError(f"TLS probe of 127.0.0.1:{port} failed: {exc}") from exc
    status = data.split(b"\r\n", 1)[0].decode("latin-1")
    if not re.fullmatch(r"HTTP/1\.[01] 200 .*", status):
        raise BenchError(f"TLS probe of 127.0.0.1:{port}: answer {data[:200]!r}")
    return {**info, "status": status, "answer_bytes": len(data)}


def s_client_info(openssl: str, port: int, files: TlsFiles) -> dict[str, str]:
    """`openssl s_client -brief`: protocol, cipher suite, signature, key exchange group."""
    try:
        done = subprocess.run(
            [openssl, "s_client", "-brief", "-connect", f"127.0.0.1:{port}",
             "-servername", TLS_SERVER_NAME, "-CAfile", str(files.ca), "-verify_return_error",
             "-alpn", TLS_ALPN, "-ign_eof"],
            input=TLS_REQUEST.decode(), capture_output=True, text=True, timeout=15,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}
    info = dict(
        (m.group(1), m.group(2).strip())
        for m in re.finditer(r"^([A-Za-z ]+): (.*)$", done.stderr, re.MULTILINE)
        if m.group(1) in ("Protocol version", "Ciphersuite", "Signature type",
                          "Server Temp Key", "Verification")
    )
    if done.returncode != 0 or not info:
        info["error"] = f"s_client exited with {done.returncode}: {done.stderr.strip()[-200:]}"
    return info


@dataclass
class STimeResult:
    """What the openssl s_time clients of one handshake measure did, summed over them."""

    clients: int
    connections: int = 0  # connections made (each: a handshake, one request, its answer)
    resumed: int = 0  # of those, how many resumed a session (s_time prints `r` for them)
    bytes_read: int = 0  # answer bytes, all connections
    seconds: float = 0.0  # from the clients' start until the last exited (our clock)
    client_cpu_s: float = 0.0  # user + system of the clients (getrusage of reaped children)
    errors: list[str] = field(default_factory=list)

    @property
    def hps(self) -> float:
        return self.connections / self.seconds if self.seconds else 0.0


STIME_SUMMARY = re.compile(r"(\d+) connections in [\d.]+s; .*?bytes read (\d+)")
STIME_MARKS = re.compile(r"^[*rt32]+$", re.MULTILINE)


def parse_s_time(text: str) -> tuple[int, int, int]:
    """(connections, resumed, bytes read) of one s_time run. It prints one mark per
    connection, `r` when it resumed a session (SSL_session_reused), else its protocol
    (`*` for TLS 1.2 and 1.3), then `N connections in Ts; ..., bytes read B`."""
    done = STIME_SUMMARY.search(text)
    if not done:
        raise BenchError(f"cannot parse openssl s_time output:\n{text[-600:]}")
    marks = "".join(STIME_MARKS.findall(text))
    connections = int(done.group(1))
    if len(marks) != connections:
        raise BenchError(
            f"openssl s_time printed {len(marks)} marks for {connections} connections:\n"
            f"{text[-600:]}"
        )
    return connections, marks.count("r"), int(done.group(2))


def s_time_argv(openssl: str, port: int, measure: str, seconds: int, files: TlsFiles) -> list[str]:
    return [
        openssl, "s_time", "-connect", f"127.0.0.1:{port}", HANDSHAKE_MEASURES[measure],
        "-time", str(seconds), "-www", STIME_WWW, "-CAfile", str(files.ca),
    ]


def run_s_time(
    openssl: str, port: int, measure: str, duration: int, clients: int, files: TlsFiles
) -> STimeResult:
    """`clients` openssl s_time processes at once, for about `duration` seconds.

    s_time stops at the first whole second of the clock past `-time` seconds from its start:
    the clients start just after a second begins, with `-time duration-1` (at least 1), so
    they run about `duration` s (at least ~2 s). Each makes one connection at a time: with
    `-new` a new SSL object per connection, which offers no session (a full handshake);
    with `-reuse` one saved from its first (unmeasured) connection, renewed as new tickets
    come. Then TLS_REQUEST (GET / HTTP/1.0, Host), the whole answer, close."""
    seconds = max(1, duration - 1)
    res = STimeResult(clients=clients)
    outs: list[tuple[int, str]] = []
    with contextlib.ExitStack() as stack:
        files_out = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(clients)]
        procs: list[subprocess.Popen] = []

        def reap() -> None:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

        stack.callback(reap)
        time.sleep(1.02 - time.time() % 1)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        start_t = time.monotonic()
        for out in files_out:
            procs.append(subprocess.Popen(
                s_time_argv(openssl, port, measure, seconds, files),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            ))
        deadline = start_t + seconds + 1 + STIME_GRACE
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as exc:
                raise BenchError(
                    f"openssl s_time did not finish within {seconds + 1 + STIME_GRACE:.0f}s"
                ) from exc
        res.seconds = time.monotonic() - start_t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        for proc, out in zip(procs, files_out, strict=True):
            out.seek(0)
            outs.append((proc.returncode, out.read()))
    res.client_cpu_s = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    for rc, out in outs:
        try:
            n, resumed, nbytes = parse_s_time(out)
        except BenchError as exc:
            res.errors.append(f"status {rc}: {exc}")
            continue
        if rc != 0 or "ERROR" in out:
            res.errors.append(f"status {rc}: {out.strip()[-400:]}")
        res.connections += n
        res.resumed += resumed
        res.bytes_read += nbytes
    return res


def haproxy_ssl_counters(path: Path) -> dict[str, int] | None:
    """HAProxy's frontend `fe` SSL counters from `show stat`: ssl_sess (full handshakes)
    and ssl_reused_sess (resumed ones); None when they cannot be read."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        return None
    return parse_haproxy_ssl_counters(data.decode(errors="replace"))


def parse_haproxy_ssl_counters(text: str) -> dict[str, int] | None:
    """`show stat` CSV -> {"full": ssl_sess, "resumed": ssl_reused_sess} of frontend fe."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# "):
        return None
    cols = lines[0][2:].split(",")
    for line in lines[1:]:
        row = dict(zip(cols, line.split(","), strict=False))
        if row.get("pxname") == "fe" and row.get("svname") == "FRONTEND":
            try:
                return {"full": int(row["ssl_sess"]), "resumed": int(row["ssl_reused_sess"])}
            except (KeyError, ValueError):
                return None
    return None


# --------------------------------------------------------------------------- measuring


@dataclass
class TargetResult:
    target: str
    port: int
    wrk: WrkResult | None = None
    proxy_cpu_s: float | None = None
    backend_cpu_s: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    round: int = 1
    proxy_user_s: float | None = None
    proxy_sys_s: float | None = None
    size: int | None = None

    def per_request_us(self, cpu_s: float | None) -> float | None:
        if cpu_s is None or self.wrk is None or self.wrk.requests == 0:
            return None
        return cpu_s / self.wrk.requests * 1e6

    @property
    def proxy_us_per_req(self) -> float | None:
        return self.per_request_us(self.proxy_cpu_s)

    @property
    def proxy_user_us_per_req(self) -> float | None:
        return self.per_request_us(self.proxy_user_s)

    @property
    def proxy_sys_us_per_req(self) -> float | None:
        return self.per_request_us(self.proxy_sys_s)

    @property
    def backend_us_per_req(self) -> float | None:
        return self.per_request_us(self.backend_cpu_s)

    @property
    def proxy_cpu_pct(self) -> float | None:
        if self.proxy_cpu_s is None or self.wrk is None or self.wrk.seconds == 0:
            return None
        return self.proxy_cpu_s / self.wrk.seconds * 100

    @property
    def body_mib(self) -> float | None:
        """Response bodies moved in the measured run, in MiB (requests x size)."""
        if self.size is None or self.wrk is None:
            return None
        return self.wrk.requests * self.size / MIB

    @property
    def proxy_ms_per_mib(self) -> float | None:
        mib = self.body_mib
        if self.proxy_cpu_s is None or not mib:
            return None
        return self.proxy_cpu_s * 1000 / mib


def measure(
    target: str, port: int, opts: Options, tools: Tools, nginx: Managed, proxy: Managed | None
) -> TargetResult:
    """Warm up, then one measured wrk run with CPU samples of proxy and backend around it
    (over https with --tls, on its keep-alive connections)."""
    scheme = "https" if opts.tls else "http"
    if opts.warmup:
        run_wrk(tools.wrk, port, opts.connections, opts.warmup, opts.wrk_timeout, scheme)
    procs_before = tree_process_cpu(proxy.pid) if proxy else {}
    proxy_before = proxy.cpu_times() if proxy else None
    nginx_before = nginx.cpu_seconds()
    result = run_wrk(tools.wrk, port, opts.connections, opts.duration, opts.wrk_timeout, scheme)
    nginx_after = nginx.cpu_seconds()
    proxy_after = proxy.cpu_times() if proxy else None
    procs_after = tree_process_cpu(proxy.pid) if proxy else {}
    res = TargetResult(
        target, port, wrk=result, backend_cpu_s=nginx_after - nginx_before, size=opts.size
    )
    if proxy is not None and proxy_before is not None and proxy_after is not None:
        res.proxy_user_s = proxy_after[0] - proxy_before[0]
        res.proxy_sys_s = proxy_after[1] - proxy_before[1]
        res.proxy_cpu_s = res.proxy_user_s + res.proxy_sys_s
        res.extra["proxy_processes"] = 1 + len(psutil.Process(proxy.pid).children(recursive=True))
        # each process's own CPU (children's not included), for the processes seen both times
        res.extra["process_cpu_s"] = {
            f"{pid} {title}": cpu - procs_before[pid][1]
            for pid, (title, cpu) in procs_after.items()
            if pid in procs_before
        }
    return res


@dataclass
class HandshakeResult:
    """One handshake measure (--tls) of one proxy in one round."""

    target: str
    measure: str  # full or resumed
    round: int
    port: int
    load: STimeResult | None = None
    proxy_user_s: float | None = None
    proxy_sys_s: float | None = None
    backend_cpu_s: float | None = None
    answer_bytes: int | None = None  # one good answer's size (the probe's)
    server_counts: dict[str, int] | None = None  # HAProxy's own: full and resumed sessions
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def proxy_cpu_s(self) -> float | None:
        if self.proxy_user_s is None or self.proxy_sys_s is None:
            return None
        return self.proxy_user_s + self.proxy_sys_s

    def per_handshake_us(self, cpu_s: float | None) -> float | None:
        if cpu_s is None or self.load is None or not self.load.connections:
            return None
        return cpu_s / self.load.connections * 1e6

    @property
    def per_core(self) -> float | None:
        """Handshakes per CPU-second of the proxy's process tree."""
        cpu = self.proxy_cpu_s
        if not cpu or self.load is None:
            return None
        return self.load.connections / cpu

    @property
    def bytes_off(self) -> int | None:
        """Answer bytes the clients read beyond (or short of) handshakes x one good answer."""
        if self.load is None or self.answer_bytes is None:
            return None
        return self.load.bytes_read - self.load.connections * self.answer_bytes


def measure_handshakes(
    target: str,
    measure: str,
    port: int,
    opts: Options,
    tools: Tools,
    nginx: Managed,
    proxy: Managed,
    rnd: int,
) -> HandshakeResult:
    """One handshake measure: s_time clients, CPU samples of proxy and nginx around them."""
    assert tools.openssl is not None
    files = tls_files_of(opts)
    res = HandshakeResult(target, measure, rnd, port)
    res.answer_bytes = tls_probe(port, files)["answer_bytes"]
    stats_path = haproxy_stats_path(files) if target == "haproxy" else None
    counts_before = haproxy_ssl_counters(stats_path) if stats_path else None
    procs_before = tree_process_cpu(proxy.pid)
    proxy_before = proxy.cpu_times()
    nginx_before = nginx.cpu_seconds()
    res.load = run_s_time(
        tools.openssl, port, measure, opts.duration, opts.tls_clients, files
    )
    nginx_after = nginx.cpu_seconds()
    proxy_after = proxy.cpu_times()
    procs_after = tree_process_cpu(proxy.pid)
    counts_after = haproxy_ssl_counters(stats_path) if stats_path else None
    res.proxy_user_s = proxy_after[0] - proxy_before[0]
    res.proxy_sys_s = proxy_after[1] - proxy_before[1]
    res.backend_cpu_s = nginx_after - nginx_before
    res.extra["process_cpu_s"] = {
        f"{pid} {title}": cpu - procs_before[pid][1]
        for pid, (title, cpu) in procs_after.items()
        if pid in procs_before
    }
    if counts_before is not None and counts_after is not None:
        res.server_counts = {k: counts_after[k] - counts_before[k] for k in counts_after}
    if res.load.errors:
        res.error = f"openssl s_time: {res.load.errors[0]}"
    elif not proxy.alive():
        res.error = f"{proxy.name} exited during the run; log {proxy.log_path}"
    return res


def start_nginx(
    stack: contextlib.ExitStack, tools: Tools, tmp: Path, ports: Ports, size: int | None = None
) -> Managed:
    if size is not None:
        # nginx's worker runs as an unprivileged user when we are root: let it reach the file
        tmp.chmod(tmp.stat().st_mode | 0o111)
        (tmp / "www").mkdir(mode=0o755, exist_ok=True)
        (tmp / "www" / "body.bin").write_bytes(body_bytes(size))
        (tmp / "www" / "body.bin").chmod(0o644)
    conf = write(tmp / "nginx.conf", nginx_config(tmp, ports.nginx, size))
    argv = [
        tools.nginx,
        "-p",
        str(tmp),
        "-e",
        str(tmp / "nginx-error.log"),
        "-c",
        str(conf),
        "-g",
        "daemon off;",
    ]
    nginx = start(stack, "nginx", argv, tmp)
    wait_ready(nginx, list(ports.nginx), body=body_bytes(size))
    return nginx


def ready_tls(opts: Options) -> ssl.SSLContext | None:
    """The client context of the readiness check: None without --tls."""
    return tls_client_context(tls_files_of(opts)) if opts.tls else None


def start_haproxy(
    stack: contextlib.ExitStack, opts: Options, tools: Tools, tmp: Path, ports: Ports
) -> Managed:
    assert tools.haproxy is not None
    cfg = write(tmp / "haproxy.cfg", haproxy_config(opts, ports.haproxy, ports.nginx))
    check = subprocess.run(
        [tools.haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30
    )
    if check.returncode != 0:
        raise BenchError(f"haproxy -c rejected {cfg}:\n{check.stdout}{check.stderr}")
    proxy = start(stack, "haproxy", [tools.haproxy, "-f", str(cfg), "-db"], tmp, append=True)
    wait_ready(proxy, [ports.haproxy], body=body_bytes(opts.size), tls=ready_tls(opts))
    return proxy


def pylb_env() -> dict[str, str]:
    """Environment for bin/pylb: this interpreter's bin dir first on PATH (the venv)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def pylb_launch(target: str, opts: Options) -> tuple[str, Path, dict[str, str]]:
    """(program, cwd, env) of a pylb target.

    `pylb` is this checkout's bin/pylb, run from the repository as before. `pylb@LABEL` is
    DIR/bin/pylb, which puts DIR first on its own sys.path; its template and workers are
    `python -m lb.template` / `lb.worker`, which import from the cwd first, then PYTHONPATH:
    both are DIR, so every process of the variant runs DIR's lb package.
    """
    if target == "pylb":
        return str(PYLB_BIN), REPO, pylb_env()
    tree = next(t for t in opts.pylb_trees if t.target == target)
    env = pylb_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree.root), env.get("PYTHONPATH")]))
    env.update(tree.env)
    return str(tree.root / "bin" / "pylb"), tree.root, env


def start_pylb_target(
    stack: contextlib.ExitStack,
    opts: Options,
    tmp: Path,
    target: str,
    port: int,
    backends: tuple[int, ...],
) -> Managed:
    program, cwd, env = pylb_launch(target, opts)
    cfg = write(tmp / f"{target}.yaml", pylb_yaml(pylb_config(opts, port, backends)))
    check = subprocess.run(
        [program, "-c", "-f", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        env=env,
    )
    if check.returncode != 0:
        raise BenchError(f"{target} -c rejected {cfg}:\n{check.stdout}{check.stderr}")
    proxy = start(stack, target, [program, "-f", str(cfg)], tmp, cwd=cwd, env=env, append=True)
    wait_ready(proxy, [port], body=body_bytes(opts.size), tls=ready_tls(opts))
    return proxy


def start_pylb(
    stack: contextlib.ExitStack, opts: Options, tools: Tools, tmp: Path, ports: Ports
) -> Managed:
    assert tools.pylb is not None
    return start_pylb_target(stack, opts, tmp, "pylb", ports.pylb, ports.nginx)


def lb_import_path(target: str, opts: Options) -> str:
    """lb.__file__ as a process started like the target's template and workers sees it,
    and how its hot path runs (compiled or pure Python, lb.compiled)."""
    _, cwd, env = pylb_launch(target, opts)
    code = (
        "import lb\n"
        "try:\n"
        "    from lb import compiled\n"
        "    how = compiled.status()\n"
        "except ImportError:\n"
        "    how = 'pure Python (no lb.compiled)'\n"
        "print(f'{lb.__file__}; hot path {how}')\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=cwd,
            env=env,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return done.stdout.strip() or f"unknown ({done.stderr.strip()[-200:]})"


LB_FRAME = re.compile(r"\((/[^():]*?)/lb/[^/():]+\.py:\d+\)")


def running_lb_roots(pyspy: str | None, pid: int, workers: int) -> dict[str, Any]:
    """Which lb package the processes of a running pylb execute, from `py-spy dump`.

    Waits (up to 10 s) for `workers` workers first: pylb answers as soon as one accepts.
    Returns {"roots": [directories holding the lb/ of the frames seen], "processes": [titles
    of the processes dumped], "error": None or why not}.
    """
    if pyspy is None:
        return {"roots": [], "processes": [], "error": "not checked (no py-spy)"}
    deadline = time.monotonic() + 10
    while len(pylb_workers(pid)) < workers and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {"roots": [], "processes": [], "error": "pylb exited"}
    roots: set[str] = set()
    titles: list[str] = []
    errors: list[str] = []
    for proc in procs:
        try:
            title = " ".join(" ".join(proc.cmdline()).split()) or proc.name()
            done = subprocess.run(
                [pyspy, "dump", "--full-filenames", "--nonblocking", "--pid", str(proc.pid)],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except psutil.NoSuchProcess:
            continue  # a short-lived process (a fork on its way to becoming a worker)
        except (psutil.Error, OSError, subprocess.TimeoutExpired) as exc:
            errors.append(f"{proc.pid}: {exc}")
            continue
        found = set(LB_FRAME.findall(done.stdout))
        if done.returncode != 0 and not proc.is_running():
            continue  # a short-lived process (a fork on its way to becoming a worker)
        if done.returncode != 0 or not found:
            errors.append(f"{proc.pid}: {(done.stderr or done.stdout).strip()[-200:]}")
            continue
        roots |= found
        titles.append(title)
    return {
        "roots": sorted(roots),
        "processes": titles,
        "error": "; ".join(errors) or None,
    }


def run_target(
    target: str,
    opts: Options,
    tools: Tools,
    tmp: Path,
    ports: Ports,
    port: int,
    nginx: Managed,
    rnd: int,
    check_lb: bool = False,
) -> TargetResult:
    """Start the proxy for `target` (none for direct), measure, stop it again."""
    print(
        f"bench: round {rnd}/{opts.rounds}: {target}: wrk -c{opts.connections} "
        f"-d{opts.duration}s -> 127.0.0.1:{port}",
        file=sys.stderr,
        flush=True,
    )
    try:
        with contextlib.ExitStack() as stack:
            proxy = None
            lb_check = None
            if target == "haproxy":
                proxy = start_haproxy(stack, opts, tools, tmp, ports)
            elif is_pylb(target):
                proxy = start_pylb_target(stack, opts, tmp, target, port, ports.nginx)
                if check_lb:
                    lb_check = running_lb_roots(tools.pyspy, proxy.pid, opts.workers)
            res = measure(target, port, opts, tools, nginx, proxy)
            if lb_check is not None:
                res.extra["lb_running"] = lb_check
    except BenchError as exc:
        log(f"round {rnd}/{opts.rounds}: {target}: FAILED: {exc}")
        return TargetResult(target, port, error=str(exc).splitlines()[0], round=rnd)
    res.round = rnd
    assert res.wrk is not None
    cpu = f", {res.proxy_us_per_req:.1f} us/req" if res.proxy_us_per_req is not None else ""
    log(f"round {rnd}/{opts.rounds}: {target}: {res.wrk.rps:.0f} req/s{cpu}")
    return res


def handshake_line(r: HandshakeResult) -> str:
    assert r.load is not None
    cpu = r.per_handshake_us(r.proxy_cpu_s)
    text = f"{r.load.hps:.0f} handshakes/s ({r.load.connections} in {r.load.seconds:.1f}s"
    text += f", {r.load.resumed} resumed)"
    if cpu is not None:
        text += f", {cpu:.1f} us/handshake"
    if r.server_counts is not None:
        text += f"; haproxy counted {r.server_counts['full']} full, "
        text += f"{r.server_counts['resumed']} resumed"
    return text


def run_target_tls(
    target: str,
    opts: Options,
    tools: Tools,
    tmp: Path,
    ports: Ports,
    port: int,
    nginx: Managed,
    rnd: int,
    check_lb: bool = False,
) -> tuple[TargetResult | None, list[HandshakeResult], dict[str, Any]]:
    """--tls: start the proxy, run its measures in order (keepalive, full, resumed), stop it.

    Returns the keep-alive result (None when not measured), the handshake results, and in
    round 1 what the proxy negotiates (`probe`, `s_client`) and which lb runs (pylb)."""
    files = tls_files_of(opts)
    hs_measures = [m for m in opts.tls_measures if m in HANDSHAKE_MEASURES]
    log(
        f"round {rnd}/{opts.rounds}: {target}: TLS {', '.join(opts.tls_measures)} "
        f"-> 127.0.0.1:{port}"
    )
    keepalive: TargetResult | None = None
    handshakes: list[HandshakeResult] = []
    info: dict[str, Any] = {}
    try:
        with contextlib.ExitStack() as stack:
            if target == "haproxy":
                proxy = start_haproxy(stack, opts, tools, tmp, ports)
            else:
                proxy = start_pylb_target(stack, opts, tmp, target, port, ports.nginx)
                if check_lb:
                    info["lb_running"] = running_lb_roots(tools.pyspy, proxy.pid, opts.workers)
            if rnd == 1:
                assert tools.openssl is not None
                info["s_client"] = s_client_info(tools.openssl, port, files)
                try:
                    info["probe"] = tls_probe(port, files)
                except BenchError as exc:  # the measures will fail on it too, and say why
                    info["probe"] = {"error": str(exc)}
                    log(f"round {rnd}/{opts.rounds}: {target}: {exc}")
            for m in opts.tls_measures:
                if m == "keepalive":
                    try:
                        keepalive = measure(target, port, opts, tools, nginx, proxy)
                    except BenchError as exc:
                        log(f"round {rnd}/{opts.rounds}: {target}: keepalive: FAILED: {exc}")
                        keepalive = TargetResult(target, port, error=str(exc).splitlines()[0])
                    keepalive.round = rnd
                    if keepalive.wrk is not None:
                        cpu = keepalive.proxy_us_per_req
                        log(
                            f"round {rnd}/{opts.rounds}: {target}: keepalive: "
                            f"{keepalive.wrk.rps:.0f} req/s"
                            + (f", {cpu:.1f} us/req" if cpu is not None else "")
                        )
                    continue
                if keepalive is None and not handshakes and opts.warmup:
                    run_wrk(tools.wrk, port, opts.connections, opts.warmup, opts.wrk_timeout,
                            "https")
                try:
                    r = measure_handshakes(target, m, port, opts, tools, nginx, proxy, rnd)
                except BenchError as exc:
                    r = HandshakeResult(target, m, rnd, port, error=str(exc).splitlines()[0])
                handshakes.append(r)
                if r.error:
                    log(f"round {rnd}/{opts.rounds}: {target}: {m}: FAILED: {r.error}")
                else:
                    log(f"round {rnd}/{opts.rounds}: {target}: {m}: {handshake_line(r)}")
    except BenchError as exc:
        log(f"round {rnd}/{opts.rounds}: {target}: FAILED: {exc}")
        error = str(exc).splitlines()[0]
        if "keepalive" in opts.tls_measures and keepalive is None:
            keepalive = TargetResult(target, port, error=error, round=rnd)
        done = {r.measure for r in handshakes}
        handshakes += [
            HandshakeResult(target, m, rnd, port, error=error) for m in hs_measures if m not in done
        ]
    return keepalive, handshakes, info


# --------------------------------------------------------------------------- profile

PROCESS_FRAME = re.compile(r'process (\d+):"(.*)"', re.DOTALL)
RAW_FRAMES = re.compile(r'process \d+:"[^"]*"|[^;]+')
CODE_FRAME = re.compile(r"(?P<func>.*) \((?P<file>.*?)(?::\d+)?\)", re.DOTALL)
NO_FRAME = "(no Python frame)"


def parse_raw_stack(line: str) -> tuple[list[str], int] | None:
    """One line of py-spy's raw (collapsed) output: `frame;frame;... COUNT`, root first."""
    stack, sep, count = line.rstrip("\r\n").rpartition(" ")
    if not sep or not count.isdigit() or not stack:
        return None
    return RAW_FRAMES.findall(stack), int(count)


def function_key(frame: str) -> str:
    """`func (file:line)` -> `func (file)`: samples are aggregated by function and file."""
    m = CODE_FRAME.fullmatch(frame)
    return f"{m.group('func')} ({m.group('file')})" if m else frame


@dataclass
class StackProfile:
    samples: int = 0
    self_samples: Counter = field(default_factory=Counter)
    total_samples: Counter = field(default_factory=Counter)
    processes: Counter = field(default_factory=Counter)  # (pid, title) -> samples


def aggregate_raw(
    lines: Iterable[str], keep: Callable[[int, str], bool] | None = None
) -> StackProfile:
    """Aggregate py-spy raw output by function (self = last frame; total = inclusive).

    With --subprocesses every stack starts with `process PID:"cmdline"` frames (the
    process's ancestors first); the innermost one is the process sampled, and only stacks
    whose process `keep(pid, title)` accepts are counted (all of them without `keep`).
    """
    prof = StackProfile()
    for line in lines:
        parsed = parse_raw_stack(line)
        if parsed is None:
            continue
        frames, count = parsed
        proc: tuple[int, str] | None = None
        code: list[str] = []
        for frame in frames:
            m = PROCESS_FRAME.fullmatch(frame)
            if m:
                proc, code = (int(m.group(1)), m.group(2)), []
            else:
                code.append(frame)
        if keep is not None and (proc is None or not keep(*proc)):
            continue
        prof.samples += count
        if proc is not None:
            prof.processes[proc] += count
        keys = [function_key(f) for f in code]
        prof.self_samples[keys[-1] if keys else NO_FRAME] += count
        for key in set(keys):
            prof.total_samples[key] += count
    return prof


def format_profile(
    prof: StackProfile, top_self: int = PROFILE_TOP_SELF, top_total: int = PROFILE_TOP_TOTAL
) -> str:
    if not prof.samples:
        return "no samples"

    def pct(n: int) -> str:
        return f"{n * 100 / prof.samples:6.1f}"

    lines = [f"top {top_self} functions by self samples (% of {prof.samples} worker samples)"]
    lines.append("self %  total %  function (file)")
    for key, n in prof.self_samples.most_common(top_self):
        lines.append(f"{pct(n)}   {pct(prof.total_samples.get(key, 0))}  {key}")
    lines.append("")
    ranked = prof.total_samples.most_common()
    common = [k for k, n in ranked if n >= PROFILE_COMMON * prof.samples]
    lines.append(
        f"top {top_total} functions by total (inclusive) samples, leaving out the "
        f"{len(common)} on >= {PROFILE_COMMON:.0%} of the stacks"
    )
    lines.append("total %  self %  function (file)")
    for key, n in [(k, n) for k, n in ranked if k not in common][:top_total]:
        lines.append(f" {pct(n)}  {pct(prof.self_samples.get(key, 0))}  {key}")
    if common:
        lines.append(f"on >= {PROFILE_COMMON:.0%} of the stacks: " + "; ".join(common))
    return "\n".join(lines)


def file_of(key: str) -> str:
    """`func (file)` -> the file, or for a shared library (native frames) its base name."""
    m = CODE_FRAME.fullmatch(key)
    if not m:
        return key
    name = m.group("file")
    return os.path.basename(name) if ".so" in name else name


WAIT_FUNCTIONS = ("epoll_wait", "epoll_pwait", "epoll_pwait2")


def format_by_file(prof: StackProfile, top: int = PROFILE_TOP_TOTAL) -> str:
    """Self samples summed by file (with --native: by library, e.g. libcrypto.so.3). Native
    stacks that end in the event loop's epoll wait are left out and counted apart: py-spy
    takes them for busy when the worker was woken but has not run yet."""
    by_file: Counter = Counter()
    waiting = 0
    for key, n in prof.self_samples.items():
        if key.split(" (", 1)[0] in WAIT_FUNCTIONS:
            waiting += n
        else:
            by_file[file_of(key)] += n
    busy = prof.samples - waiting
    lines = [f"top {top} files by self samples (% of {busy} worker samples"]
    lines[0] += f"; {waiting} more in {'/'.join(WAIT_FUNCTIONS[:2])} left out)" if waiting else ")"
    lines.append("self %  file")
    for name, n in by_file.most_common(top):
        lines.append(f"{n * 100 / max(busy, 1):6.1f}  {name}")
    return "\n".join(lines)


def is_worker_title(title: str) -> bool:
    return title.startswith("pylb: worker") and "template" not in title


def pylb_workers(pid: int) -> dict[int, str]:
    """pid -> title of the workers below a pylb master (the template is not a worker)."""
    out: dict[int, str] = {}
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            title = " ".join(proc.cmdline())
            if is_worker_title(title):
                out[proc.pid] = title
    return out


@dataclass
class ProfileResult:
    path: Path
    target: str
    error: str | None = None
    wrk: WrkResult | None = None
    workers: dict[int, str] = field(default_factory=dict)
    pyspy_summary: str = ""
    all_samples: int = 0
    prof: StackProfile | None = None
    load: STimeResult | None = None  # --tls with a handshake load: the s_time clients
    load_name: str = "keepalive"


def wait_for_log(proc: Managed, needle: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if needle in proc.log_path.read_text(errors="replace"):
                return
        if not proc.alive():
            raise BenchError(
                f"{proc.name} exited with status {proc.proc.returncode}; "
                f"log {proc.log_path}:\n{proc.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise BenchError(f"{proc.name}: no {needle!r} after {timeout:.0f}s:\n{proc.log_tail()}")
        time.sleep(0.05)


def pyspy_mode(opts: Options) -> list[str]:
    """py-spy samples without stopping the process, or with --profile-native (which needs
    to stop it) C frames too."""
    return ["--native"] if opts.profile_native else ["--nonblocking"]


def profile_load_text(opts: Options) -> str:
    if opts.tls and opts.tls_profile in HANDSHAKE_MEASURES:
        return (
            f"{opts.tls_profile} handshakes ({opts.tls_clients} x openssl s_time "
            f"{HANDSHAKE_MEASURES[opts.tls_profile]}, ~{opts.duration}s)"
        )
    return f"wrk -c{opts.connections} -d{opts.duration}s" + (" https" if opts.tls else "")


def profile_run(
    opts: Options, tools: Tools, tmp: Path, ports: Ports, port: int, nginx: Managed
) -> ProfileResult:
    """One unmeasured pylb run with py-spy recording the master's whole tree."""
    assert opts.profile is not None and opts.profile_target is not None and tools.pyspy
    target = opts.profile_target
    res = ProfileResult(path=opts.profile, target=target)
    res.load_name = opts.tls_profile if opts.tls else "keepalive"
    scheme = "https" if opts.tls else "http"
    argv = [
        tools.pyspy,
        "record",
        "--format",
        "raw",
        "--rate",
        str(PROFILE_RATE),
        "--subprocesses",
        *pyspy_mode(opts),
        "-o",
        str(opts.profile),
    ]
    log(f"profile: {target}: {profile_load_text(opts)} under py-spy (unmeasured)")
    try:
        with contextlib.ExitStack() as stack:
            proxy = start_pylb_target(stack, opts, tmp, target, port, ports.nginx)
            if opts.warmup:
                run_wrk(tools.wrk, port, opts.connections, opts.warmup, opts.wrk_timeout, scheme)
            res.workers = pylb_workers(proxy.pid)
            if not res.workers:
                raise BenchError(f"no pylb worker found below pid {proxy.pid}")
            with contextlib.suppress(FileNotFoundError):
                opts.profile.unlink()
            spy = start(stack, "py-spy", [*argv, "--pid", str(proxy.pid)], tmp)
            try:
                wait_for_log(spy, "Sampling process", PYSPY_START_TIMEOUT)
            except BenchError as exc:
                raise BenchError(
                    f"py-spy did not start sampling (it needs ptrace: root or CAP_SYS_PTRACE, "
                    f"see kernel.yama.ptrace_scope): {exc}"
                ) from exc
            time.sleep(0.5)  # let py-spy find the subprocesses before the load starts
            if res.load_name in HANDSHAKE_MEASURES:
                assert tools.openssl is not None
                res.load = run_s_time(
                    tools.openssl, port, res.load_name, opts.duration, opts.tls_clients,
                    tls_files_of(opts),
                )
                if res.load.errors:
                    raise BenchError(f"openssl s_time: {res.load.errors[0]}")
            else:
                res.wrk = run_wrk(
                    tools.wrk, port, opts.connections, opts.duration, opts.wrk_timeout, scheme
                )
            res.workers.update(pylb_workers(proxy.pid))
            spy.proc.send_signal(signal.SIGINT)
            try:
                spy.proc.wait(PYSPY_STOP_TIMEOUT)
            except subprocess.TimeoutExpired as exc:
                raise BenchError(f"py-spy did not stop within {PYSPY_STOP_TIMEOUT:.0f}s") from exc
            res.pyspy_summary = next(
                (ln for ln in spy.log_tail(40).splitlines() if "Samples:" in ln), ""
            ).removeprefix("py-spy> ")
            if not opts.profile.is_file():
                raise BenchError(
                    f"py-spy wrote no {opts.profile} (status {spy.proc.returncode}):\n"
                    f"{spy.log_tail()}"
                )
    except (BenchError, OSError) as exc:
        log(f"profile: FAILED: {exc}")
        res.error = str(exc).splitlines()[0]
        return res
    lines = opts.profile.read_text(errors="replace").splitlines()
    res.all_samples = aggregate_raw(lines).samples

    def keep(pid: int, title: str) -> bool:
        return pid in res.workers or is_worker_title(title)

    res.prof = aggregate_raw(lines, keep)
    if not res.prof.samples:
        res.error = f"py-spy recorded no worker samples ({res.all_samples} samples in all)"
        log(f"profile: FAILED: {res.error}")
    return res


# --------------------------------------------------------------------------- running


@dataclass
class Run:
    results: list[TargetResult] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    profile: ProfileResult | None = None
    handshakes: list[HandshakeResult] = field(default_factory=list)  # --tls
    tls_info: dict[str, dict[str, Any]] = field(default_factory=dict)  # --tls: target -> info


def run_all(opts: Options, tools: Tools, tmp: Path) -> Run:
    ports, port_of = pick_target_ports(opts.targets)
    run = Run(ports=port_of)
    with contextlib.ExitStack() as stack:
        nginx = start_nginx(stack, tools, tmp, ports, opts.size)
        for rnd in range(1, opts.rounds + 1):
            for target in opts.targets:
                if opts.tls:
                    keepalive, handshakes, info = run_target_tls(
                        target, opts, tools, tmp, ports, port_of[target], nginx, rnd, rnd == 1
                    )
                    if keepalive is not None:
                        run.results.append(keepalive)
                    run.handshakes += handshakes
                    if info:
                        run.tls_info[target] = info
                    continue
                run.results.append(
                    run_target(
                        target, opts, tools, tmp, ports, port_of[target], nginx, rnd, rnd == 1
                    )
                )
        if opts.profile is not None and opts.profile_target is not None:
            target = opts.profile_target
            run.profile = profile_run(opts, tools, tmp, ports, port_of[target], nginx)
    return run


# --------------------------------------------------------------------------- figures

# key, label, format, how the rounds combine ("median" or "sum"), needs --size
FIGURES: tuple[tuple[str, str, str, str, bool], ...] = (
    ("rps", "req/s", ".0f", "median", False),
    ("cpu_us", "CPU us/req", ".1f", "median", False),
    ("user_us", "  user us/req", ".1f", "median", False),
    ("sys_us", "  system us/req", ".1f", "median", False),
    ("cpu_pct", "CPU %", ".0f", "median", False),
    ("worker_max_pct", "busiest worker %", ".0f", "median", False),
    ("cpu_ms_per_mb", "CPU ms/MB", ".3f", "median", True),
    ("mb_per_s", "body MB/s", ".0f", "median", True),
    ("nginx_us", "nginx us/req", ".1f", "median", False),
    ("p50_ms", "p50 ms", ".2f", "median", False),
    ("p99_ms", "p99 ms", ".2f", "median", False),
    ("non2xx", "non-2xx (sum)", "d", "sum", False),
    ("sock_err", "sock err (sum)", "d", "sum", False),
)


def figures_of(r: TargetResult) -> dict[str, float]:
    """The figures of one measured run (empty when it failed)."""
    if r.wrk is None:
        return {}
    f: dict[str, float | None] = {
        "rps": r.wrk.rps,
        "cpu_us": r.proxy_us_per_req,
        "user_us": r.proxy_user_us_per_req,
        "sys_us": r.proxy_sys_us_per_req,
        "cpu_pct": r.proxy_cpu_pct,
        "cpu_ms_per_mb": r.proxy_ms_per_mib,
        "mb_per_s": r.wrk.rps * r.size / MIB if r.size is not None else None,
        "nginx_us": r.backend_us_per_req,
        "p50_ms": r.wrk.latency_ms.get("p50"),
        "p99_ms": r.wrk.latency_ms.get("p99"),
        "non2xx": r.wrk.non2xx,
        "sock_err": sum(r.wrk.socket_errors.values()),
    }
    f["worker_max_pct"] = busiest_worker_share(r.extra.get("process_cpu_s", {}))
    return {k: v for k, v in f.items() if v is not None}


def busiest_worker_share(process_cpu: dict[str, float]) -> float | None:
    """The busiest pylb worker's share (%) of all workers' CPU; None without 2 workers."""
    workers = [
        cpu for name, cpu in process_cpu.items() if is_worker_title(name.partition(" ")[2])
    ]
    if len(workers) < 2 or sum(workers) <= 0:
        return None
    return max(workers) / sum(workers) * 100


def median_range(values: list[float]) -> tuple[float, float, float] | None:
    """(median, min, max), or None without values."""
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def spread(values: list[float], spec: str) -> str:
    """`median (min–max)`, or the value alone when the range collapses at that precision."""
    got = median_range(values)
    if got is None:
        return "-"
    med, low, high = (format(v, spec) for v in got)
    return med if low == high else f"{med} ({low}–{high})"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def pair_ratio(by: dict[str, dict[str, float]], a: str, b: str, key: str) -> float | None:
    """Target `a`'s figure `key` over target `b`'s, in one round (None if either lacks it)."""
    return ratio(by.get(a, {}).get(key), by.get(b, {}).get(key))


def paired_ratios(
    by: dict[str, dict[str, float]], targets: tuple[str, ...],
    vs_haproxy: list[tuple[str, str]], vs_pylb: list[tuple[str, str]],
) -> dict[str, float | None]:
    """Ratios of one round's paired runs: each pylb over HAProxy (`vs_haproxy`), and this
    checkout's pylb over every other pylb target (`vs_pylb`), as (label, figure) pairs; a
    key for every pair whose targets were selected."""
    out: dict[str, float | None] = {}
    pylbs = [t for t in targets if is_pylb(t)]
    if "haproxy" in targets:
        for p in pylbs:
            for label, key in vs_haproxy:
                out[f"{p}/haproxy {label}"] = pair_ratio(by, p, "haproxy", key)
    if "pylb" in targets:
        for v in pylbs:
            if v != "pylb":
                for label, key in vs_pylb:
                    out[f"pylb/{v} {label}"] = pair_ratio(by, "pylb", v, key)
    return out


def round_ratios(
    by: dict[str, dict[str, float]], targets: tuple[str, ...], size: bool
) -> dict[str, float | None]:
    """Ratios of one round's paired runs (paired_ratios), and each proxy over direct."""
    vs_haproxy = [("cpu_per_request", "cpu_us"), ("user", "user_us"), ("rps", "rps")]
    if size:
        vs_haproxy.append(("cpu_ms_per_MB", "cpu_ms_per_mb"))
    out = paired_ratios(by, targets, vs_haproxy,
                        [("cpu_per_request", "cpu_us"), ("rps", "rps")])
    if "direct" in targets:
        for p in [*(t for t in targets if is_pylb(t)), "haproxy"]:
            if p in targets:
                out[f"{p}/direct rps"] = pair_ratio(by, p, "direct", "rps")
    return out


@dataclass
class Summary:
    figures: dict[str, dict[str, dict[str, Any]]]  # target -> figure -> stats
    ratios_by_round: list[dict[str, float | None]]
    ratios: dict[str, dict[str, Any]]  # name -> stats


def stats(values: list[float | None], how: str = "median") -> dict[str, Any]:
    got = [v for v in values if v is not None]
    if how == "sum":
        return {"sum": sum(got), "values": values}
    mr = median_range(got)
    med, low, high = mr if mr else (None, None, None)
    return {"median": med, "min": low, "max": high, "values": values}


def summarize(opts: Options, results: list[TargetResult]) -> Summary:
    figures: dict[str, dict[str, dict[str, Any]]] = {}
    for target in opts.targets:
        runs = [figures_of(r) for r in results if r.target == target]
        figures[target] = {
            key: stats([f.get(key) for f in runs], how)
            for key, _, _, how, _ in FIGURES
            if any(key in f for f in runs)
        }
    by_round: list[dict[str, float | None]] = []
    for rnd in range(1, opts.rounds + 1):
        by = {r.target: figures_of(r) for r in results if r.round == rnd}
        by_round.append(round_ratios(by, opts.targets, opts.size is not None))
    names = list(by_round[0]) if by_round else []
    ratios = {name: stats([rr.get(name) for rr in by_round]) for name in names}
    return Summary(figures, by_round, ratios)


# --------------------------------------------------------------------------- handshakes (--tls)

# key, label, format, how the rounds combine
HS_FIGURES: tuple[tuple[str, str, str, str], ...] = (
    ("hps", "handshakes/s", ".0f", "median"),
    ("per_core", "handshakes/s per core", ".0f", "median"),
    ("cpu_us", "CPU us/handshake", ".1f", "median"),
    ("user_us", "  user us/handshake", ".1f", "median"),
    ("sys_us", "  system us/handshake", ".1f", "median"),
    ("cpu_pct", "CPU %", ".0f", "median"),
    ("worker_max_pct", "busiest worker %", ".0f", "median"),
    ("nginx_us", "nginx us/handshake", ".1f", "median"),
    ("client_us", "clients us/handshake", ".1f", "median"),
    ("handshakes", "handshakes (sum)", "d", "sum"),
    ("resumed", "resumed, s_time's count (sum)", "d", "sum"),
    ("server_full", "full, haproxy's count (sum)", "d", "sum"),
    ("server_resumed", "resumed, haproxy's count (sum)", "d", "sum"),
    ("bytes_off", "answer bytes off (sum)", "d", "sum"),
)


def hs_figures_of(r: HandshakeResult) -> dict[str, float]:
    """The figures of one handshake measure (empty when it failed)."""
    if r.error or r.load is None or not r.load.connections:
        return {}
    load = r.load
    cpu = r.proxy_cpu_s
    f: dict[str, float | None] = {
        "hps": load.hps,
        "per_core": r.per_core,
        "cpu_us": r.per_handshake_us(cpu),
        "user_us": r.per_handshake_us(r.proxy_user_s),
        "sys_us": r.per_handshake_us(r.proxy_sys_s),
        "cpu_pct": cpu / load.seconds * 100 if cpu is not None and load.seconds else None,
        "worker_max_pct": busiest_worker_share(r.extra.get("process_cpu_s", {})),
        "nginx_us": r.per_handshake_us(r.backend_cpu_s),
        "client_us": r.per_handshake_us(load.client_cpu_s),
        "handshakes": load.connections,
        "resumed": load.resumed,
        "server_full": r.server_counts["full"] if r.server_counts else None,
        "server_resumed": r.server_counts["resumed"] if r.server_counts else None,
        "bytes_off": r.bytes_off,
    }
    return {k: v for k, v in f.items() if v is not None}


def hs_round_ratios(
    by: dict[str, dict[str, float]], targets: tuple[str, ...]
) -> dict[str, float | None]:
    """Ratios of one round's paired handshake measures (paired_ratios)."""
    return paired_ratios(
        by, targets,
        [("handshake CPU ratio", "cpu_us"), ("handshakes per core ratio", "per_core"),
         ("user", "user_us"), ("handshakes/s", "hps")],
        [("handshake CPU ratio", "cpu_us"), ("handshakes/s", "hps")],
    )


def summarize_handshakes(
    opts: Options, results: list[HandshakeResult], measure: str
) -> Summary:
    """Medians and ranges of one handshake measure, and its per-round ratios."""
    results = [r for r in results if r.measure == measure]
    figures: dict[str, dict[str, dict[str, Any]]] = {}
    for target in opts.targets:
        runs = [hs_figures_of(r) for r in results if r.target == target]
        figures[target] = {
            key: stats([f.get(key) for f in runs], how)
            for key, _, _, how in HS_FIGURES
            if any(key in f for f in runs)
        }
    by_round: list[dict[str, float | None]] = []
    for rnd in range(1, opts.rounds + 1):
        by = {r.target: hs_figures_of(r) for r in results if r.round == rnd}
        by_round.append(hs_round_ratios(by, opts.targets))
    names = list(by_round[0]) if by_round else []
    ratios = {name: stats([rr.get(name) for rr in by_round]) for name in names}
    return Summary(figures, by_round, ratios)


def handshake_table(
    opts: Options, summary: Summary, results: list[HandshakeResult], measure: str
) -> str:
    targets = opts.targets
    rows = [["figure", *targets]]
    measured = {
        t: sum(1 for r in results if r.target == t and r.measure == measure and hs_figures_of(r))
        for t in targets
    }
    rows.append(["rounds measured", *(f"{measured[t]}/{opts.rounds}" for t in targets)])
    for key, label, spec, how in HS_FIGURES:
        if key.startswith("server_") and "haproxy" not in targets:
            continue
        rows.append([label, *figure_cells(summary, targets, measured, key, spec, how)])
    return align(rows)


def handshake_checks(opts: Options, results: list[HandshakeResult]) -> list[str]:
    """WARNING lines: full handshakes that resumed, resumed ones that did not, answers of
    another size than the probe's (an error page, a cut answer)."""
    lines = []
    for r in results:
        if r.error or r.load is None:
            continue
        n, resumed = r.load.connections, r.load.resumed
        where = f"round {r.round} {r.target} {r.measure}"
        if r.measure == "full" and resumed:
            lines.append(f"WARNING: {where}: {resumed} of {n} connections resumed a session")
        if r.measure == "resumed" and resumed < n:
            lines.append(f"WARNING: {where}: {n - resumed} of {n} connections did not resume")
        if r.server_counts is not None:
            expect = (
                {"full": n, "resumed": 0} if r.measure == "full" else {"full": 0, "resumed": n}
            )
            # HAProxy also counts the -reuse clients' first (unmeasured) connections
            if r.measure == "resumed":
                expect["full"] = r.load.clients
            if r.server_counts != expect and r.server_counts["resumed"] != resumed:
                lines.append(
                    f"WARNING: {where}: haproxy counted {r.server_counts['full']} full and "
                    f"{r.server_counts['resumed']} resumed sessions, s_time {n - resumed} and "
                    f"{resumed}"
                )
        if r.bytes_off:
            lines.append(
                f"WARNING: {where}: the answers hold {r.bytes_off:+d} bytes against "
                f"{n} x {r.answer_bytes} (the probe's answer): some were not a 200"
            )
    return lines


def tls_targets(opts: Options, summary: Summary, hs: dict[str, Summary]) -> str:
    """Issue 14's targets against the median of the per-round ratios pylb/haproxy."""
    if "haproxy" not in opts.targets:
        return ""
    rows = [["target (issue 14)", "pylb", "median (min–max)", "goal", "verdict"]]
    for target in [t for t in opts.targets if is_pylb(t)]:
        for measure, name, op, goal in TLS_TARGETS:
            if measure not in opts.tls_measures:
                continue
            source = summary if measure == "keepalive" else hs.get(measure)
            key = f"{target}/haproxy {name}"
            if source is None or key not in source.ratios:
                continue
            values = [v for v in source.ratios[key]["values"] if v is not None]
            med = source.ratios[key]["median"]
            label = {"cpu_per_request": "keep-alive CPU per request ratio"}.get(
                name, f"{measure} {name}"
            )
            if med is None:
                verdict = "no data"
            else:
                met = med <= goal if op == "<=" else med >= goal
                verdict = "met" if met else "MISSED"
            rows.append([label, target, spread(values, ".2f"), f"{op} {goal:.2f}", verdict])
    if len(rows) == 1:
        return ""
    width = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, width, strict=True)).rstrip() for row in rows
    )


def hs_result_json(r: HandshakeResult) -> dict[str, Any]:
    figures = hs_figures_of(r)
    return {
        "target": r.target,
        "measure": r.measure,
        "round": r.round,
        "port": r.port,
        "error": r.error,
        "load": asdict(r.load) if r.load else None,
        "proxy_cpu_s": r.proxy_cpu_s,
        "proxy_user_s": r.proxy_user_s,
        "proxy_system_s": r.proxy_sys_s,
        "backend_cpu_s": r.backend_cpu_s,
        "answer_bytes": r.answer_bytes,
        "haproxy_counts": r.server_counts,
        "figures": figures,
        **r.extra,
    }


def tls_title(opts: Options, measure: str) -> str:
    if measure == "keepalive":
        return (
            f"keep-alive over TLS: wrk -t1 -c{opts.connections} -d{opts.duration}s "
            f"https://... (one handshake per connection, then requests on it)"
        )
    how = {
        "full": "-new: every connection a full handshake (no session offered)",
        "resumed": "-reuse: every connection resumes the client's saved session",
    }[measure]
    return (
        f"{measure} handshakes: {opts.tls_clients} x openssl s_time {how}; then "
        f"GET / HTTP/1.0 (with Host), the answer, close; ~{opts.duration}s"
    )


# --------------------------------------------------------------------------- report


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[list[str]]) -> str:
    width = [
        max(len(row[i]) for row in rows if i < len(row) and len(row) > 2)
        for i in range(len(rows[0]))
    ]
    lines = []
    for row in rows:
        if len(row) == 2:
            lines.append(f"{row[0]:<{width[0]}}  {row[1]}")
            continue
        cells = [row[0].ljust(width[0])] + [
            c.rjust(w) for c, w in zip(row[1:], width[1:], strict=True)
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def align(rows: list[list[str]]) -> str:
    """First column left-aligned, the others right-aligned."""
    width = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [c.rjust(w) for c, w in zip(row[1:], width[1:], strict=True)]
        lines.append("  ".join([row[0].ljust(width[0]), *cells]).rstrip())
    return "\n".join(lines)


def figure_cells(summary: Summary, targets: Iterable[str], measured: dict[str, int], key: str,
                 spec: str, how: str) -> list[str]:
    """One figure's row: its median and range (or sum) per target."""
    cells = []
    for t in targets:
        st = summary.figures[t].get(key)
        if measured[t] == 0:
            cells.append("FAILED")
        elif st is None:
            cells.append("-")
        elif how == "sum":
            cells.append(format(st["sum"], spec))
        else:
            cells.append(spread([v for v in st["values"] if v is not None], spec))
    return cells


def figure_table(opts: Options, summary: Summary, results: list[TargetResult]) -> str:
    targets = opts.targets
    rows = [["figure", *targets]]
    measured = {t: sum(1 for r in results if r.target == t and r.wrk) for t in targets}
    rows.append(["rounds measured", *(f"{measured[t]}/{opts.rounds}" for t in targets)])
    for key, label, spec, how, needs_size in FIGURES:
        if needs_size and opts.size is None:
            continue
        rows.append([label, *figure_cells(summary, targets, measured, key, spec, how)])
    return align(rows)


def ratio_lines(summary: Summary) -> str:
    shown = {
        name: [v for v in st["values"] if v is not None]
        for name, st in summary.ratios.items()
    }
    shown = {k: v for k, v in shown.items() if v}
    if not shown:
        return ""
    width = max(len(k) for k in shown)
    return "\n".join(f"{k:<{width}}  {spread(v, '.2f')}" for k, v in shown.items())


def git_commit(root: Path) -> str:
    """`abc1234`, plus `+dirty` when `git status --porcelain lb` lists anything."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "lb"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def calibrate() -> str:
    """One `python -m timeit "sum(range(1000))"` line: a speed reference of the machine."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "timeit", "sum(range(1000))"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return done.stdout.strip() or done.stderr.strip() or "unknown"


def run_meta(tools: Tools) -> dict[str, Any]:
    """When, where and with which tool versions a run was made (both benchmarks)."""
    versions = {
        "nginx": program_version([tools.nginx, "-v"]),
        "wrk": program_version([tools.wrk, "-v"]),
    }
    if tools.haproxy:
        versions["haproxy"] = program_version([tools.haproxy, "-v"])
    if tools.openssl:
        versions["openssl"] = program_version([tools.openssl, "version"])
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
    }


def meta(opts: Options, tools: Tools) -> dict[str, Any]:
    """Everything about the run but its figures (the calibration at the end is added later)."""
    info = {
        **run_meta(tools),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python_executable": sys.executable,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "commit": git_commit(REPO),
        "duration": opts.duration,
        "connections": opts.connections,
        "workers": opts.workers,
        "mode": opts.mode,
        "checks": opts.checks,
        "warmup": opts.warmup,
        "rounds": opts.rounds,
        "size": opts.size,
        "body": size_text(opts.size),
        "wrk_timeout": opts.wrk_timeout,
        "targets": list(opts.targets),
        "pylb": {},
    }
    if opts.tls:
        info["tls"] = {
            "measures": list(opts.tls_measures),
            "clients": opts.tls_clients,
            "skipped": list(opts.skipped),
            "settings": tls_settings_text(),
            "python_ssl": ssl.OPENSSL_VERSION,
            "certificate": None,
            "negotiated": {},
        }
    for target in opts.targets:
        if not is_pylb(target):
            continue
        program, cwd, env = pylb_launch(target, opts)
        info["pylb"][target] = {
            "program": program,
            "cwd": str(cwd),
            "pythonpath": env.get("PYTHONPATH"),
            "commit": git_commit(cwd),
            "lb_imported": lb_import_path(target, opts),
        }
    return info


def tls_settings_text() -> str:
    return (
        f"both proxies: the same crt, alpn {TLS_ALPN}, ssl-min-ver {TLS_MIN_VERSION} (TLS 1.2 "
        f"and 1.3), default ciphers, session tickets on (their defaults); HAProxy `bind ... ssl "
        f"crt FILE alpn {TLS_ALPN} ssl-min-ver {TLS_MIN_VERSION}`, pylb `bind: [{{address, ssl: "
        f"true, crt: FILE, alpn: {TLS_ALPN}, ssl-min-ver: {TLS_MIN_VERSION}}}]`; nginx plain"
    )


def negotiated_text(neg: dict[str, Any]) -> str:
    """`TLSv1.3 TLS_AES_256_GCM_SHA384, X25519, ECDSA, ALPN http/1.1, verified; answer 148 B`."""
    probe = neg.get("probe", {})
    sc = neg.get("s_client", {})
    parts = [
        f"{probe.get('version', '?')} {probe.get('cipher', '?')}",
        sc.get("Server Temp Key", "?").split(",")[0],
        f"signature {sc.get('Signature type', '?')}",
        f"ALPN {probe.get('alpn')}",
        f"verification {sc.get('Verification', '?')}",
    ]
    text = ", ".join(parts) + f"; answer to s_time's request: {probe.get('answer_bytes', '?')} B"
    if probe.get("error"):
        text += f" (probe: {probe['error'][:300]})"
    if sc.get("error"):
        text += f" (s_client: {sc['error']})"
    return text


def run_line(opts: Options) -> str:
    """The header's `run:` line (the chart's caption has it too)."""
    return (
        f"run: mode={opts.mode} connections={opts.connections} duration={opts.duration}s "
        f"warmup={opts.warmup}s rounds={opts.rounds} pylb workers={opts.workers} "
        f"checks={'on' if opts.checks else 'off'} body={size_text(opts.size)} "
        f"wrk --timeout={opts.wrk_timeout}"
        + (f" haproxy splice={'on' if opts.haproxy_splice else 'off'}"
           f"{f' pipesize={opts.haproxy_pipesize}' if opts.haproxy_pipesize else ''}"
           if opts.mode == "tcp" else "")
        + (f" tls=on measures={','.join(opts.tls_measures)} s_time clients={opts.tls_clients}"
           if opts.tls else "")
    )


def header(opts: Options, info: dict[str, Any]) -> str:
    v = info["versions"]
    lines = [
        f"pylb bench {info['time']} on {info['host']}",
        f"cores: {info['cpus']} (os.cpu_count), {info['cpus_usable']} usable "
        f"(sched_getaffinity); load average at start "
        f"{' '.join(map(str, info['loadavg_at_start']))}",
        f"python: {info['python']} ({info['python_executable']})",
        f"kernel: {info['kernel']}",
    ]
    if "haproxy" in v:
        lines.append(f"haproxy: {v['haproxy']}")
    lines += [
        f"nginx: {v['nginx']}",
        f"wrk: {v['wrk']}",
    ]
    if "openssl" in v:
        lines.append(f"openssl: {v['openssl']} (python's ssl: {ssl.OPENSSL_VERSION})")
    lines.append(f"commit: {info['commit']} ({REPO})")
    for target, p in info["pylb"].items():
        running = p.get("lb_running")
        if running is None:
            seen = "not checked (no run)"
        elif running["roots"]:
            seen = f"{', '.join(running['roots'])} ({len(running['processes'])} processes)"
            if running.get("error"):
                seen += f"; not seen in some: {running['error']}"
        else:
            seen = running.get("error") or "unknown"
        expected = str(Path(p["cwd"]))
        warn = ""
        if running and running["roots"] and running["roots"] != [expected]:
            warn = f"  WARNING: expected {expected}"
        lines.append(
            f"{target}: {p['program']} (commit {p['commit']}); lb imported from "
            f"{p['lb_imported']}; running processes' lb under: {seen}{warn}"
        )
    cal = info.get("calibration", {})
    lines.append(
        f'calibration (python -m timeit "sum(range(1000))"): start: {cal.get("start", "-")}; '
        f"end: {cal.get('end', '-')}"
    )
    lines.append(run_line(opts))
    tls = info.get("tls")
    if tls:
        lines.append(f"tls: {tls.get('certificate') or '-'}")
        lines.append(f"tls: {tls['settings']}")
        for target, neg in tls.get("negotiated", {}).items():
            lines.append(f"tls {target}: {negotiated_text(neg)}")
        if "direct" in tls.get("skipped", []):
            lines.append(
                "direct: skipped under --tls (nginx alone serves plain HTTP; there is no "
                "TLS figure without a proxy)"
            )
    return "\n".join(lines)


def result_json(r: TargetResult) -> dict[str, Any]:
    return {
        "target": r.target,
        "round": r.round,
        "port": r.port,
        "error": r.error,
        "requests": r.wrk.requests if r.wrk else None,
        "seconds": r.wrk.seconds if r.wrk else None,
        "rps": r.wrk.rps if r.wrk else None,
        "proxy_cpu_s": r.proxy_cpu_s,
        "proxy_user_s": r.proxy_user_s,
        "proxy_system_s": r.proxy_sys_s,
        "proxy_cpu_us_per_request": r.proxy_us_per_req,
        "proxy_user_us_per_request": r.proxy_user_us_per_req,
        "proxy_system_us_per_request": r.proxy_sys_us_per_req,
        "proxy_cpu_percent": r.proxy_cpu_pct,
        "body_bytes": r.size,
        "body_mib": r.body_mib,
        "proxy_cpu_ms_per_mib": r.proxy_ms_per_mib,
        "backend_cpu_s": r.backend_cpu_s,
        "backend_cpu_us_per_request": r.backend_us_per_req,
        "wrk": asdict(r.wrk) if r.wrk else None,
        **r.extra,
    }


def profile_json(p: ProfileResult) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "target": p.target,
        "path": str(p.path),
        "error": p.error,
        "rate": PROFILE_RATE,
        "pyspy": p.pyspy_summary,
        "workers": {str(k): v for k, v in p.workers.items()},
        "all_samples": p.all_samples,
        "wrk": asdict(p.wrk) if p.wrk else None,
    }
    if p.load is not None:
        doc["load"] = {"measure": p.load_name, **asdict(p.load), "hps": p.load.hps}
    if p.prof is not None:
        doc["worker_samples"] = p.prof.samples
        doc["samples_by_process"] = {f"{pid} {t}": n for (pid, t), n in p.prof.processes.items()}
        doc["top_self"] = p.prof.self_samples.most_common(PROFILE_TOP_SELF)
        doc["top_total"] = p.prof.total_samples.most_common(PROFILE_TOP_TOTAL)
    return doc


def profile_text(opts: Options, p: ProfileResult) -> str:
    head = (
        f"profile: {p.target}, py-spy record --format raw --rate {PROFILE_RATE} --subprocesses "
        f"{' '.join(pyspy_mode(opts))} (idle samples excluded), {profile_load_text(opts)}"
    )
    if p.wrk is not None:
        head += f" at {p.wrk.rps:.0f} req/s under py-spy"
    if p.load is not None:
        head += f" at {p.load.hps:.0f} handshakes/s under py-spy ({p.load.resumed} resumed)"
    head += f"; raw file {p.path}"
    if p.error:
        return f"{head}\nprofile FAILED: {p.error}"
    assert p.prof is not None
    procs = ", ".join(f"{pid} {n}" for (pid, _), n in sorted(p.prof.processes.items()))
    lines = [
        head,
        f"py-spy: {p.pyspy_summary}; worker samples {p.prof.samples} of {p.all_samples} "
        f"(by worker pid: {procs})",
        "",
        format_profile(p.prof),
    ]
    if opts.tls or opts.profile_native:
        lines += ["", format_by_file(p.prof)]
    return "\n".join(lines)


def report(opts: Options, info: dict[str, Any], run: Run) -> None:
    summary = summarize(opts, run.results)
    print()
    print(header(opts, info))
    if not opts.tls or "keepalive" in opts.tls_measures:
        print()
        if opts.tls:
            print(tls_title(opts, "keepalive"))
        print(figure_table(opts, summary, run.results))
        failed = [r for r in run.results if r.error]
        if failed:
            print("\nfailed runs (left out of the medians):")
            for r in failed:
                print(f"  round {r.round} {r.target}: {r.error}")
        text = ratio_lines(summary)
        if text:
            print("\nratios, per round from its paired runs: median (min–max)")
            print(text)
    hs: dict[str, Summary] = {}
    if opts.tls:
        for measure in [m for m in opts.tls_measures if m in HANDSHAKE_MEASURES]:
            hs[measure] = summarize_handshakes(opts, run.handshakes, measure)
            results = [r for r in run.handshakes if r.measure == measure]
            print()
            print(tls_title(opts, measure))
            print(handshake_table(opts, hs[measure], run.handshakes, measure))
            failed_hs = [r for r in results if r.error]
            if failed_hs:
                print("\nfailed runs (left out of the medians):")
                for r in failed_hs:
                    print(f"  round {r.round} {r.target}: {r.error}")
            checks = handshake_checks(opts, results)
            if checks:
                print()
                print("\n".join(checks))
            text = ratio_lines(hs[measure])
            if text:
                print("\nratios, per round from its paired runs: median (min–max)")
                print(text)
        text = tls_targets(opts, summary, hs)
        if text:
            print()
            print(text)
    if run.profile is not None:
        print()
        print(profile_text(opts, run.profile))
    if opts.json_path:
        doc = {
            "meta": info,
            "results": [result_json(r) for r in run.results],
            "summary": summary.figures,
            "ratios_by_round": summary.ratios_by_round,
            "ratios": summary.ratios,
            "profile": profile_json(run.profile) if run.profile else None,
        }
        if opts.tls:
            doc["handshakes"] = [hs_result_json(r) for r in run.handshakes]
            doc["handshake_summary"] = {m: s.figures for m, s in hs.items()}
            doc["handshake_ratios_by_round"] = {m: s.ratios_by_round for m, s in hs.items()}
            doc["handshake_ratios"] = {m: s.ratios for m, s in hs.items()}
        opts.json_path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nJSON written to {opts.json_path}")
    if opts.plot:
        import plot  # here: only --plot needs it (and it imports matplotlib when drawing)

        plot.bars(opts.plot, chart(opts, info, run, summary, hs))
        print(f"\nchart written to {opts.plot}")


# --------------------------------------------------------------------------- chart (--plot)

# ratio names (after `a/b `) as the chart's ratio panel labels them
RATIO_LABELS = {
    "cpu_per_request": "CPU/req",
    "user": "user CPU",
    "rps": "req/s",
    "cpu_ms_per_MB": "CPU/MiB",
    "handshake CPU ratio": "CPU/handshake",
    "handshakes per core ratio": "handshakes/core",
    "handshakes/s": "handshakes/s",
}


def chart(
    opts: Options, info: dict[str, Any], run: Run, summary: Summary, hs: dict[str, Summary]
) -> "plot.Chart":
    """The report's figures as a chart: the medians and ranges the tables print."""
    import plot

    panels: list[plot.Panel] = []
    ratio_sources: list[tuple[str, Summary]] = []
    if not opts.tls or "keepalive" in opts.tls_measures:
        measured = {t: sum(1 for r in run.results if r.target == t and r.wrk) for t in opts.targets}
        panels += wrk_panels(opts, summary, measured)
        ratio_sources.append(("keep-alive" if opts.tls else "", summary))
    if hs:
        panels += handshake_panels(opts, hs, run.handshakes)
        ratio_sources += list(hs.items())
    ratios = ratio_panel(ratio_sources)
    if ratios is not None:
        panels.append(ratios)
    what = " vs ".join(opts.targets)
    return plot.Chart(
        title=f"pylb bench: {what} ({opts.mode}{', TLS' if opts.tls else ''}, "
        f"body {size_text(opts.size)})",
        panels=panels,
        caption=chart_caption(opts, info, run),
    )


def cell(figures: dict[str, Any], measured: int, key: str) -> "plot.Bar":
    """One target's bar for figure `key`: its median and range, or FAILED (no run measured)."""
    import plot

    if measured == 0:
        return plot.Bar(None, note="FAILED")
    return plot.Bar.of_stats(figures.get(key))


def target_series(
    targets: Iterable[str], bars: "Callable[[str], list[plot.Bar]]"
) -> "dict[str, tuple[plot.Bar, ...]]":
    """target -> its bars; a target with nothing to draw (direct has no proxy CPU) left out."""
    out = {}
    for t in targets:
        got = tuple(bars(t))
        if any(b.value is not None or b.note for b in got):
            out[t] = got
    return out


def wrk_panels(opts: Options, summary: Summary, measured: dict[str, int]) -> "list[plot.Panel]":
    """The keep-alive (wrk) figures: req/s, CPU per request, latency; with --size, MiB."""
    import plot

    def series(*keys: str) -> "dict[str, tuple[plot.Bar, ...]]":
        return target_series(
            opts.targets,
            lambda t: [cell(summary.figures[t], measured[t], k) for k in keys],
        )

    scope = "keep-alive over TLS: " if opts.tls else ""
    panels = [
        plot.Panel(f"{scope}throughput (wrk -c{opts.connections})", "requests/s", ("req/s",),
                   series("rps"), ".0f"),
        plot.Panel(f"{scope}proxy CPU per request (process tree)", "CPU µs per request",
                   ("total", "user", "system"), series("cpu_us", "user_us", "sys_us"), ".1f"),
        plot.Panel(f"{scope}latency (wrk)", "ms", ("p50", "p99"), series("p50_ms", "p99_ms"),
                   ".2f"),
    ]
    if opts.size is not None:
        panels += [
            plot.Panel(f"{scope}body throughput", "MiB/s", ("body",), series("mb_per_s"), ".0f"),
            plot.Panel(f"{scope}proxy CPU per MiB of body", "CPU ms per MiB", ("CPU/MiB",),
                       series("cpu_ms_per_mb"), ".3f"),
        ]
    return panels


def handshake_panels(
    opts: Options, hs: dict[str, Summary], results: list[HandshakeResult]
) -> "list[plot.Panel]":
    """--tls: handshakes/s and proxy CPU per handshake, one group per handshake measure."""
    import plot

    measures = tuple(hs)
    measured = {
        (t, m): sum(1 for r in results if r.target == t and r.measure == m and hs_figures_of(r))
        for t in opts.targets
        for m in measures
    }

    def series(key: str) -> "dict[str, tuple[plot.Bar, ...]]":
        return target_series(
            opts.targets,
            lambda t: [cell(hs[m].figures[t], measured[t, m], key) for m in measures],
        )

    clients = f"{opts.tls_clients} x openssl s_time"
    return [
        plot.Panel(f"TLS handshakes ({clients})", "handshakes/s", measures, series("hps"),
                   ".0f"),
        plot.Panel("proxy CPU per handshake (process tree)", "CPU µs per handshake", measures,
                   series("cpu_us"), ".0f"),
    ]


def ratio_panel(sources: list[tuple[str, Summary]]) -> "plot.Panel | None":
    """The per-round ratios (median, min–max) as ratio_lines prints them, of each source
    (measure, Summary); None if there are none."""
    import plot

    found: list[tuple[str, str, str, plot.Bar]] = []  # (pair, measure, figure, bar)
    for measure, summary in sources:
        for name, st in summary.ratios.items():
            values = [v for v in st["values"] if v is not None]
            if values:
                pair, _, what = name.partition(" ")
                bar = plot.Bar.of_values(values)
                found.append((pair, measure, RATIO_LABELS.get(what, what), bar))
    if not found:
        return None
    pairs = list(dict.fromkeys(pair for pair, _, _, _ in found))
    # the usual single pair (pylb/haproxy) is named once, in the title
    title = f"{pairs[0]}, per round" if len(pairs) == 1 else "ratios a/b, per round"

    def label(pair: str, measure: str, what: str) -> str:
        under = " ".join(x for x in (measure, pair if len(pairs) > 1 else "") if x)
        return f"{what}\n{under}" if under else what

    return plot.Panel(
        f"{title} (1 = equal)", "ratio", tuple(label(p, m, w) for p, m, w, _ in found),
        {"median of the rounds' ratios": tuple(bar for _, _, _, bar in found)},
        ".2f", reference=1.0, shared=False,
    )


def chart_caption(opts: Options, info: dict[str, Any], run: Run) -> list[str]:
    """Lines that make the picture self-describing: command, when and where, what a bar is."""
    lines = [f"$ {opts.command}"] if opts.command else []
    lines += [
        f"{info.get('time', '?')} on {info.get('host', '?')} ({info.get('cpus', '?')} cores), "
        f"commit {info.get('commit', '?')}; {run_line(opts)}",
    ]
    how = "bars: median over the rounds; whiskers: min–max; ratios paired round by round"
    if run.results:
        wrk = {t: [r.wrk for r in run.results if r.target == t and r.wrk] for t in opts.targets}
        how += (
            "; wrk rounds measured: "
            + ", ".join(f"{t} {len(w)}/{opts.rounds}" for t, w in wrk.items())
            + "; non-2xx + socket errors (sum): "
            + ", ".join(f"{t} {sum(x.errors for x in w)}" for t, w in wrk.items())
        )
    failed = [r for r in run.handshakes if r.error]
    if failed:
        how += f"; failed handshake runs (left out): {len(failed)}"
    return [*lines, how]


# --------------------------------------------------------------------------- main


def raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def temp_dir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pylb-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"bench: temp dir kept: {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, raise_interrupt)
    needs = opts.only + (("pylb",) if opts.pylb_trees and "pylb" not in opts.only else ())
    try:
        tools = find_tools(needs, profile=opts.profile is not None, tls=opts.tls)
    except MissingDependency as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return EXIT_MISSING
    try:
        info = meta(opts, tools)
        info["calibration"] = {"start": calibrate()}
        log(f"calibration at start: {info['calibration']['start']}")
        with temp_dir(opts.keep_tmp) as tmp:
            if opts.tls:
                assert tools.openssl is not None
                opts = replace(opts, tls_files=make_tls_files(tools.openssl, tmp))
                info["tls"]["certificate"] = tls_files_of(opts).description
            run = run_all(opts, tools, tmp)
        info["calibration"]["end"] = calibrate()
        log(f"calibration at end: {info['calibration']['end']}")
    except KeyboardInterrupt:
        print("\nbench: interrupted; all started processes stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for r in run.results:
        if "lb_running" in r.extra and r.target in info["pylb"]:
            info["pylb"][r.target]["lb_running"] = r.extra["lb_running"]
    for target, tls_info in run.tls_info.items():
        if "lb_running" in tls_info and target in info["pylb"]:
            info["pylb"][target]["lb_running"] = tls_info["lb_running"]
        if opts.tls:
            info["tls"]["negotiated"][target] = {
                k: v for k, v in tls_info.items() if k in ("probe", "s_client")
            }
    report(opts, info, run)
    failed = (
        any(r.error for r in run.results)
        or any(r.error for r in run.handshakes)
        or bool(run.profile and run.profile.error)
    )
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
