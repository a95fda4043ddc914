"""Memory shared by the master and every worker: the counters that make them one balancer.

The master creates it (a memfd) and hands it to each worker with the listening sockets.
Slots are 8-byte counters at fixed offsets derived from the configuration, so every process
finds the same slot for the same backend without asking anyone.

Updates are plain read-then-write, not atomic: two workers choosing at the same instant
may both draw the same round-robin ticket. That costs one repeated server, never a lost
request, and it keeps the per-request path free of locks and system calls.
"""

from __future__ import annotations

import mmap
import os
import struct

from lb import config

_SLOT = struct.Struct("=Q")


class Shared:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.memory = mmap.mmap(fd, os.fstat(fd).st_size)

    @classmethod
    def create(cls, cfg: config.Config) -> Shared:
        fd = os.memfd_create("pylb-shared", 0)
        os.ftruncate(fd, max(1, len(cfg.backends)) * _SLOT.size)
        return cls(fd)

    @staticmethod
    def backend_slot(cfg: config.Config, name: str) -> int:
        return list(cfg.backends).index(name) * _SLOT.size

    def ticket(self, offset: int) -> int:
        """The next number of the counter at `offset` (round-robin position)."""
        memory = self.memory
        value = _SLOT.unpack_from(memory, offset)[0]
        _SLOT.pack_into(memory, offset, (value + 1) & 0xFFFFFFFFFFFFFFFF)
        return value
