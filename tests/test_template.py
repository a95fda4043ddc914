"""The worker template (lb.template): workers of reloads and respawns are forked from it,
are the master's children, and hold exactly what a worker started as a new interpreter
holds; the template holds no listener; a template that dies is replaced, and meanwhile
workers start as new interpreters."""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
from backends import HttpConn, free_port, template_of, wait_until, workers_of
from test_faults import cli

HOST = "127.0.0.1"


def config(port: int, server: str, sock: Path) -> dict[str, Any]:
    return {
        "global": {"workers": 2, "stats": {"socket": str(sock), "level": "admin"}},
        "frontends": {"www": {"bind": f"{HOST}:{port}", "default_backend": "app"}},
        "backends": {"app": {"servers": {"s1": {"address": server}}}},
    }


def answers(port: int) -> bool:
    try:
        with HttpConn(port, timeout=5) as conn:
            return conn.request("GET", "/").status == 200
    except OSError:
        return False


def descriptors(pid: int) -> dict[int, str]:
    """fd -> what it is (readlink of /proc/PID/fd/N)."""
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            pass
    return found


def kinds(pid: int) -> Counter[str]:
    """What a process holds, by kind: sockets, pipes and anonymous inodes without their
    inode numbers, memfds by name."""
    return Counter(re.sub(r"\[\d+\]", "[]", target) for target in descriptors(pid).values())


def socket_inodes(pid: int) -> set[str]:
    return {t for t in descriptors(pid).values() if t.startswith("socket:")}


def generation_pids(lb: Any, generation: int) -> list[int]:
    """Pids of the workers of `generation`, from the master's log."""
    return [int(m[1]) for m in re.finditer(
        rf"worker \d+/2 gen {generation} started \(pid (\d+), ([a-z ]+)\)", lb.output())]


def reload_until_forked(lb: Any, tmp_path: Path) -> int:
    """Reload until a generation is forked from the template (it is ready once it has
    imported pylb, a few hundred milliseconds after the master starts it); that
    generation, once its log says it is ready (the socket's answer can come before the
    log line is read)."""
    mark = len(lb.lines)
    assert wait_until(lambda: cli(tmp_path, "reload").startswith("Success=1")
                      and "forked from the template" in "\n".join(lb.lines[mark:]), 10, 0.1)
    generation = int(lb.wait_log(r"gen (\d+) started \(pid \d+, forked from the template\)",
                                 start=mark).group(1))
    lb.wait_log(rf"generation {generation} ready", start=mark)
    return generation


def start(pylb: Any, backends: Any, tmp_path: Path) -> tuple[Any, int, Path]:
    echo = backends.echo("s1")
    port = free_port()
    sock = tmp_path / "lb.sock"
    lb = pylb(config(port, echo.address, sock))
    assert wait_until(lambda: answers(port), 10)
    assert wait_until(lambda: template_of(lb.pid) is not None, 10)
    lb.wait_log(r"generation 1 ready")
    return lb, port, sock


def test_reloaded_and_respawned_workers_are_forked_children_of_the_master(
        pylb, backends, tmp_path):
    lb, port, sock = start(pylb, backends, tmp_path)
    template = template_of(lb.pid)
    reload_until_forked(lb, tmp_path)
    mark = len(lb.lines)
    assert cli(tmp_path, "reload").startswith("Success=1")
    generation = int(lb.wait_log(r"reload \d+ done: generation (\d+)", start=mark).group(1))
    assert re.search(rf"worker 1/2 gen {generation} started \(pid \d+, forked", lb.output())
    assert wait_until(lambda: len(workers_of(lb.pid)) == 2, 10)  # the older ones left
    workers = workers_of(lb.pid)
    assert all(w.ppid() == lb.pid for w in workers)  # re-parented: reaped by the master
    assert template.ppid() == lb.pid
    assert answers(port)
    # a worker killed with -9 is replaced by a forked one, which serves
    victim = workers[0]
    mark = len(lb.lines)
    victim.send_signal(signal.SIGKILL)
    lb.wait_log(r"exited: killed by signal 9", start=mark)
    lb.wait_log(r"started \(pid \d+, forked from the template\)", start=mark)
    assert wait_until(lambda: len(workers_of(lb.pid)) == 2
                      and victim.pid not in [w.pid for w in workers_of(lb.pid)], 5)
    assert all(answers(port) for _ in range(5))


