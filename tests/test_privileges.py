"""Least privilege against real pylb processes started as root: workers as `nobody`
(real, effective and saved ids, no supplementary groups, no capabilities, NoNewPrivs),
in a chroot, still serving through reloads (one adding a bind on port 81), takeovers and
respawns, with a map and a certificate only root can read; the master keeping only the
capabilities it names; the stats socket's owner and mode; configuration errors.

Everything is read from /proc/PID/status and /proc/PID/root, as an auditor would. These
tests need root (CI runs as root); elsewhere they are skipped, and only there.
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import socket
import ssl
import stat
from pathlib import Path
from typing import Any

import psutil
import pytest
import trustme
import yaml
from backends import HOST, HttpConn, free_port, stats_command, wait_until, workers_of
from conftest import refused
from test_reload import Reloader
from test_takeover import start_daemon, terminate

from lb import privileges

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")

NOBODY = pwd.getpwnam("nobody")
SOCK = "lb.sock"
NAME = "www.example.test"
# what the master keeps: net_bind_service, kill, setgid, setuid, sys_chroot
MASTER_CAPS = sum(1 << cap for cap in privileges.MASTER_KEEPS)


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as file:
        return dict(line.rstrip("\n").split(":\t", 1) for line in file if ":\t" in line)


def assert_unprivileged(pid: int, root: Path | None = None) -> None:
    """A worker as an auditor sees it: nobody's ids everywhere, no groups, no
    capabilities, no new privileges, and its root."""
    proc = status(pid)
    ids = f"{NOBODY.pw_uid}\t{NOBODY.pw_uid}\t{NOBODY.pw_uid}\t{NOBODY.pw_uid}"
    assert proc["Uid"] == ids, proc["Uid"]
    gids = f"{NOBODY.pw_gid}\t{NOBODY.pw_gid}\t{NOBODY.pw_gid}\t{NOBODY.pw_gid}"
    assert proc["Gid"] == gids, proc["Gid"]
    assert proc["Groups"].strip() == "", proc["Groups"]
    assert proc["NoNewPrivs"] == "1"
    for name in ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"):
        assert int(proc[name], 16) == 0, (name, proc[name])
    if root is not None:
        assert os.readlink(f"/proc/{pid}/root") == str(root)


def config(tmp: Path, servers: list[str], **global_: Any) -> dict[str, Any]:
    maps = tmp / "hosts.map"
    maps.write_text(f"{NAME} app\n")
    maps.chmod(0o600)  # only root reads it: the master passes it on
    return {
        "global": {"workers": 2, "user": "nobody",
                   "stats": {"socket": SOCK, "level": "admin", "expose-fd": "listeners"},
                   **global_},
        "defaults": {"timeout": {"connect": "2s", "client": "10s", "server": "10s"}},
        "maps": {"hosts": str(maps)},
        "frontends": {"www": {
            "bind": f"{HOST}:{free_port()}",
            "http-request": ["set-header X-Site %[hdr(host),map(hosts,none)]"],
            "default_backend": "app",
        }},
        "backends": {
            "app": {"servers": {f"s{i}": {"address": a} for i, a in enumerate(servers, 1)}},
        },
    }


def port_of(cfg: dict[str, Any], frontend: str = "www") -> int:
    bind = cfg["frontends"][frontend]["bind"]
    bind = bind[0] if isinstance(bind, list) else bind
    return int(str(bind).rsplit(":", 1)[1])


def site(port: int) -> str:
    """What the root-only map gave the request (X-Site, as the server received it)."""
    with HttpConn(port) as conn:
        resp = conn.request("GET", "/", headers={"Host": NAME, "Connection": "close"})
    assert resp.status == 200
    return next(v for k, v in resp.json()["headers"] if k.lower() == "x-site")


def test_workers_run_as_nobody_and_serve_through_reloads_and_respawns(pylb, backends,
                                                                       tmp_path):
    echo = backends.echo("s1")
    cfg = config(tmp_path, [echo.address])
    lb = pylb(cfg)
    for worker in lb.workers():
        assert_unprivileged(worker.pid)
    assert site(port_of(cfg)) == "app"  # from the map only root can read
    # the master: uid 0 with the capabilities it uses later, and no other
    master = status(lb.pid)
    assert master["Uid"].split("\t")[0] == "0"
    assert int(master["CapEff"], 16) == MASTER_CAPS
    assert int(master["CapBnd"], 16) == MASTER_CAPS
    assert "the master keeps cap_net_bind_service, cap_setuid" in lb.output()
    # the worker template: root, but with only what its workers need to drop everything
    template = status(next(p for p in psutil.Process(lb.pid).children()
                           if "template" in " ".join(p.cmdline())).pid)
    assert int(template["CapEff"], 16) == sum(1 << c for c in privileges.TEMPLATE_KEEPS)

    # a reload that adds a bind on port 81 (privileged): the master binds it
    cfg["frontends"]["www"]["bind"] = [cfg["frontends"]["www"]["bind"], f"{HOST}:81"]
    lb.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    reload = Reloader(lb)
    reload("SIGHUP")
    assert site(81) == "app" and site(port_of(cfg)) == "app"
    assert wait_until(lambda: len(lb.workers()) == 2, 10)
    for worker in lb.workers():
        assert_unprivileged(worker.pid)
    # the map file changes (still root's alone): the reload reads it
    (tmp_path / "hosts.map").write_text("")
    reload("socket")
    assert site(81) == "none"

    # a worker killed: its replacement drops everything too
    victim = lb.workers()[0].pid
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: len(lb.workers()) == 2 and victim not in
                      {p.pid for p in lb.workers()}, 10)
    for worker in lb.workers():
        assert_unprivileged(worker.pid)


def test_workers_in_a_chroot(pylb, backends, tmp_path):
    jail = tmp_path / "jail"
    jail.mkdir()
    echo = backends.echo("s1")
    # a server by name: resolved before the chroot, which has no /etc/hosts
    by_name = echo.address.replace(HOST, "localhost")
    cfg = config(tmp_path, [by_name], chroot=str(jail))
    lb = pylb(cfg)
    for worker in lb.workers():
        assert_unprivileged(worker.pid, jail)
    assert site(port_of(cfg)) == "app"
    Reloader(lb)("SIGUSR2")
    assert wait_until(lambda: len(lb.workers()) == 2, 10)
    for worker in lb.workers():
        assert_unprivileged(worker.pid, jail)
    assert site(port_of(cfg)) == "app"


def test_tls_with_a_key_only_root_reads(pylb, backends, tmp_path):
    ca = trustme.CA()
    pem = tmp_path / "site.pem"
    ca.issue_cert(NAME).private_key_and_cert_chain_pem.write_to_path(str(pem))
    pem.chmod(0o600)
    echo = backends.echo("s1")
    cfg = config(tmp_path, [echo.address])
    port = free_port()
    cfg["frontends"]["www"]["bind"] = {"address": f"{HOST}:{port}", "ssl": True,
                                       "crt": str(pem)}
    lb = pylb(cfg)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)

    def tls_get() -> ssl.SSLSession:
        with socket.create_connection((HOST, port)) as raw, \
                ctx.wrap_socket(raw, server_hostname=NAME) as conn:
            conn.sendall(f"GET / HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
            assert conn.recv(12).startswith(b"HTTP/1.1 200")
            return conn.session

    tls_get()
    Reloader(lb)("SIGUSR2")  # the master reads the key again, as root
    tls_get()
    for worker in lb.workers():
        assert_unprivileged(worker.pid)


def test_a_takeover_with_unprivileged_workers(tmp_path, backends):
    echo = backends.echo("s1")
    cfg = config(tmp_path, [echo.address])
    (tmp_path / "lb.cfg").write_text(yaml.safe_dump(cfg, sort_keys=False))
    pids = [start_daemon(tmp_path)]
    try:
        assert site(port_of(cfg)) == "app"
        pids.append(start_daemon(tmp_path, "-x", str(tmp_path / SOCK), "-sf", str(pids[0])))
        assert site(port_of(cfg)) == "app"
        for worker in workers_of(pids[1]):
            assert_unprivileged(worker.pid)
    finally:
        terminate(pids)


def test_stats_socket_owner_and_mode(pylb, backends, tmp_path):
    echo = backends.echo("s1")
    cfg = config(tmp_path, [echo.address])
    cfg["global"]["stats"].update({"user": "nobody", "group": "nogroup", "mode": "640"})
    lb = pylb(cfg)
    info = os.stat(lb.workdir / SOCK)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (NOBODY.pw_uid, 0o640)
    assert stats_command(lb.workdir / SOCK, "show info").startswith("Name: pylb")
    # by default: 0600, root's
    del cfg["global"]["stats"]["user"], cfg["global"]["stats"]["group"]
    del cfg["global"]["stats"]["mode"]
    lb2 = pylb(cfg | {"frontends": {"www": {**cfg["frontends"]["www"],
                                            "bind": f"{HOST}:{free_port()}"}}})
    info = os.stat(lb2.workdir / SOCK)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o600)


@pytest.mark.parametrize(("global_", "message"), [
    ({"user": "no-such-user-here"},
     r"global\.user: no such user on this system: 'no-such-user-here'"),
    ({"group": "no-such-group-here"},
     r"global\.group: no such group on this system: 'no-such-group-here'"),
    ({"chroot": "/no/such/dir"}, r"global\.chroot: no such directory: '/no/such/dir'"),
    ({"chroot": "relative"}, r"global\.chroot: expected an absolute path"),
    ({"stats": {"socket": "s", "user": "no-such-user-here"}},
     r"global\.stats\.user: no such user on this system"),
])
def test_bad_identities_are_refused_with_file_line_and_key(tmp_path, global_, message):
    cfg = {"global": global_, "frontends": {"www": {"bind": f"{HOST}:{free_port()}"}}}
    error = refused(tmp_path, cfg)
    assert re.search(rf"lb\.cfg:\d+: {message}", error), error
