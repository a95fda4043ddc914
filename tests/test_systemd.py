"""systemd: the notify protocol as a real pylb speaks it, and the unit files in systemd/.

A datagram UNIX socket bound by the test stands for systemd: its name goes to pylb in
NOTIFY_SOCKET (a path, or `@name` for the abstract namespace), and the test reads what the
master says there: READY=1 with MAINPID and STATUS once the workers accept; on a reload
RELOADING=1 with MONOTONIC_USEC, then READY=1; STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from backends import HOST, HttpConn, free_port
from conftest import REPO

SOCK = "lb.sock"
UNITS = REPO / "systemd"
PYLB = str(REPO / "bin" / "pylb")


# -- the test's end of NOTIFY_SOCKET --------------------------------------------------------


class Notify:
    """A datagram socket playing systemd; `address` is what goes into NOTIFY_SOCKET."""

    def __init__(self, address: str, bind_to: str | bytes) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)

    def next(self, timeout: float = 10.0) -> dict[str, str]:
        """The next message, as its fields (one KEY=VALUE a line, in order)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"no notify message within {timeout}s")
        fields: dict[str, str] = {}
        for line in data.decode().split("\n"):
            key, sep, value = line.partition("=")
            assert sep and key, f"bad notify line {line!r} in {data!r}"
            fields[key] = value
        return fields

    def nothing(self, seconds: float) -> None:
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        pytest.fail(f"unexpected notify message {data!r}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "notify"
    if len(str(path)) > 100:  # sun_path is 108 bytes
        path = Path("/tmp") / f"pylb-notify-{uuid.uuid4().hex[:12]}"
    notify = Notify(str(path), str(path))
    # the pylb fixture hands the test's environment to pylb
    monkeypatch.setenv("NOTIFY_SOCKET", notify.address)
    yield notify
    notify.close()
    path.unlink(missing_ok=True)


@pytest.fixture
def notify_abstract(monkeypatch: pytest.MonkeyPatch):
    name = f"pylb-test-{uuid.uuid4().hex}"
    notify = Notify("@" + name, b"\0" + name.encode())
    monkeypatch.setenv("NOTIFY_SOCKET", notify.address)
    yield notify
    notify.close()


def config(backend_address: str, port: int) -> dict[str, Any]:
    return {
        "global": {"workers": 2, "stats": {"socket": SOCK, "level": "admin"}},
        "defaults": {"mode": "http"},
        "frontends": {"www": {"bind": f"{HOST}:{port}", "default_backend": "app"}},
        "backends": {"app": {"servers": {"s1": {"address": backend_address}}}},
    }


def cli(lb: Any, line: str, timeout: float = 30.0) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(lb.workdir / SOCK))
        s.sendall(line.encode() + b"\n")
        out = bytearray()
        while data := s.recv(65536):
            out += data
    return out.decode()


def now_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def expect_ready(notify: Notify, lb: Any, generation: int) -> dict[str, str]:
    ready = notify.next()
    assert ready.get("READY") == "1", ready
    assert ready.get("MAINPID") == str(lb.pid), ready
    assert ready.get("STATUS", "").startswith(f"generation {generation}"), ready
    return ready


def expect_reloading(notify: Notify, before: int) -> dict[str, str]:
    reloading = notify.next()
    after = now_usec()
    assert reloading.get("RELOADING") == "1", reloading
    assert "READY" not in reloading, reloading
    usec = int(reloading["MONOTONIC_USEC"])
    # stamped when the reload began: after the test asked for it, before the test read it
    assert before <= usec <= after, (before, usec, after)
    return reloading


def get(port: int) -> int:
    with HttpConn(port) as conn:
        return conn.request("GET", "/").status


# -- the protocol ------------------------------------------------------------------------------


def test_ready_reloading_ready_stopping(pylb, backends, notify_path):
    echo = backends.echo("s1")
    port = free_port()
    lb = pylb(config(echo.address, port))
    expect_ready(notify_path, lb, 1)
    assert get(port) == 200

    # SIGHUP, as Type=notify-reload sends it: RELOADING=1 first, READY=1 when done
    before = now_usec()
    mark = len(lb.lines)
    lb.signal(signal.SIGHUP)
    expect_reloading(notify_path, before)
    expect_ready(notify_path, lb, 2)
    lb.wait_log(r"reload 1 done: generation 2", 5, start=mark)
    assert get(port) == 200

    # SIGUSR2 (Type=notify with ExecReload=kill -USR2) says the same
    before = now_usec()
    lb.signal(signal.SIGUSR2)
    expect_reloading(notify_path, before)
    expect_ready(notify_path, lb, 3)

    # an invalid configuration: still RELOADING=1 then READY=1, the STATUS says it failed
    good = lb.config_path.read_text()
    lb.config_path.write_text(good.replace("    bind: ", "    bnd: ", 1))
    before = now_usec()
    mark = len(lb.lines)
    lb.signal(signal.SIGHUP)
    expect_reloading(notify_path, before)
    ready = notify_path.next()
    assert ready.get("READY") == "1", ready
    assert re.match(r"reload failed: .*frontends\.www\.bnd: unknown key", ready.get("STATUS", "")),\
        ready
    lb.wait_log(r"reload failed", 5, start=mark)
    assert get(port) == 200
    notify_path.nothing(0.2)

    lb.signal(signal.SIGTERM)
    stopping = notify_path.next()
    assert stopping.get("STOPPING") == "1", stopping
    assert lb.proc.wait(10) == 0


def test_reload_command_notifies_too(pylb, backends, notify_path):
    echo = backends.echo("s1")
    lb = pylb(config(echo.address, free_port()))
    expect_ready(notify_path, lb, 1)
    before = now_usec()
    assert cli(lb, "reload").startswith("Success=1\n")
    expect_reloading(notify_path, before)
    expect_ready(notify_path, lb, 2)


