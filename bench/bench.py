#!/usr/bin/env python3
"""Benchmark pylb against HAProxy and against the bare backend.

One run starts an nginx backend (two server blocks on two free loopback ports), then drives
wrk against it three ways: directly, through HAProxy and through pylb. For each proxy it
measures the CPU time (user + system, whole process tree) spent per request. Figures are
printed and optionally written as JSON; nothing is asserted.

See bench/README.md for how to run it and how to read the output.
"""

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
APT_PACKAGE = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk"}
EXTRA_BIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
BODY = b"hello\n"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
WRK_GRACE = 30.0

EXIT_OK, EXIT_FAILED, EXIT_MISSING, EXIT_INTERRUPTED = 0, 1, 2, 130


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


class MissingDependency(Exception):
    """A program or module the benchmark needs is not installed (exit 2)."""


# --------------------------------------------------------------------------- options


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


def parse_only(text: str) -> tuple[str, ...]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"--only takes a comma list of {','.join(TARGETS)}; got {text!r}"
        )
    return tuple(t for t in TARGETS if t in names)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


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
    a = p.parse_args(argv)
    return Options(
        duration=a.duration,
        connections=a.connections,
        workers=a.workers,
        mode=a.mode,
        checks=a.checks,
        json_path=a.json_path,
        only=a.only,
        warmup=max(0, a.warmup),
        keep_tmp=a.keep_tmp,
    )


# --------------------------------------------------------------------------- dependencies


@dataclass(frozen=True)
class Tools:
    nginx: str
    wrk: str
    haproxy: str | None
    pylb: str | None


def find_program(name: str) -> str:
    path = os.pathsep.join([os.environ.get("PATH", ""), *EXTRA_BIN_DIRS])
    found = shutil.which(name, path=path)
    if found is None:
        raise MissingDependency(
            f"{name} not found; install it with: apt-get install {APT_PACKAGE[name]}"
        )
    return found


