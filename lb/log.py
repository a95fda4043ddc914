"""Process logs: one line per event, `<time> pylb[<pid>] <role>: <message>`.

The role names the process (`master`, `worker 1/2 gen 1`) so that the lines of every
process of pylb can share one stream and still be told apart.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

log = logging.getLogger("pylb")


class _RoleFormatter(logging.Formatter):
    role = "master"

    def format(self, record: logging.LogRecord) -> str:
        record.role = self.role
        return super().format(record)


_formatter = _RoleFormatter("%(asctime)s pylb[%(process)d] %(role)s: %(message)s")


def set_role(role: str) -> None:
    _formatter.role = role


def _handler(target: str) -> logging.Handler:
    if target == "stderr":
        return logging.StreamHandler(sys.stderr)
    if target.startswith("udp@"):
        host, _, port = target[4:].rpartition(":")
        return logging.handlers.SysLogHandler((host.strip("[]"), int(port)))
    if target.startswith("unix@"):
        return logging.handlers.SysLogHandler(target[5:])
    return logging.handlers.WatchedFileHandler(os.path.abspath(target))


def setup(target: str = "stderr", level: int = logging.INFO) -> None:
    """Send pylb's log lines to `target` (stderr, a file, udp@HOST:PORT, unix@PATH)."""
    handler = _handler(target)
    handler.setFormatter(_formatter)
    close()
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def close() -> None:
    """Close the log's handlers (before daemonizing closes their descriptors under them:
    a handler left behind would later write to, or close, whatever reuses the number)."""
    for handler in log.handlers:
        handler.close()
    log.handlers.clear()
