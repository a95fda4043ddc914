"""The unit files in systemd/ run pylb with least privilege (issue 16), and still reload.

Nothing is started: systemd's own tools read the files. `systemd-analyze verify` parses
them, `systemd-analyze security --offline=true` scores them as it would an installed unit
("OK" or better: an exposure below 5.0), with the README's unprivileged drop-in too, and
`systemd-sysusers --dry-run` reads pylb.sysusers. The keys the sandbox is made of are
checked one by one, as are those the reloads (docs/reload.md) depend on. These tests need
Debian's systemd package (it has all three tools) and fail without it: no root needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

UNITS = REPO / "systemd"
BOTH = ["pylb.service", "pylb-notify.service"]
PYLB = str(REPO / "bin" / "pylb")
CHECK = "/usr/bin/pylb -c -q -f $CONFIG"
START = "/usr/bin/pylb -f $CONFIG -p /run/pylb/pylb.pid"

# the sandbox: each key once, with this value, in both units
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "PrivateMounts": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallErrorNumber": "EPERM",
    "RuntimeDirectory": "pylb",
    "RuntimeDirectoryMode": "0755",
    "LogsDirectory": "pylb",
    "UMask": "0077",
    "KillMode": "mixed",
}
# what the master needs at start (lb.privileges, lb.runtime.server): no more
CAPABILITIES = {"CAP_NET_BIND_SERVICE", "CAP_CHOWN", "CAP_SETPCAP", "CAP_SETUID", "CAP_SETGID",
                "CAP_SYS_CHROOT", "CAP_KILL"}
# what pylb cannot do with (systemd/README.md, "Privileges")
NOT_SET = ["MemoryDenyWriteExecute", "ProcSubset", "PrivateNetwork", "PrivateUsers",
           "IPAddressDeny", "User", "DynamicUser", "AmbientCapabilities"]
# `systemd-analyze security` checks the units must pass (JSON names)
PASSED = [
    "NoNewPrivileges=", "ProtectSystem=", "ProtectHome=", "PrivateTmp=", "PrivateDevices=",
    "PrivateMounts=", "ProtectKernelTunables=", "ProtectKernelModules=", "ProtectKernelLogs=",
    "ProtectControlGroups=", "ProtectClock=", "ProtectHostname=", "ProtectProc=",
    "RestrictNamespaces=~user", "RestrictRealtime=", "RestrictSUIDSGID=", "LockPersonality=",
    "SystemCallArchitectures=", "SystemCallFilter=~@debug", "SystemCallFilter=~@module",
    "SystemCallFilter=~@raw-io", "SystemCallFilter=~@resources", "SystemCallFilter=~@clock",
    "RestrictAddressFamilies=~AF_PACKET", "RestrictAddressFamilies=~AF_NETLINK",
    "RestrictAddressFamilies=~…", "CapabilityBoundingSet=~CAP_SYS_ADMIN",
    "CapabilityBoundingSet=~CAP_SYS_PTRACE", "CapabilityBoundingSet=~CAP_(DAC_*|FOWNER|IPC_OWNER)",
    "CapabilityBoundingSet=~CAP_NET_ADMIN", "UMask=", "NotifyAccess=",
]
OVERALL = re.compile(r"Overall exposure level for (\S+): (\d+\.\d+) (\w+)")
GOOD_LEVELS = ("OK", "SAFE", "PERFECT")  # exposure below 5.0, below 1.0, 0
# what systemd before 253 says of the keys it does not know yet
OLD_SYSTEMD = (
    r"Failed to parse service type, ignoring: notify-reload",
    r"Unknown (key|key name|lvalue) '?ReloadSignal'? in section '?\[?Service\]?'?, ignoring",
)


def tool(name: str) -> str:
    """A systemd tool's path: missing is a failure (CI's Debian has systemd), not a skip."""
    found = shutil.which(name) or shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
    assert found, f"{name} not found: these tests need Debian's systemd package"
    return found


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def systemd_version() -> int:
    found = re.match(r"systemd (\d+)", run(tool("systemd-analyze"), "--version").stdout)
    assert found, "systemd-analyze --version: no version"
    return int(found.group(1))


def service(path: Path) -> dict[str, list[str]]:
    """The [Service] section: each key's values, in order (a key may repeat)."""
    keys: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {raw!r}"
        if section == "[Service]":
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def one(keys: dict[str, list[str]], key: str) -> str:
    assert len(keys.get(key, [])) == 1, f"{key}: {keys.get(key)}"
    return keys[key][0]