def find_tools(only: tuple[str, ...]) -> Tools:
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
    return Tools(
        nginx=find_program("nginx"),
        wrk=find_program("wrk"),
        haproxy=find_program("haproxy") if "haproxy" in only else None,
        pylb=pylb,
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


# --------------------------------------------------------------------------- processes


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its descendants (reaped children included)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


class Managed:
    """A child process in its own session, with output in a log file; stop() kills its tree."""

    def __init__(
        self, name: str, argv: list[str], log_path: Path, append: bool = False, **popen: Any
    ) -> None:
        """`append`: the log is shared with other processes (successive pylb masters)."""
        self.name = name
        self.argv = argv
        self.log_path = log_path
        with open(log_path, "ab" if append else "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
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


def http_ok(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.status == 200 and resp.read() == BODY
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


def wait_ready(proc: Managed, ports: list[int], timeout: float = READY_TIMEOUT) -> None:
    """Wait until every port accepts and an HTTP request through it returns the backend body."""
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending:
        if not proc.alive():
            raise BenchError(
                f"{proc.name} exited with status {proc.proc.returncode} during startup; "
                f"log {proc.log_path}:\n{proc.log_tail()}"
            )
        if port_accepts(pending[0]) and http_ok(pending[0]):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise BenchError(
                f"{proc.name} not serving on 127.0.0.1:{pending[0]} after {timeout:.0f}s; "
                f"log {proc.log_path}:\n{proc.log_tail()}"
            )
        time.sleep(0.05)


# --------------------------------------------------------------------------- configs


def nginx_config(tmp: Path, ports: tuple[int, ...]) -> str:
    servers = "\n".join(
        f"""    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "hello\\n"; }}
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
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
{servers}
}}
"""


def haproxy_config(opts: Options, port: int, backends: tuple[int, ...]) -> str:
    """haproxy.cfg: one frontend, one roundrobin backend over the nginx ports."""
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
    if opts.checks:
        if opts.mode == "http":
            backend += ["option httpchk GET /", "cookie SRV insert indirect nocache"]
            server_opts = [f" check cookie s{i}" for i in range(1, len(backends) + 1)]
        else:
            server_opts = [" check"] * len(backends)
    servers = [
        f"server s{i} 127.0.0.1:{p}{extra}"
        for i, (p, extra) in enumerate(zip(backends, server_opts, strict=True), start=1)
    ]
    sections = {
        "global": ["nbthread 1", "maxconn 4096"],
        "defaults": defaults,
        "frontend fe": [f"bind 127.0.0.1:{port}", "default_backend be"],
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
    return {
        "global": {"workers": opts.workers, "maxconn": 4096},
        "defaults": {
            "mode": opts.mode,
            "timeout": {"connect": "5s", "client": "30s", "server": "30s"},
        },
        "frontends": {
            "fe": {"bind": f"127.0.0.1:{port}", "mode": opts.mode, "default_backend": "be"},
        },
        "backends": {"be": backend},
    }


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


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    non2xx: int
    socket_errors: dict[str, int]
    latency_ms: dict[str, float]

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
    )


def run_wrk(wrk: str, port: int, connections: int, duration: int) -> WrkResult:
    argv = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{duration}s",
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

    def per_request_us(self, cpu_s: float | None) -> float | None:
        if cpu_s is None or self.wrk is None or self.wrk.requests == 0:
            return None
        return cpu_s / self.wrk.requests * 1e6

    @property
    def proxy_us_per_req(self) -> float | None:
        return self.per_request_us(self.proxy_cpu_s)

    @property
    def backend_us_per_req(self) -> float | None:
        return self.per_request_us(self.backend_cpu_s)

    @property
    def proxy_cpu_pct(self) -> float | None:
        if self.proxy_cpu_s is None or self.wrk is None or self.wrk.seconds == 0:
            return None
        return self.proxy_cpu_s / self.wrk.seconds * 100


def measure(
    target: str, port: int, opts: Options, tools: Tools, nginx: Managed, proxy: Managed | None
) -> TargetResult:
    """Warm up, then one measured wrk run with CPU samples of proxy and backend around it."""
    if opts.warmup:
        run_wrk(tools.wrk, port, opts.connections, opts.warmup)
    proxy_before = proxy.cpu_seconds() if proxy else None
    nginx_before = nginx.cpu_seconds()
    result = run_wrk(tools.wrk, port, opts.connections, opts.duration)
    nginx_after = nginx.cpu_seconds()
    proxy_after = proxy.cpu_seconds() if proxy else None
    res = TargetResult(target, port, wrk=result, backend_cpu_s=nginx_after - nginx_before)
    if proxy is not None and proxy_before is not None and proxy_after is not None:
        res.proxy_cpu_s = proxy_after - proxy_before
        res.extra["proxy_processes"] = 1 + len(psutil.Process(proxy.pid).children(recursive=True))
    return res


def start_nginx(stack: contextlib.ExitStack, tools: Tools, tmp: Path, ports: Ports) -> Managed:
    conf = write(tmp / "nginx.conf", nginx_config(tmp, ports.nginx))
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
    wait_ready(nginx, list(ports.nginx))
    return nginx


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
    proxy = start(stack, "haproxy", [tools.haproxy, "-f", str(cfg), "-db"], tmp)
    wait_ready(proxy, [ports.haproxy])
    return proxy


def pylb_env() -> dict[str, str]:
    """Environment for bin/pylb: this interpreter's bin dir first on PATH (the venv)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def start_pylb(
    stack: contextlib.ExitStack, opts: Options, tools: Tools, tmp: Path, ports: Ports
) -> Managed:
    assert tools.pylb is not None
    cfg = write(tmp / "pylb.yaml", pylb_yaml(pylb_config(opts, ports.pylb, ports.nginx)))
    check = subprocess.run(
        [tools.pylb, "-c", "-f", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env=pylb_env(),
    )
    if check.returncode != 0:
        raise BenchError(f"pylb -c rejected {cfg}:\n{check.stdout}{check.stderr}")
    proxy = start(stack, "pylb", [tools.pylb, "-f", str(cfg)], tmp, cwd=REPO, env=pylb_env())
    wait_ready(proxy, [ports.pylb])
    return proxy


def run_target(
    target: str, opts: Options, tools: Tools, tmp: Path, ports: Ports, nginx: Managed
) -> TargetResult:
    """Start the proxy for `target` (none for direct), measure, stop it again."""
    port = {"direct": ports.nginx[0], "haproxy": ports.haproxy, "pylb": ports.pylb}[target]
    starters: dict[str, Callable[..., Managed]] = {"haproxy": start_haproxy, "pylb": start_pylb}
    print(
        f"bench: {target}: wrk -c{opts.connections} -d{opts.duration}s -> 127.0.0.1:{port}",
        file=sys.stderr,
        flush=True,
    )
    try:
        with contextlib.ExitStack() as stack:
            proxy = starters[target](stack, opts, tools, tmp, ports) if target in starters else None
            return measure(target, port, opts, tools, nginx, proxy)
    except BenchError as exc:
        print(f"bench: {target}: FAILED: {exc}", file=sys.stderr, flush=True)
        return TargetResult(target, port, error=str(exc).splitlines()[0])


def run_all(opts: Options, tools: Tools, tmp: Path) -> list[TargetResult]:
    ports = pick_ports()
    with contextlib.ExitStack() as stack:
        nginx = start_nginx(stack, tools, tmp, ports)
        return [run_target(t, opts, tools, tmp, ports, nginx) for t in opts.only]


# --------------------------------------------------------------------------- report


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_rows(results: list[TargetResult]) -> list[list[str]]:
    rows = [
        [
            "target",
            "req/s",
            "CPU us/req",
            "CPU %",
            "nginx us/req",
            "p50 ms",
            "p99 ms",
            "non-2xx",
            "sock err",
        ]
    ]
    for r in results:
        if r.wrk is None:
            rows.append([r.target, f"FAILED: {r.error}"])
            continue
        rows.append(
            [
                r.target,
                fmt(r.wrk.rps, ".0f"),
                fmt(r.proxy_us_per_req, ".1f"),
                fmt(r.proxy_cpu_pct, ".0f"),
                fmt(r.backend_us_per_req, ".1f"),
                fmt(r.wrk.latency_ms.get("p50"), ".2f"),
                fmt(r.wrk.latency_ms.get("p99"), ".2f"),
                str(r.wrk.non2xx),
                str(sum(r.wrk.socket_errors.values())),
            ]
        )
    return rows


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


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def compute_ratios(results: list[TargetResult]) -> dict[str, float | None]:
    by = {r.target: r for r in results if r.wrk is not None}

    def rps(t: str) -> float | None:
        return by[t].wrk.rps if t in by and by[t].wrk else None

    def cpu(t: str) -> float | None:
        return by[t].proxy_us_per_req if t in by else None

    return {
        "pylb/haproxy cpu_per_request": ratio(cpu("pylb"), cpu("haproxy")),
        "pylb/haproxy rps": ratio(rps("pylb"), rps("haproxy")),
        "pylb/direct rps": ratio(rps("pylb"), rps("direct")),
        "haproxy/direct rps": ratio(rps("haproxy"), rps("direct")),
    }


def format_ratios(ratios: dict[str, float | None]) -> str:
    shown = {k: v for k, v in ratios.items() if v is not None}
    if not shown:
        return ""
    width = max(len(k) for k in shown)
    return "\n".join(f"{k:<{width}}  {v:6.2f}" for k, v in shown.items())


def run_meta(tools: Tools) -> dict[str, Any]:
    """When, where and with which tool versions a run was made (both benchmarks)."""
    versions = {
        "nginx": program_version([tools.nginx, "-v"]),
        "wrk": program_version([tools.wrk, "-v"]),
    }
    if tools.haproxy:
        versions["haproxy"] = program_version([tools.haproxy, "-v"])
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
    }


def meta(opts: Options, tools: Tools) -> dict[str, Any]:
    return {
        **run_meta(tools),
        "duration": opts.duration,
        "connections": opts.connections,
        "workers": opts.workers,
        "mode": opts.mode,
        "checks": opts.checks,
        "warmup": opts.warmup,
    }


def result_json(r: TargetResult) -> dict[str, Any]:
    return {
        "target": r.target,
        "port": r.port,
        "error": r.error,
        "requests": r.wrk.requests if r.wrk else None,
        "seconds": r.wrk.seconds if r.wrk else None,
        "rps": r.wrk.rps if r.wrk else None,
        "proxy_cpu_s": r.proxy_cpu_s,
        "proxy_cpu_us_per_request": r.proxy_us_per_req,
        "proxy_cpu_percent": r.proxy_cpu_pct,
        "backend_cpu_s": r.backend_cpu_s,
        "backend_cpu_us_per_request": r.backend_us_per_req,
        "wrk": asdict(r.wrk) if r.wrk else None,
        **r.extra,
    }


def report(opts: Options, tools: Tools, results: list[TargetResult]) -> None:
    ratios = compute_ratios(results)
    print(
        f"\nmode={opts.mode} connections={opts.connections} duration={opts.duration}s "
        f"pylb workers={opts.workers} checks={'on' if opts.checks else 'off'}\n"
    )
    print(format_table(table_rows(results)))
    text = format_ratios(ratios)
    if text:
        print("\n" + text)
    if opts.json_path:
        doc = {
            "meta": meta(opts, tools),
            "results": [result_json(r) for r in results],
            "ratios": ratios,
        }
        opts.json_path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nJSON written to {opts.json_path}")


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
    try:
        tools = find_tools(opts.only)
    except MissingDependency as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return EXIT_MISSING
    try:
        with temp_dir(opts.keep_tmp) as tmp:
            results = run_all(opts, tools, tmp)
    except KeyboardInterrupt:
        print("\nbench: interrupted; all started processes stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    report(opts, tools, results)
    return EXIT_FAILED if any(r.error for r in results) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
