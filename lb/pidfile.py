"""The pidfile: written once the master runs, removed when it exits (if still ours)."""

from __future__ import annotations

import os


def write(path: str, pid: int | None = None) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{pid or os.getpid()}\n")
    os.replace(tmp, path)  # never a half-written pidfile for `-sf $(cat PIDFILE)`


def remove(path: str, pid: int | None = None) -> None:
    try:
        with open(path) as f:
            if int(f.read().strip() or 0) != (pid or os.getpid()):
                return  # a newer process owns it now
        os.unlink(path)
    except (OSError, ValueError):
        pass