def test_abstract_namespace_socket(pylb, backends, notify_abstract):
    echo = backends.echo("s1")
    port = free_port()
    lb = pylb(config(echo.address, port))
    expect_ready(notify_abstract, lb, 1)
    before = now_usec()
    mark = len(lb.lines)
    lb.signal(signal.SIGHUP)
    expect_reloading(notify_abstract, before)
    expect_ready(notify_abstract, lb, 2)
    lb.wait_log(r"reload 1 done: generation 2", 5, start=mark)
    assert get(port) == 200
    lb.signal(signal.SIGTERM)
    assert notify_abstract.next().get("STOPPING") == "1"
    assert lb.proc.wait(10) == 0


# -- the unit files ------------------------------------------------------------------------


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in order: repeated keys (ExecReload) each keep their line."""
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       comment_prefixes=("#", ";"), delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep case
    parser.read_string(path.read_text())  # parses as an INI file at all
    entries = []
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
        assert parser.has_option(section, key.strip())
    return entries


def values(entries: list[tuple[str, str, str]], section: str, key: str) -> list[str]:
    return [v for s, k, v in entries if (s, k) == (section, key)]


def one(entries: list[tuple[str, str, str]], section: str, key: str) -> str:
    found = values(entries, section, key)
    assert len(found) == 1, f"[{section}] {key}: {found}"
    return found[0]


CHECK = "/usr/bin/pylb -c -q -f $CONFIG"
START = "/usr/bin/pylb -f $CONFIG -p /run/pylb/pylb.pid"


def test_notify_reload_unit_keys():
    entries = unit_entries(UNITS / "pylb.service")
    assert one(entries, "Service", "Type") == "notify-reload"
    assert one(entries, "Service", "Environment") == "CONFIG=/etc/pylb/lb.cfg"
    assert one(entries, "Service", "ExecStartPre") == CHECK
    assert one(entries, "Service", "ExecStart") == START  # foreground: no -D
    assert one(entries, "Service", "ReloadSignal") == "SIGHUP"
    assert one(entries, "Service", "KillMode") == "mixed"
    assert one(entries, "Service", "Restart") == "on-failure"
    assert values(entries, "Service", "ExecReload") == []  # the signal is the reload
    assert one(entries, "Install", "WantedBy") == "multi-user.target"


def test_notify_unit_keys():
    entries = unit_entries(UNITS / "pylb-notify.service")
    assert one(entries, "Service", "Type") == "notify"
    assert one(entries, "Service", "Environment") == "CONFIG=/etc/pylb/lb.cfg"
    assert one(entries, "Service", "ExecStartPre") == CHECK
    assert one(entries, "Service", "ExecStart") == START
    assert values(entries, "Service", "ExecReload") == [CHECK, "/bin/kill -USR2 $MAINPID"]
    assert values(entries, "Service", "ReloadSignal") == []
    assert one(entries, "Service", "KillMode") == "mixed"
    assert one(entries, "Service", "Restart") == "on-failure"
    assert one(entries, "Install", "WantedBy") == "multi-user.target"


def _systemd_version(tool: str) -> int:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=10).stdout
    found = re.match(r"systemd (\d+)", out)
    return int(found.group(1)) if found else 0


# what systemd before 253 says of the keys it does not know yet
OLD_SYSTEMD = (
    r"Failed to parse service type, ignoring: notify-reload",
    r"Unknown (key|key name|lvalue) '?ReloadSignal'? in section '?\[?Service\]?'?, ignoring",
)


@pytest.mark.parametrize("unit", ["pylb.service", "pylb-notify.service"])
def test_unit_file_verifies(unit, tmp_path):
    """`systemd-analyze verify` when the machine has it; the keys are checked above in any
    case. /usr/bin/pylb is this checkout's bin/pylb when pylb is not installed."""
    entries = unit_entries(UNITS / unit)  # parses everywhere
    assert one(entries, "Service", "Type") in ("notify", "notify-reload")
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return
    text = (UNITS / unit).read_text()
    if not os.access("/usr/bin/pylb", os.X_OK):
        text = text.replace("/usr/bin/pylb", PYLB)
    copy = tmp_path / unit
    copy.write_text(text)
    done = subprocess.run([tool, "verify", "--man=no", str(copy)], capture_output=True,
                          text=True, timeout=60)
    output = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    version = _systemd_version(tool)
    unexplained = [
        line for line in output
        if not (version < 253 and any(re.search(p, line) for p in OLD_SYSTEMD))
    ]
    assert done.returncode == 0 and unexplained == [], \
        f"systemd {version}: exit {done.returncode}\n" + "\n".join(output)


def test_unit_check_command_runs(tmp_path):
    """ExecStartPre (and ExecReload's first line): `pylb -c -q -f $CONFIG` says nothing and
    exits 0 for a valid file, exits 1 with the reason for an invalid one."""
    good = tmp_path / "lb.cfg"
    good.write_text(yaml.safe_dump(config(f"{HOST}:9", free_port())))
    command = CHECK.replace("/usr/bin/pylb", PYLB).split()
    done = subprocess.run([sys.executable, *[good if w == "$CONFIG" else w for w in command]],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    bad = tmp_path / "bad.cfg"
    bad.write_text(good.read_text().replace("    bind: ", "    bnd: ", 1))
    done = subprocess.run([sys.executable, *[bad if w == "$CONFIG" else w for w in command]],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert done.returncode == 1
    assert re.search(r"bad\.cfg:\d+: frontends\.www\.bnd: unknown key", done.stderr), done.stderr
