"""The process model: master binds, workers receive the sockets, signals, respawn, -D -p."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from backends import HttpConn, free_port, wait_until, workers_of
from conftest import REPO

PYLB = [sys.executable, str(REPO / "bin" / "pylb")]


def http_config(port: int, servers: list[str], workers: int = 2, **global_: Any) -> dict:
    return {
        "global": {"workers": workers, **global_},
        "defaults": {"mode": "http"},
        "frontends": {"www": {"bind": f"127.0.0.1:{port}", "default_backend": "app"}},
        "backends": {
            "app": {
                "servers": {f"s{i}": {"address": a} for i, a in enumerate(servers, 1)},
            }
        },
    }


def listening_inodes(pid: int) -> set[int]:
    """Inodes of the listening TCP sockets that process `pid` holds."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    listening.add(int(fields[9]))
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if m := re.fullmatch(r"socket:\[(\d+)\]", target):
            held.add(int(m.group(1)))
    return held & listening


def get(port: int, target: str = "/") -> dict:
    with HttpConn(port) as conn:
        response = conn.request("GET", target)
        assert response.status == 200
        return response.json()


def test_workers_share_the_masters_listening_socket(pylb, backends):
    echo = backends.echo("s1")
    port = free_port()
    lb = pylb(http_config(port, [echo.address], workers=3))
    workers = lb.workers()
    assert len(workers) == 3
    master_inodes = listening_inodes(lb.pid)
    assert len(master_inodes) == 1
    for worker in workers:
        # The very same socket (inode), received over SCM_RIGHTS, not one bound anew.
        assert listening_inodes(worker.pid) == master_inodes
    assert get(port)["server"] == "s1"


def test_process_titles(pylb, backends):
    echo = backends.echo()
    lb = pylb(http_config(free_port(), [echo.address], workers=2))
    master = psutil.Process(lb.pid)
    assert " ".join(master.cmdline()).strip() == f"pylb: master [{lb.config_path}]"
    titles = sorted(" ".join(w.cmdline()).strip() for w in lb.workers())
    assert titles == ["pylb: worker 1/2 [gen 1]", "pylb: worker 2/2 [gen 1]"]


def test_killed_worker_is_replaced_within_a_second(pylb, backends):
    echo = backends.echo()
    port = free_port()
    lb = pylb(http_config(port, [echo.address], workers=2))
    victim = lb.workers()[0]
    mark = len(lb.lines)
    killed_at = time.monotonic()
    victim.kill()
    lb.wait_log(rf"\(pid {victim.pid}\) exited: killed by signal 9", 5, start=mark)
    lb.wait_log(r"worker \d/2 gen 1 started \(pid \d+, ", 5, start=mark)
    assert time.monotonic() - killed_at < 1.5
    assert wait_until(lambda: len(lb.workers()) == 2, 5)
    for _ in range(10):
        get(port)


def test_a_worker_that_keeps_dying_is_restarted_with_backoff(pylb, backends):
    """A crash (here a segfault) soon after start, again and again, is a crash loop; a kill
    from outside (kill -9, the OOM killer) is not, and is replaced at once every time."""
    echo = backends.echo()
    lb = pylb(http_config(free_port(), [echo.address], workers=1))
    mark = len(lb.lines)
    for _ in range(3):  # killed from outside: no backoff
        workers = lb.workers()
        assert len(workers) == 1
        workers[0].kill()
        before = {w.pid for w in workers}
        assert wait_until(lambda b=before: {w.pid for w in lb.workers()} - b != set(), 5)
    assert not any("keeps dying" in line for line in lb.lines[mark:])
    for _ in range(3):
        workers = lb.workers()
        assert len(workers) == 1
        workers[0].send_signal(signal.SIGSEGV)
        before = {w.pid for w in workers}
        assert wait_until(lambda b=before: {w.pid for w in lb.workers()} - b != set(), 5)
    lb.wait_log(r"keeps dying: next start in \d+\.\ds", 5, start=mark)


def test_sigterm_stops_master_and_workers(pylb, backends):
    echo = backends.echo()
    lb = pylb(http_config(free_port(), [echo.address], workers=2))
    workers = lb.workers()
    lb.signal(signal.SIGTERM)
    assert lb.proc.wait(10) == 0
    lb.wait_log("exiting", 1)
    assert wait_until(lambda: not any(w.is_running() for w in workers), 5)


def test_sigusr1_finishes_requests_in_flight_then_exits(pylb, backends):
    echo = backends.echo()
    port = free_port()
    lb = pylb(http_config(port, [echo.address], workers=2))
    results: list[Any] = []

    def slow_request() -> None:
        results.append(get(port, "/slow?delay=1"))

    clients = [threading.Thread(target=slow_request) for _ in range(3)]
    for client in clients:
        client.start()
    assert wait_until(lambda: len(echo.requests) == 3, 5)  # all three at the server
    lb.signal(signal.SIGUSR1)
    for client in clients:
        client.join(10)
    assert len(results) == 3 and all(r["target"] == "/slow?delay=1" for r in results)
    assert lb.proc.wait(10) == 0


def test_idle_keepalive_connection_is_closed_on_soft_stop(pylb, backends):
    echo = backends.echo()
    port = free_port()
    lb = pylb(http_config(port, [echo.address], workers=1))
    conn = HttpConn(port)
    assert conn.request().status == 200
    lb.signal(signal.SIGUSR1)
    assert conn.closed_by_peer(5)
    assert lb.proc.wait(10) == 0


