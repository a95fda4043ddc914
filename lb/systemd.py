"""systemd's notify protocol: READY=1, RELOADING=1, STOPPING=1, STATUS=... to
$NOTIFY_SOCKET, one datagram each. Does nothing when not started by systemd."""

from __future__ import annotations

import os
import socket
import time


def notify(*fields: str) -> bool:
    """Send `fields` (e.g. "READY=1", "STATUS=...") as one message; False if not sent."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # the abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.sendall("\n".join(fields).encode())
    except OSError:
        return False
    return True


def monotonic_usec() -> str:
    """The MONOTONIC_USEC= field Type=notify-reload wants with RELOADING=1."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
