"""Least privilege: what pylb's processes give up once everything is open.

pylb parses bytes from the internet in its workers, so the workers are the ones that must
hold nothing worth taking. The master opens what needs privileges: it binds every
listener, opens the stats socket and the log files, reads certificates, maps and error
pages, and hands all of it to the workers. Then:

- a worker (`drop_worker`) enters the `chroot` if one is set, switches to the configured
  `user` and `group` (real, effective and saved ids), drops its supplementary groups and
  every capability, and sets PR_SET_NO_NEW_PRIVS, so that nothing it executes could get
  privileges back. It does all of this before it reads a single byte from a client.
- the master (`keep_only`), when it runs as root to start workers as another user, keeps
  the capabilities it uses later and no other: binding the ports a reload adds, starting
  workers as the user and in the chroot, signalling them. It stays uid 0, so the files
  root owns (certificates and maps readable only by root) are still readable at a reload.

Linux has no Python API for capabilities: capset(2) and prctl(2) are called through ctypes.
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
from dataclasses import dataclass

# prctl(2) options
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# capabilities(7) numbers
CAP_KILL = 5
CAP_SETGID = 6
CAP_SETUID = 7
CAP_SETPCAP = 8
CAP_NET_BIND_SERVICE = 10
CAP_SYS_CHROOT = 18

_CAPABILITY_VERSION_3 = 0x20080522  # 64-bit sets, as two 32-bit halves

# What the master keeps, and why (capabilities(7) names, for its log line)
MASTER_KEEPS = {
    CAP_NET_BIND_SERVICE: "cap_net_bind_service",  # ports below 1024 added by a reload
    CAP_SETUID: "cap_setuid",  # new workers switch to the user
    CAP_SETGID: "cap_setgid",  # ... and its group, without the others
    CAP_SYS_CHROOT: "cap_sys_chroot",  # ... and enter the chroot
    CAP_KILL: "cap_kill",  # signal workers that run as another user
}


@dataclass(frozen=True)
class Identity:
    """Who workers run as: `global.user` and `global.group`, resolved."""

    uid: int
    gid: int


def uid_of(user: str) -> int:
    """A user's number, from its name or number (checked by the configuration)."""
    return int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid


def gid_of(group: str) -> int:
    return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid


def identity(user: str | None, group: str | None) -> Identity | None:
    """Who `global.user` and `global.group` name (the group: the user's own, by
    default); None when neither is set. Resolved before any chroot: the names are
    looked up in the system's files."""
    if user is None and group is None:
        return None
    uid = uid_of(user) if user is not None else os.getuid()
    if group is not None:
        gid = gid_of(group)
    elif user is not None:
        gid = pwd.getpwuid(uid).pw_gid
    else:
        gid = os.getgid()
    return Identity(uid, gid)


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int, what: str) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl({what}): {os.strerror(error)}")


def last_capability() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as file:
        return int(file.read())


def _capset(keep: set[int]) -> None:
    """Effective and permitted sets: `keep`; inheritable: none."""
    mask = sum(1 << cap for cap in keep)
    header = _Header(_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    for half in (0, 1):
        bits = (mask >> (32 * half)) & 0xFFFFFFFF
        data[half].effective = data[half].permitted = bits
        data[half].inheritable = 0
    if _libc.capset(ctypes.byref(header), data) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"capset: {os.strerror(error)}")


def _held() -> set[int]:
    """The capabilities this process has (its permitted set): a systemd unit's
    CapabilityBoundingSet may have left out some of those the master would keep."""
    permitted = capabilities()["CapPrm"]
    return {cap for cap in range(64) if permitted >> cap & 1}


def capabilities(pid: int | str = "self") -> dict[str, int]:
    """A process's capability sets (CapEff, CapPrm, CapInh, CapBnd, CapAmb), from /proc."""
    sets = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Cap"):
                name, value = line.split(":")
                sets[name] = int(value, 16)
    return sets


def no_new_privs() -> None:
    """Nothing this process executes may gain privileges (setuid files, file caps)."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")


def keep_only(keep: set[int], strict: bool = True) -> None:
    """Drop every capability but `keep`, from the bounding set too, so that the processes
    this one executes cannot get the others back either. The bounding set needs
    CAP_SETPCAP: without it, `strict` raises, else only the bounding set stays as it is."""
    for cap in range(last_capability() + 1):
        if cap not in keep and _libc.prctl(PR_CAPBSET_READ, cap, 0, 0, 0) == 1:
            if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and strict:
                error = ctypes.get_errno()
                raise OSError(error, f"prctl(PR_CAPBSET_DROP {cap}): {os.strerror(error)}")
    _capset(keep & _held())


# The worker template's (lb.template): what its workers need to give up everything else
TEMPLATE_KEEPS = {CAP_SETUID, CAP_SETGID, CAP_SYS_CHROOT, CAP_SETPCAP}



def drop_worker(identity: Identity | None, chroot: str | None) -> None:
    """A worker's, once it holds its sockets and files: into the chroot, to the user and
    group, without capabilities, with no new privileges. An error here is fatal to the
    worker: it must not serve with more than it was meant to have."""
    last = last_capability()  # (read from /proc: before the chroot)
    if chroot is not None:
        os.chroot(chroot)
        os.chdir("/")
    if os.geteuid() == 0:  # (CAP_SETPCAP: a worker forked from the template has it)
        for cap in range(last + 1):
            _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # what it cannot drop, it lacks
    if identity is not None:
        if os.geteuid() == 0:
            os.setgroups([])
        # group first: once the user changed, the group could not any more
        os.setresgid(identity.gid, identity.gid, identity.gid)
        os.setresuid(identity.uid, identity.uid, identity.uid)
    # (a kernel without ambient capabilities has none to clear: its error does not matter)
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    _capset(set())
    no_new_privs()


def check_start(identity: Identity | None) -> str:
    """Why this master cannot start workers as `identity`; "" when it can."""
    if identity is None or os.geteuid() == 0:
        return ""
    if (os.getuid(), os.getgid()) == (identity.uid, identity.gid):
        return ""  # started as that user already (systemd's User=)
    return "global.user and global.group need pylb to be started as root (or as that user)"