def test_check_mode(tmp_path: Path):
    good = REPO / "conf" / "lb.cfg"
    done = subprocess.run([*PYLB, "-c", "-f", str(good)], capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, "Configuration file is valid")
    bad = tmp_path / "bad.cfg"
    bad.write_text(good.read_text().replace("    bind:", "    bnd:"))
    done = subprocess.run([*PYLB, "-c", "-f", "bad.cfg"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 1
    line = next(i for i, text in enumerate(bad.read_text().splitlines(), 1) if "bnd:" in text)
    assert done.stderr.strip() == (
        f"bad.cfg:{line}: frontends.www.bnd: unknown key (did you mean bind?)"
    )


def test_invalid_config_starts_nothing(tmp_path: Path):
    port = free_port()
    cfg = tmp_path / "lb.cfg"
    cfg.write_text(
        f"frontends:\n  www:\n    bind: 127.0.0.1:{port}\n    default_backend: nowhere\n"
        "backends:\n  app:\n    servers:\n      s1: {address: 127.0.0.1:1}\n"
    )
    done = subprocess.run([*PYLB, "-f", str(cfg)], capture_output=True, text=True, timeout=20)
    assert done.returncode == 1
    assert "default_backend" in done.stderr and str(cfg) in done.stderr
    with socket.socket() as probe:  # nothing was bound
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_bind_failure_is_reported(tmp_path: Path, backends):
    echo = backends.echo()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "lb.cfg"
        cfg.write_text(yaml.safe_dump(http_config(port, [echo.address])))
        done = subprocess.run([*PYLB, "-f", str(cfg)], capture_output=True, text=True,
                              timeout=20)
    assert done.returncode == 1
    assert f"cannot bind frontend www to 127.0.0.1:{port}" in done.stderr


def test_daemon_mode_writes_the_pidfile(tmp_path: Path, backends):
    echo = backends.echo("daemon")
    port = free_port()
    (tmp_path / "lb.cfg").write_text(yaml.safe_dump(http_config(port, [echo.address], 1)))
    done = subprocess.run([*PYLB, "-D", "-p", "run.pid", "-f", "lb.cfg"], cwd=tmp_path,
                          timeout=20, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pidfile = tmp_path / "run.pid"
    assert wait_until(pidfile.exists, 5)
    pid = int(pidfile.read_text())
    try:
        master = psutil.Process(pid)
        assert " ".join(master.cmdline()).strip() == "pylb: master [lb.cfg]"
        assert master.ppid() == 1 or master.ppid() != os.getpid()  # detached from us
        assert wait_until(lambda: len(workers_of(pid)) == 1, 10)
        assert wait_until(lambda: _answers(port), 10)
        assert get(port)["server"] == "daemon"
    finally:
        os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not psutil.pid_exists(pid) or
                      psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10)
    assert not pidfile.exists()


def test_daemon_workers_keep_dev_null_on_0_1_2_and_the_log_file_works(tmp_path: Path, backends):
    """A daemon's workers receive their sockets and shared memory as descriptors: those
    must not land on 0, 1 or 2 (a stray print would write into them), and the log file
    opened before daemonizing must not be left writing to a reused descriptor."""
    echo = backends.echo("daemon")
    port = free_port()
    cfg = http_config(port, [echo.address], 2)
    cfg["global"]["log"] = "pylb.log"
    (tmp_path / "lb.cfg").write_text(yaml.safe_dump(cfg))
    done = subprocess.run([*PYLB, "-D", "-p", "run.pid", "-f", "lb.cfg"], cwd=tmp_path,
                          timeout=20, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pidfile = tmp_path / "run.pid"
    assert wait_until(pidfile.exists, 5)
    pid = int(pidfile.read_text())
    try:
        master = psutil.Process(pid)
        assert wait_until(lambda: len(workers_of(pid)) == 2, 10)
        assert wait_until(lambda: _answers(port), 10)
        for process in [master, *master.children()]:
            for fd in (0, 1, 2):
                assert os.readlink(f"/proc/{process.pid}/fd/{fd}") == "/dev/null", process
        assert all(get(port)["server"] == "daemon" for _ in range(10))
        assert wait_until(lambda: "generation 1 ready" in (tmp_path / "pylb.log").read_text(),
                          5)
    finally:
        os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not psutil.pid_exists(pid) or
                      psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10)


def _answers(port: int) -> bool:
    try:
        get(port)
        return True
    except (OSError, AssertionError):
        return False


@pytest.mark.parametrize("flag, sig", [("-sf", signal.SIGUSR1), ("-st", signal.SIGTERM)])
def test_old_pids_are_signalled_once_ready(pylb, backends, flag, sig):
    echo = backends.echo()
    # A stand-in for the old pylb: exits 7 on the signal it should receive.
    old = subprocess.Popen([sys.executable, "-c", "import signal,sys,time\n"
                            f"signal.signal({int(sig)}, lambda *a: sys.exit(7))\n"
                            "print('armed', flush=True)\ntime.sleep(30)"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert old.stdout is not None and old.stdout.readline() == "armed\n"
        lb = pylb(http_config(free_port(), [echo.address], 1), flag, str(old.pid))
        assert old.wait(10) == 7
        lb.wait_log(rf"sent {signal.Signals(sig).name} to old process {old.pid}", 5)
    finally:
        old.kill()
