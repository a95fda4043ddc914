"""Failing sequences the chaos run found, replayed step by step (no Hypothesis).

Each test says which run found it (the short run of test_chaos.py, or `bench/chaos.py
--seed S`), then replays the smallest sequence that shows the bug, with fixed inputs. All
were fixed (554f5d6, 3679664, effc7e9, and the last one with the move of tunnels) and
stay as regression tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from backends import WS_GREETING, HttpConn, build_request, free_port, stats_command
from conftest import REPO
from test_limits import CountingServer

from .harness import World


def _config(port: int, server: CountingServer, sock: Path, **global_: Any) -> dict[str, Any]:
    return {
        "global": {"workers": 2, "stats": {"socket": str(sock), "level": "admin",
                                           "expose-fd": "listeners"}, **global_},
        "defaults": {"timeout": {"queue": "5s"}},
        "frontends": {"www": {"bind": f"127.0.0.1:{port}", "default_backend": "app"}},
        "backends": {"app": {"servers": {"s1": {"address": server.address, "maxconn": 1}}}},
    }


def test_a_request_queued_when_the_master_dies_is_served(pylb, tmp_path: Path) -> None:
    """Found by the short run (its `kill-master` step, the `queued` clients waiting for
    the counting server's slots) and by bench/chaos.py at nearly every master kill.

    A request waiting for a server slot (`maxconn`) is in flight: when the master dies,
    the orphaned worker finishes what is in flight, so it must be served. It waited for a
    grant from the dead master instead, until `timeout queue` (503) or the client gave up.
    """
    server = CountingServer("s1", delay=1.0)
    try:
        port = free_port()
        lb = pylb(_config(port, server, tmp_path / "lb.sock"))
        first = HttpConn(port, timeout=10)
        first.send(build_request("GET", "/first"))
        assert server.wait_in_flight(1)
        queued = HttpConn(port, timeout=10)
        queued.send(build_request("GET", "/queued"))
        time.sleep(0.3)  # it is in the queue now (the server is busy with /first)
        os.kill(lb.pid, signal.SIGKILL)
        assert first.read_response().status == 200
        began = time.monotonic()
        try:
            status: Any = queued.read_response().status
        except Exception as exc:  # what the client saw, for the message
            status = repr(exc)
        waited = time.monotonic() - began
        assert status == 200 and waited < 3, (
            f"the queued request got {status} after {waited:.1f}s; pylb said:\n"
            + lb.output())
        first.close()
        queued.close()
    finally:
        server.stop()


def test_a_stalled_handover_client_does_not_take_the_server_slots(pylb, tmp_path: Path) -> None:
    """Found by bench/chaos.py (step `stall handover`). A client of the stats socket that
    sends `_handover` and then neither reads nor closes (a takeover that hangs, or a
    script gone wrong) must not stop requests for a limited server from being served: the
    master sent every slot request to it, and they all got 503 at `timeout queue`."""
    server = CountingServer("s1", delay=0.05)
    try:
        port = free_port()
        sock_path = tmp_path / "lb.sock"
        lb = pylb(_config(port, server, sock_path))
        with HttpConn(port, timeout=5) as conn:
            assert conn.request("GET", "/before").status == 200
        stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(str(sock_path))
        stalled.sendall(b"_handover\n")
        time.sleep(0.3)
        outcomes: list[Any] = []

        def client(i: int) -> None:
            try:
                with HttpConn(port, timeout=8) as conn:
                    outcomes.append(conn.request("GET", f"/after{i}").status)
            except Exception as exc:
                outcomes.append(repr(exc))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(12)
        stalled.close()
        assert outcomes == [200, 200, 200], (outcomes, lb.output())
    finally:
        server.stop()


def test_chaos_replay_kill_master_with_queued_clients(tmp_path: Path) -> None:
    """The short run's first failing sequence, on the chaos world: start under load,
    `kill -9` of the master, restart; the requests the orphaned workers had queued are
    answered within the clients' timeout."""
    world = World(tmp_path / "world", seed=0)
    try:
        world.start()
        world.step_kill_master()
        # the orphaned workers' queued requests: answered within the clients' timeout
        deadline = time.monotonic() + 9
        while time.monotonic() < deadline and not world.ledger.failures:
            time.sleep(0.2)
        world.check()
    finally:
        world.close()


def test_a_takeover_that_renames_a_limited_server_serves_the_old_process_requests(
    pylb, tmp_path: Path
) -> None:
    """Found by bench/chaos.py --seed 6 (step `takeover (rename server s4 -> s7)`, s4 with
    a `maxconn`): requests of the old process for a server the new configuration renamed
    (or removed) got 503 at once. In a reload the slot keeper keeps such servers, retired,
    for the older generation; after `-sf` the new process answers the old process's
    acquires for a server it does not know with "no server".

    Here: s1 (maxconn 1) busy with one request and a second one queued in the old process;
    `pylb -D -sf OLD` with s1 renamed s9 (same address). Both must be answered 200."""
    server = CountingServer("s1", delay=1.0)
    pids: list[int] = []
    try:
        port = free_port()
        cfg = _config(port, server, tmp_path / "lb.sock")
        lb = pylb(cfg)
        first = HttpConn(port, timeout=10)
        first.send(build_request("GET", "/first"))
        assert server.wait_in_flight(1)
        queued = HttpConn(port, timeout=10)
        queued.send(build_request("GET", "/queued"))
        time.sleep(0.2)  # queued in the old process
        servers = cfg["backends"]["app"]["servers"]
        servers["s9"] = servers.pop("s1")
        lb.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        pidfile = tmp_path / "new.pid"
        done = subprocess.run(
            [sys.executable, str(REPO / "bin" / "pylb"), "-f", str(lb.config_path), "-p",
             str(pidfile), "-D", "-sf", str(lb.pid)],
            cwd=lb.workdir, capture_output=True, text=True, timeout=20)
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 10
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        pids.append(int(pidfile.read_text()))
        statuses = []
        for conn in (first, queued):
            try:
                statuses.append(conn.read_response().status)
            except Exception as exc:
                statuses.append(repr(exc))
            conn.close()
        assert statuses == [200, 200], (statuses, lb.output())
    finally:
        server.stop()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def test_a_request_waiting_to_be_accepted_when_the_master_dies_is_served(
    pylb, backends, tmp_path: Path
) -> None:
    """Found by the short run (then seed 20261101, first world, step 6 `kill-master`): a
    connection-per-request client that connected and sent its request just before the
    master's `kill -9` got the connection closed with no answer, 2 ms later. The orphaned
    workers close their listening sockets at once (so that a new pylb can bind), and what
    waits in the kernel's accept queue, already sent by the client, is reset with them.

    Made deterministic with a frontend `maxconn: 1`: A holds the one place (an idle
    keep-alive connection), B connects and sends its request, and waits for the place.
    When the master dies, A is idle (the orphan may close it), and B's request is in
    flight: it must be answered."""
    echo = backends.echo("s1")
    port = free_port()
    lb = pylb({
        "global": {"workers": 1},
        "frontends": {"www": {"bind": f"127.0.0.1:{port}", "default_backend": "app",
                              "maxconn": 1}},
        "backends": {"app": {"servers": {"s1": {"address": echo.address}}}},
    })
    a = HttpConn(port, timeout=5)
    assert a.request("GET", "/a").status == 200
    b = HttpConn(port, timeout=5)
    b.send(build_request("GET", "/b"))
    time.sleep(0.3)  # B waits for A's place
    os.kill(lb.pid, signal.SIGKILL)
    try:
        status: Any = b.read_response().status
    except Exception as exc:
        status = repr(exc)
    a.close()
    b.close()
    assert status == 200, (status, lb.output())


def test_a_worker_respawned_after_a_takeover_and_reloads_starts(tmp_path: Path) -> None:
    """Found by the short run (seed 20261119, fifth world, 29 steps), reduced to: a stick
    table; a `-sf` takeover by a daemon; a reload; a reload that removes the stick table;
    `kill -9` of a worker. It is never replaced: each new one is "killed by signal 9"
    150 ms after its start, with a growing delay ("keeps dying: next start in 8.0s").
    Fails without load too, and every time.

    What its master sends it: the hello's SCM_RIGHTS carry, as the shared memory, the
    descriptor number of the generation's segment (4), which by then is the new worker's
    own control socket (traced: `sendmsg on 4 fds [(5, socket), (6, socket), (4,
    socket)]`, `memfd_create(pylb-shared) = 4` at the last reload, no os.close of it
    since): the segment's descriptor was closed behind the master's back and its number
    reused. The worker cannot map it, its channel ends, and the master kills it.

    The steps are the chaos world's, with the inputs the run drew."""
    world = World(tmp_path / "world", seed=0)
    try:
        world.start(load=False)
        world.step_reload("socket", "stick", 269)  # stick table 1k
        world.step_takeover("maxconn", 402)  # pylb -D -sf OLD
        world.step_reload("SIGHUP", "none", 0)
        world.step_reload("SIGHUP", "stick", 183)  # the stick table goes
        world.check()
        world.step_kill_worker(0)  # "no replacement accepts within 10 s"
        world.check()
    finally:
        world.close()


def test_a_takeover_that_drops_a_map_starts(tmp_path: Path) -> None:
    """Found by the short run with PYLB_CHAOS_SEED=20261125 (step 21 `takeover (map rule
    off)`) and 20261116 (`takeover (stick table off)`), reduced to: a map in use, then
    `pylb -D -sf OLD` with a configuration without it. The new process never becomes
    ready: each of its workers is "killed by signal 9" some 150 ms after its start and
    replaced at once, over and over (a tight loop since ed9c87c: the master's own SIGKILL
    counts as a kill from outside), the old process serves on and is never told to stop,
    and the new one stays until killed. The same with a stick table whose shape changes
    (size 1k -> 2k) or that goes. Fails without load too, and every time; a reload with
    the same change works. Probably the same stale descriptor as the next test: the
    inherited memfd the new configuration does not use."""
    world = World(tmp_path / "world", seed=0)
    try:
        world.start(load=False)
        world.step_reload("SIGHUP", "map", 0)  # map rule on
        world.step_takeover("map", 0)  # map rule off: "the new pylb never said it was ready"
        world.check()
    finally:
        world.close()


class LateServer:
    """One connection: reads a request head, answers `parts` only once `release` is set
    (0.2 s between two), then echoes whatever comes (a tunnel's other end)."""

    def __init__(self, *parts: bytes) -> None:
        self.parts = parts
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.got_request = threading.Event()
        self.release = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                if not (data := conn.recv(4096)):
                    return
                head += data
            self.got_request.set()
            self.release.wait(20)
            for i, part in enumerate(self.parts):
                if i:
                    time.sleep(0.2)
                conn.sendall(part)
            with contextlib.suppress(OSError):
                while data := conn.recv(65536):
                    conn.sendall(data)

    def close(self) -> None:
        self.listener.close()




@pytest.mark.parametrize("kind", ["upgrade", "response"])
def test_an_answer_that_comes_after_a_second_reload_reaches_its_client(
    pylb, tmp_path: Path, kind: str
) -> None:
    """Found by the short run (the `slow` client's `?delay=0.2` request, `end of stream`
    at a `reload (remove server s2)` or `(rename server s1 -> s4)` 0.1 s after another
    reload; also with the harness of 87b42ff), reduced to: a request waits for its answer
    in generation 1; a reload (2); a reload (3) whose configuration renames the request's
    server; then the answer comes: a 101 (a WebSocket tunnel begins) or a response head.

    Generation 1 stays for the request, and was told at reload 2 what generation 2 takes
    (lb.handover.accepts, then sent once with the soft stop). When the answer came it
    handed the tunnel (or the response being relayed) over by that, the master gave it to
    the newest generation (3), which has no server app/s1: "tunnel for app/s1 not taken by
    frontend www: closed", and the client saw the end of the stream. Now it stays in
    generation 1 (`show proc`: "server app/s1 is gone") and goes on there: stopping
    workers hear of every newer generation, and the master sends back what the newest
    one cannot take."""
    if kind == "upgrade":
        request = (b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\n\r\n")
        parts = [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\n\r\n" + WS_GREETING]
        expected = WS_GREETING + b"ping\n"  # after the head
    else:  # the head and the body's first bytes, the rest 0.2 s later
        request = b"GET /late HTTP/1.1\r\nHost: t\r\n\r\n"
        parts = [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe", b"llo"]
        expected = b"hello"
    late = LateServer(*parts)
    sock_path = tmp_path / "lb.sock"
    port = free_port()
    cfg: dict[str, Any] = {
        "global": {"workers": 1, "stats": {"socket": str(sock_path), "level": "admin"}},
        "defaults": {"timeout": {"connect": "2s", "client": "20s", "server": "20s",
                                 "tunnel": "20s"}},
        "frontends": {"www": {"bind": f"127.0.0.1:{port}", "default_backend": "app"}},
        "backends": {"app": {"servers": {"s1": {"address": late.address}}}},
    }
    lb = pylb(cfg)
    try:
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sendall(request)
        assert late.got_request.wait(10)
        assert stats_command(sock_path, "reload", 20).startswith("Success=1"), lb.output()
        cfg["backends"]["app"]["servers"] = {"s9": {"address": late.address}}
        lb.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        assert stats_command(sock_path, "reload", 20).startswith("Success=1"), lb.output()
        late.release.set()
        got = bytearray()
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in got and (data := client.recv(65536)):
                got += data
            head, _, rest = bytes(got).partition(b"\r\n\r\n")
            while len(rest) < len(expected) - len(b"ping\n" * (kind == "upgrade")) and (
                    data := client.recv(65536)):
                rest += data
            if kind == "upgrade" and rest == WS_GREETING:
                client.sendall(b"ping\n")
                while len(rest) < len(expected) and (data := client.recv(65536)):
                    rest += data
        client.close()
        assert head.split(b" ")[1:2] == [parts[0].split(b" ")[1]] and rest == expected, (
            f"got {head!r}, then {rest!r} instead of {expected!r}; pylb said:\n"
            + lb.output())
    finally:
        late.release.set()
        late.close()