def sandbox(path: Path) -> list[str]:
    """The unit's lines from its RuntimeDirectory on: what both units share."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("RuntimeDirectory="))
    start = max(i for i in range(start) if not lines[i].startswith("#")) + 1  # with comments
    return lines[start:lines.index("[Install]")]


def security(*args: str) -> tuple[float, str, dict[str, float | None], str]:
    """`systemd-analyze security --offline=true ARGS`: the figure, the level, each check's
    exposure (None: passed) and the overall line."""
    analyze = tool("systemd-analyze")
    done = run(analyze, "security", "--offline=true", "--threshold=49", *args)
    found = OVERALL.search(done.stdout)
    assert found, f"no overall exposure line:\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, f"exposure over 4.9 (exit {done.returncode}): {found.group(0)}"
    checks = json.loads(run(analyze, "security", "--offline=true", "--json=short", *args).stdout)
    return (float(found.group(2)), found.group(3), {c["name"]: c["exposure"] for c in checks},
            found.group(0))


# -- the files ------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", BOTH)
def test_sandbox_keys(unit):
    keys = service(UNITS / unit)
    for key, value in HARDENING.items():
        assert one(keys, key) == value, f"{unit}: {key}"
    assert one(keys, "RestrictAddressFamilies").split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert keys["SystemCallFilter"] == ["@system-service chroot", "~@resources"]
    assert set(one(keys, "CapabilityBoundingSet").split()) == CAPABILITIES
    assert [key for key in NOT_SET if key in keys] == []
    # what needs writing is under the unit's own directories (ProtectSystem=strict)
    assert one(keys, "ExecStart") == START


def test_units_share_one_sandbox():
    assert sandbox(UNITS / "pylb.service") == sandbox(UNITS / "pylb-notify.service")


def test_reload_keys_notify_reload():
    keys = service(UNITS / "pylb.service")
    assert one(keys, "Type") == "notify-reload"
    assert one(keys, "ReloadSignal") == "SIGHUP"
    assert one(keys, "ExecStartPre") == CHECK
    assert one(keys, "Environment") == "CONFIG=/etc/pylb/lb.cfg"
    assert "ExecReload" not in keys  # the signal is the reload


def test_reload_keys_notify():
    keys = service(UNITS / "pylb-notify.service")
    assert one(keys, "Type") == "notify"
    assert one(keys, "ExecStartPre") == CHECK
    assert one(keys, "Environment") == "CONFIG=/etc/pylb/lb.cfg"
    assert keys["ExecReload"] == [CHECK, "/bin/kill -USR2 $MAINPID"]
    assert "ReloadSignal" not in keys


# -- systemd's tools ------------------------------------------------------------------------


@pytest.mark.parametrize("unit", BOTH)
def test_unit_verifies(unit, tmp_path):
    """`systemd-analyze verify`; /usr/bin/pylb is this checkout's bin/pylb when pylb is not
    installed (verify wants the commands to exist)."""
    text = (UNITS / unit).read_text()
    if not os.access("/usr/bin/pylb", os.X_OK):
        text = text.replace("/usr/bin/pylb", PYLB)
    copy = tmp_path / unit
    copy.write_text(text)
    done = run(tool("systemd-analyze"), "verify", "--man=no", str(copy))
    output = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    version = systemd_version()
    unexplained = [line for line in output
                   if not (version < 253 and any(re.search(p, line) for p in OLD_SYSTEMD))]
    assert done.returncode == 0 and unexplained == [], \
        f"systemd {version}: exit {done.returncode}\n" + "\n".join(output)


@pytest.mark.parametrize("unit", BOTH)
def test_exposure_ok(unit):
    figure, level, checks, line = security(str(UNITS / unit))
    assert line.startswith(f"Overall exposure level for {unit}: ")
    assert level in GOOD_LEVELS and figure < 5.0, line
    failed = [name for name in PASSED if checks.get(name, 0) is not None]
    assert failed == [], f"{unit}: {line}; not passed: {failed}"


def dropin() -> str:
    """The README's drop-in for an unprivileged master."""
    readme = (UNITS / "README.md").read_text()
    found = re.search(r"```ini\n# /etc/systemd/system/pylb\.service\.d/unprivileged\.conf\n"
                      r"(.*?)```", readme, re.S)
    assert found, "README.md: no unprivileged.conf drop-in"
    return found.group(1)


def test_unprivileged_dropin_exposure_ok(tmp_path):
    """The README's other model, applied the way systemd applies it: as a drop-in."""
    units = tmp_path / "etc" / "systemd" / "system"
    (units / "pylb.service.d").mkdir(parents=True)
    shutil.copy(UNITS / "pylb.service", units / "pylb.service")
    (units / "pylb.service.d" / "unprivileged.conf").write_text(dropin())
    keys = service(units / "pylb.service.d" / "unprivileged.conf")
    assert one(keys, "User") == "pylb"
    assert one(keys, "AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert keys["CapabilityBoundingSet"] == ["", "CAP_NET_BIND_SERVICE"]  # reset, then one
    figure, level, checks, line = security(f"--root={tmp_path}", "pylb.service")
    assert level in GOOD_LEVELS and figure < 5.0, line
    # the drop-in took: a user, no capability but the one, no chroot
    for name in ("User=/DynamicUser=", "CapabilityBoundingSet=~CAP_SET(UID|GID|PCAP)",
                 "CapabilityBoundingSet=~CAP_SYS_CHROOT", "CapabilityBoundingSet=~CAP_KILL",
                 "SystemCallFilter=~@mount", "RemoveIPC="):
        assert checks.get(name, 0) is None, f"{name}: {checks.get(name)} ({line})"
    root_figure, _, _, _ = security(str(UNITS / "pylb.service"))
    assert figure < root_figure


def test_sysusers_makes_pylb(tmp_path):
    done = run(tool("systemd-sysusers"), f"--root={tmp_path}", "--dry-run",
               str(UNITS / "pylb.sysusers"))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert re.search(r"Creating group '?pylb'? with GID \d+", output), output
    assert re.search(r"Creating user '?pylb'? \(pylb load balancer\) with UID \d+", output), output