def test_the_template_holds_no_listener_and_a_forked_worker_holds_what_a_new_one_does(
        pylb, backends, tmp_path):
    lb, port, sock = start(pylb, backends, tmp_path)
    template = template_of(lb.pid)
    held = descriptors(template.pid)
    assert sorted(held) == [0, 1, 2, max(held)], held  # the standard streams, its socket
    assert held[max(held)].startswith("socket:")
    template_socket = held[max(held)]
    # its one socket is its end of the master's requests, not a listener of the master's
    listening = {os.readlink(f"/proc/{lb.pid}/fd/{fd}") for fd in
                 (c.fd for c in psutil.Process(lb.pid).net_connections("tcp")
                  if c.status == psutil.CONN_LISTEN)}
    assert listening and template_socket not in listening

    generation = reload_until_forked(lb, tmp_path)
    forked = generation_pids(lb, generation)
    assert len(forked) == 2
    forked_holds = kinds(forked[0])  # while it serves (a retiring one closes its listeners)
    for pid in forked:
        assert template_socket not in socket_inodes(pid)
    # compare with a generation of new interpreters: kill the template, reload at once
    template.send_signal(signal.SIGKILL)
    assert wait_until(lambda: not psutil.pid_exists(template.pid)
                      or template.status() == psutil.STATUS_ZOMBIE, 5)
    mark = len(lb.lines)
    assert cli(tmp_path, "reload").startswith("Success=1")
    lb.wait_log(rf"generation {generation + 1} ready", start=mark)
    restarted = generation_pids(lb, generation + 1)
    assert len(restarted) == 2
    assert re.search(rf"worker 1/2 gen {generation + 1} started \(pid \d+, new interpreter\)",
                     lb.output())
    assert kinds(restarted[0]) == forked_holds, (forked_holds, kinds(restarted[0]))
    # the master replaced its template, and forks from it again
    lb.wait_log(r"worker template restarted")
    assert wait_until(lambda: template_of(lb.pid) is not None
                      and template_of(lb.pid).pid != template.pid, 5)
    reload_until_forked(lb, tmp_path)
    assert answers(port)


def test_the_template_leaves_with_the_master(pylb, backends, tmp_path):
    lb, _port, _sock = start(pylb, backends, tmp_path)
    template = template_of(lb.pid)
    os.kill(lb.pid, signal.SIGKILL)
    assert wait_until(lambda: not psutil.pid_exists(template.pid)
                      or template.status() == psutil.STATUS_ZOMBIE, 5)


def test_a_stalled_template_costs_one_slow_reload_and_is_replaced(pylb, backends, tmp_path):
    lb, port, _sock = start(pylb, backends, tmp_path)
    reload_until_forked(lb, tmp_path)
    stalled = template_of(lb.pid)
    stalled.send_signal(signal.SIGSTOP)  # alive, but answers nothing
    mark = len(lb.lines)
    assert cli(tmp_path, "reload", timeout=30).startswith("Success=1")
    lb.wait_log(r"the worker template failed: starting worker 1 afresh", start=mark)
    lb.wait_log(r"worker 1/2 gen \d+ started \(pid \d+, new interpreter\)", start=mark)
    assert wait_until(lambda: not psutil.pid_exists(stalled.pid)
                      or stalled.status() == psutil.STATUS_ZOMBIE, 5)
    lb.wait_log(r"worker template restarted", start=mark)
    reload_until_forked(lb, tmp_path)
    assert answers(port)


def test_a_worker_forked_from_an_old_template_keeps_its_timeouts(pylb, backends, tmp_path):
    """The template was made long before the worker it forks (here: longer ago than
    `timeout http-request`). A keep-alive connection handed over to that worker at a
    reload gets its full timeout there, not one counted from the template's start."""
    echo = backends.echo("s1")
    port = free_port()
    cfg = config(port, echo.address, tmp_path / "lb.sock")
    cfg["defaults"] = {"timeout": {"http-request": "1s", "http-keep-alive": "1s"}}
    pylb(cfg)
    started = time.monotonic()
    with HttpConn(port, timeout=5) as conn:
        while time.monotonic() < started + 1.2:  # the template ages; the connection lives
            assert conn.request("GET", "/meanwhile").status == 200
            time.sleep(0.2)
        assert cli(tmp_path, "reload").startswith("Success=1")
        time.sleep(0.3)  # past the new worker's first sweeps, well within its timeout
        assert conn.request("GET", "/after").status == 200
