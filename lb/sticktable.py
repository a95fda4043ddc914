"""Stick tables in shared memory: one table that every worker of every generation uses.

The master creates a table's memfd; every worker maps the same memory and looks up, learns
and counts directly: an entry learned through one worker is there for the very next
request on any other, with no message in between. A reload, a respawn or a takeover by a
new process hands over the descriptor, not the entries: a million entries cost what ten do.

Layout (little-endian), self-describing so that a process taking over needs no config:

    0        header: magic, version, key type and length, slot size, slots, stripes,
             entry limit (`size`), entries in use, stored data, rate periods, hash secret
    4 KiB    server names: entries hold a small server id; the master writes the names
    +64 KiB  stripe headers, 8 bytes each: sequence (u32), entries (u32)
    ...      slots, STRIPE slots per stripe: state, key length, server id, tag, last
             access (ms, CLOCK_MONOTONIC: one clock for all processes), key, [counters]

A key hashes (keyed BLAKE2b, so clients cannot aim collisions at one stripe) to a stripe
and a home slot in it; a stripe is a ring of linear probing with backward-shift deletion,
so there are no tombstones and a miss stops at the first empty slot. Tables get twice as
many slots as `size`, so stripes stay about half full.

Locking: each stripe is a seqlock whose writers exclude one another with a POSIX record
lock (fcntl) on the stripe's header byte. Readers take no lock: they read the sequence,
the slots, the sequence again, and retry if it moved or was odd (a write in progress).
Writers make it odd, write, make it even. A record lock is released by the kernel when its
process dies, even by kill -9, so a dead writer never blocks the others; the sequence it
left odd tells the next locker that the stripe may be half-written, and that locker
rebuilds the stripe from the entries that still check out (their key hashes to where
they sit). At worst the one entry being written is lost or keeps stale counters.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import mmap
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

from lb import config

MAGIC = b"PYLBSTK1"
VERSION = 1
STRIPE = 64  # slots per stripe: a probe never leaves its stripe
NAMES_OFFSET = 4096
NAME_SIZE = 64
MAX_NAMES = 1024  # server names a table can know (id 0: none)
STRIPES_OFFSET = NAMES_OFFSET + NAME_SIZE * MAX_NAMES
SPINS = 200  # unlocked read attempts before a reader waits on the writer's lock

KEY_TYPES = ("ip", "ipv6", "integer", "string")
_FIXED_KEY_LEN = {"ip": 4, "ipv6": 16, "integer": 8}

# magic, version, type, key length, slot size, slots, stripes, limit, used, store mask,
# four rate periods (ms), hash secret
_HEADER = struct.Struct("<8sIIIIIIqqI4I16s")
_USED_OFFSET = 40
_STRIPE = struct.Struct("<II")
_SLOT = struct.Struct("<BBhIq")  # state, key length, server id, tag, last access (ms)
_SLOT_SIZE = _SLOT.size  # 16: the key follows

# What a table can store, HAProxy's names. Counters are one block after the key:
#   conn_cur, conn_cnt, gpc0, http_req_cnt, http_err_cnt, then (tick, current, previous)
#   for each rate: conn_rate, http_req_rate, http_err_rate, gpc0_rate.
_COUNTERS = struct.Struct("<iIIII12I")
COUNTERS = ("conn_cur", "conn_cnt", "gpc0", "http_req_cnt", "http_err_cnt")
RATES = ("conn_rate", "http_req_rate", "http_err_rate", "gpc0_rate")
STORABLE = COUNTERS + RATES
_INDEX = {name: i for i, name in enumerate(COUNTERS)}
_RATE_INDEX = {name: len(COUNTERS) + 3 * i for i, name in enumerate(RATES)}


def _align(n: int, to: int = 8) -> int:
    return (n + to - 1) // to * to


def now_ms() -> int:
    return int(time.monotonic() * 1000)


@dataclass(frozen=True, slots=True)
class Shape:
    """What fixes a table's memory: a change of any of these needs a new table."""

    type: str
    key_len: int
    size: int
    store: tuple[tuple[str, int], ...]  # (data name, period ms or 0)

    @classmethod
    def of(cls, table: config.StickTable) -> Shape:
        key_len = _FIXED_KEY_LEN.get(table.type, table.key_len)
        return cls(table.type, key_len, table.size, tuple(sorted(table.store)))


class StickTable:
    """One table's shared memory, as any process uses it."""

    def __init__(self, fd: int, name: str, expire: float | None = None) -> None:
        self.fd = fd
        self.name = name
        self.expire_ms = int(expire * 1000) if expire else 0
        length = os.fstat(fd).st_size
        if length < STRIPES_OFFSET:
            raise ValueError(f"stick table {name!r}: not a pylb table")
        self._mm = mmap.mmap(fd, length)
        (magic, version, kind, self.key_len, self.slot_size, self.slots, self.stripes,
         self.limit, _used, mask, *periods, self._secret) = _HEADER.unpack_from(self._mm, 0)
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"stick table {name!r}: not a pylb table (version {version})")
        self._hasher = hashlib.blake2b(digest_size=8, key=self._secret)
        self._last: tuple[bytes, tuple[int, int, tuple[int, ...] | None] | None] = (b"", None)
        self.type = KEY_TYPES[kind]
        self.stored = tuple(n for i, n in enumerate(STORABLE) if mask & (1 << i))
        self.periods = dict(zip(RATES, periods, strict=True))
        self._counters_at = _SLOT_SIZE + _align(self.key_len)
        self._slots_at = _align(STRIPES_OFFSET + _STRIPE.size * self.stripes, 64)
        self._mask = self.stripes - 1
        self._names: list[str] = []
        self._ids: dict[str, int] = {}
        self._read_names()
        self._cursor = int.from_bytes(os.urandom(4), "little")  # where eviction samples

    # -- creating ---------------------------------------------------------------------

    @classmethod
    def create(cls, name: str, cfg: config.StickTable) -> StickTable:
        """A new, empty table (master only)."""
        shape = Shape.of(cfg)
        slots = STRIPE
        while slots < 2 * shape.size:
            slots *= 2
        stripes = slots // STRIPE
        stored = {data for data, _period in shape.store}
        counters = _COUNTERS.size if stored else 0
        slot_size = _align(_SLOT_SIZE + _align(shape.key_len) + counters)
        slots_at = _align(STRIPES_OFFSET + _STRIPE.size * stripes, 64)
        fd = os.memfd_create(f"pylb-stick-{name}", os.MFD_CLOEXEC)
        os.ftruncate(fd, slots_at + slots * slot_size)
        mask = sum(1 << i for i, data in enumerate(STORABLE) if data in stored)
        periods = dict(shape.store)
        header = _HEADER.pack(
            MAGIC, VERSION, KEY_TYPES.index(shape.type), shape.key_len, slot_size, slots,
            stripes, shape.size, 0, mask, *(periods.get(rate, 0) for rate in RATES),
            os.urandom(16),
        )
        os.pwrite(fd, header, 0)
        return cls(fd, name, cfg.expire)

    @property
    def shape(self) -> Shape:
        return Shape(self.type, self.key_len, self.limit,
                     tuple(sorted((d, self.periods.get(d, 0)) for d in self.stored)))

    def register(self, servers: list[str]) -> None:
        """Give these server names an id (master only, before workers use them)."""
        for server in servers:
            if server in self._ids or len(self._names) >= MAX_NAMES - 1:
                continue
            encoded = server.encode()[: NAME_SIZE - 1]
            at = NAMES_OFFSET + NAME_SIZE * (len(self._names) + 1)
            self._mm[at : at + NAME_SIZE] = bytes([len(encoded)]) + encoded.ljust(
                NAME_SIZE - 1, b"\0")
            self._names.append(server)
            self._ids[server] = len(self._names)

    def _read_names(self) -> None:
        mm = self._mm
        self._names.clear()
        self._ids.clear()
        for number in range(1, MAX_NAMES):
            at = NAMES_OFFSET + NAME_SIZE * number
            length = mm[at]
            if not length:
                break
            name = mm[at + 1 : at + 1 + length].decode(errors="replace")
            self._names.append(name)
            self._ids.setdefault(name, number)

    def server_name(self, server_id: int) -> str | None:
        if server_id <= 0:
            return None
        if server_id > len(self._names):
            self._read_names()  # registered by a newer generation's master
        return self._names[server_id - 1] if server_id <= len(self._names) else None

    def close(self) -> None:
        self._mm.close()
        os.close(self.fd)

    # -- keys -------------------------------------------------------------------------

    def key_of(self, text: str) -> bytes | None:
        """A sample's key as the table stores it; None if it cannot be one (an IPv6
        address in an ip table, a word in an integer table)."""
        kind = self.type
        try:
            if kind == "string":
                return text.encode()[: self.key_len]
            if kind == "integer":
                return int(text).to_bytes(8, "little", signed=True)
            if ":" in text:
                packed = socket.inet_pton(socket.AF_INET6, text)
                if kind == "ipv6":
                    return packed
                return packed[12:] if packed[:12] == b"\0" * 10 + b"\xff\xff" else None
            packed = socket.inet_pton(socket.AF_INET, text)
            return packed if kind == "ip" else b"\0" * 10 + b"\xff\xff" + packed
        except (ValueError, OSError, OverflowError):
            return None

    def key_text(self, key: bytes) -> str:
        kind = self.type
        if kind == "string":
            return key.decode(errors="replace")
        if kind == "integer":
            return str(int.from_bytes(key, "little", signed=True))
        if kind == "ip":
            return socket.inet_ntop(socket.AF_INET, key)
        address = ipaddress.IPv6Address(key)
        return f"::ffff:{address.ipv4_mapped}" if address.ipv4_mapped else str(address)

    def _hash(self, key: bytes) -> tuple[int, int]:
        """(stripe, tag): the stripe from the low bits, the tag (and home) from the high."""
        hasher = self._hasher.copy()
        hasher.update(key)
        h = int.from_bytes(hasher.digest(), "little")
        return h & self._mask, h >> 32

    # -- reading (no lock) ------------------------------------------------------------

    def _probe(self, stripe: int, tag: int, key: bytes) -> int:
        """The offset of `key`'s slot in its stripe, or -(offset of the first empty slot)
        - 1 if absent (0 when the stripe is full). Callers check the sequence."""
        mm, size, unpack = self._mm, self.slot_size, _SLOT.unpack_from
        first = self._slots_at + stripe * STRIPE * size
        home = tag & (STRIPE - 1)
        klen = len(key)
        for step in range(STRIPE):
            at = first + ((home + step) & (STRIPE - 1)) * size
            state, length, _server, found_tag, _touched = unpack(mm, at)
            if not state:
                return -at - 1
            if found_tag == tag and length == klen and mm[at + 16 : at + 16 + klen] == key:
                return at
        return 0  # a full stripe: no empty slot (writers evict first)

    def _read(self, key: bytes) -> tuple[int, int, tuple[int, ...] | None] | None:
        """(server id, last access, counters) of a live entry, or None."""
        stripe, tag = self._hash(key)
        header = STRIPES_OFFSET + _STRIPE.size * stripe
        mm, unpack = self._mm, _STRIPE.unpack_from
        for _ in range(SPINS):
            before = unpack(mm, header)[0]
            if before & 1:
                continue
            found = self._entry(self._probe(stripe, tag, key))
            if unpack(mm, header)[0] == before:
                return found
        self._lock(stripe)  # a writer is slow, or died: wait for it, or repair
        try:
            return self._entry(self._probe(stripe, tag, key))
        finally:
            self._unlock(stripe)

    def _entry(self, at: int) -> tuple[int, int, tuple[int, ...] | None] | None:
        if at <= 0:
            return None
        _state, _length, server, _tag, touched = _SLOT.unpack_from(self._mm, at)
        counters = (
            _COUNTERS.unpack_from(self._mm, at + self._counters_at) if self.stored else None
        )
        if self.expire_ms and self._expired(touched, counters, now_ms()):
            return None
        return server, touched, counters

    def _expired(self, touched: int, counters: tuple[int, ...] | None, now: int) -> bool:
        """Not used for `expire`, and not tracked by a connection still open (HAProxy
        keeps entries in use too)."""
        if now - touched < self.expire_ms:
            return False
        return counters is None or counters[_INDEX["conn_cur"]] <= 0 or (
            "conn_cur" not in self.stored)

    def lookup(self, key: bytes) -> str | None:
        """The server `key` sticks to, if any."""
        found = self._read(key)
        self._last = (key, found)  # what `learn` for the same request starts from
        return self.server_name(found[0]) if found is not None else None

    def data(self, key: bytes, name: str) -> int | None:
        """A stored counter or rate of `key`'s entry now; None if not stored or no entry."""
        if name not in self.stored:
            return None
        found = self._read(key)
        if found is None or found[2] is None:
            return None
        return self._value(found[2], name, now_ms())

    def _value(self, counters: tuple[int, ...], name: str, now: int) -> int:
        index = _INDEX.get(name)
        if index is not None:
            return counters[index]
        at = _RATE_INDEX[name]
        return _rate(counters[at], counters[at + 1], counters[at + 2], self.periods[name], now)

    # -- writing (stripe locked) ------------------------------------------------------

    def _lock(self, stripe: int) -> None:
        at = STRIPES_OFFSET + _STRIPE.size * stripe
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, at)
        if _STRIPE.unpack_from(self._mm, at)[0] & 1:
            self._repair(stripe)  # its last writer died in the middle

    def _unlock(self, stripe: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, STRIPES_OFFSET + _STRIPE.size * stripe)

    def _begin(self, stripe: int) -> None:
        at = STRIPES_OFFSET + _STRIPE.size * stripe
        sequence, count = _STRIPE.unpack_from(self._mm, at)
        _STRIPE.pack_into(self._mm, at, (sequence + 1) & 0xFFFFFFFF, count)

    def _end(self, stripe: int, change: int = 0) -> None:
        at = STRIPES_OFFSET + _STRIPE.size * stripe
        sequence, count = _STRIPE.unpack_from(self._mm, at)
        _STRIPE.pack_into(self._mm, at, (sequence + 1) & 0xFFFFFFFF, count + change)

    def _count(self, stripe: int) -> int:
        return _STRIPE.unpack_from(self._mm, STRIPES_OFFSET + _STRIPE.size * stripe)[1]

    def _add_used(self, change: int) -> int:
        """Entries in use, after `change`, under the table-wide lock (byte 0)."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)
        try:
            used = max(0, struct.unpack_from("<q", self._mm, _USED_OFFSET)[0] + change)
            struct.pack_into("<q", self._mm, _USED_OFFSET, used)
            return used
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)

    @property
    def used(self) -> int:
        return int(struct.unpack_from("<q", self._mm, _USED_OFFSET)[0])

    def recount(self) -> int:
        """Entries in use, summed over the stripes, and written back as the table-wide
        count: a writer killed between its stripe and that count leaves it off by one."""
        end = STRIPES_OFFSET + _STRIPE.size * self.stripes
        with memoryview(self._mm)[STRIPES_OFFSET:end] as view, view.cast("I") as words:
            total = sum(words[1::2])
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)
        try:
            struct.pack_into("<q", self._mm, _USED_OFFSET, total)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)
        return total

    def _update(
        self,
        key: bytes,
        server: int | None = None,
        counts: dict[str, int] | None = None,
        sets: dict[str, int] | None = None,
        create: bool = True,
    ) -> bool:
        """Find or create `key`'s entry and write to it, all under its stripe's lock:
        `server` (None: keep), counters to add (`counts`) or set (`sets`). Touches the
        entry. False if it did not exist and was not created."""
        stripe, tag = self._hash(key)
        mm = self._mm
        added = 0  # entries this write adds to the table (-1, 0 or 1)
        self._lock(stripe)
        try:
            at = self._probe(stripe, tag, key)
            now = now_ms()
            if at > 0:
                _state, _length, old_server, _tag, touched = _SLOT.unpack_from(mm, at)
                counters = (_COUNTERS.unpack_from(mm, at + self._counters_at)
                            if self.stored else None)
                fresh = bool(self.expire_ms) and self._expired(touched, counters, now)
            elif not create:
                return False
            else:
                fresh = True
            self._begin(stripe)
            try:
                if at == 0:  # the stripe is full: its least recently used entry goes
                    self._delete_at(stripe, self._oldest_in(stripe))
                    added -= 1
                    at = self._probe(stripe, tag, key)
                if at < 0:
                    at = -at - 1
                    added += 1
                if fresh:  # a new entry, or an expired one starting over
                    _SLOT.pack_into(mm, at, 1, len(key), server or 0, tag, now)
                    mm[at + 16 : at + 16 + len(key)] = key
                    if self.stored:
                        _COUNTERS.pack_into(mm, at + self._counters_at, *_zero_counters(now))
                else:
                    _SLOT.pack_into(mm, at, 1, len(key),
                                    old_server if server is None else server, tag, now)
                if self.stored and (counts or sets):
                    self._count_into(at + self._counters_at, counts, sets, now)
            finally:
                self._end(stripe, added)
        finally:
            self._unlock(stripe)
        if added and self._add_used(added) > self.limit:
            self._evict(spare=key)
        return True

    def _count_into(
        self, at: int, counts: dict[str, int] | None, sets: dict[str, int] | None, now: int
    ) -> None:
        values = list(_COUNTERS.unpack_from(self._mm, at))
        for name, amount in (counts or {}).items():
            if name not in self.stored:
                continue
            index = _INDEX.get(name)
            if index is not None:
                values[index] = max(0, min(values[index] + amount, 0x7FFFFFFF))
            else:
                i = _RATE_INDEX[name]
                values[i : i + 3] = _rotate(*values[i : i + 3], self.periods[name], now)
                values[i + 1] = min(values[i + 1] + amount, 0xFFFFFFFF)
        for name, value in (sets or {}).items():
            if name not in self.stored:
                continue
            index = _INDEX.get(name)
            if index is not None:
                values[index] = max(0, min(value, 0x7FFFFFFF))
            else:
                i = _RATE_INDEX[name]
                values[i : i + 3] = [now & 0xFFFFFFFF, max(0, min(value, 0xFFFFFFFF)), 0]
        _COUNTERS.pack_into(self._mm, at, *values)

    def _oldest_in(self, stripe: int) -> int:
        mm, size = self._mm, self.slot_size
        first = self._slots_at + stripe * STRIPE * size
        best, best_touched = first, None
        for n in range(STRIPE):
            at = first + n * size
            state, _l, _s, _t, touched = _SLOT.unpack_from(mm, at)
            if state and (best_touched is None or touched < best_touched):
                best, best_touched = at, touched
        return best

    def _delete_at(self, stripe: int, at: int) -> None:
        """Empty slot `at` and shift back the entries after it that probed past it (stripe
        locked, sequence odd)."""
        mm, size = self._mm, self.slot_size
        first = self._slots_at + stripe * STRIPE * size
        hole = (at - first) // size
        n = hole
        while True:
            n = (n + 1) & (STRIPE - 1)
            at_n = first + n * size
            if not mm[at_n] or n == hole:
                break
            home = _SLOT.unpack_from(mm, at_n)[3] & (STRIPE - 1)
            # The entry at n may move to the hole unless its home lies in (hole, n].
            if (hole < n and hole < home <= n) or (hole > n and (home > hole or home <= n)):
                continue
            at_hole = first + hole * size
            mm[at_hole : at_hole + size] = mm[at_n : at_n + size]
            hole = n
        at_hole = first + hole * size
        mm[at_hole : at_hole + size] = bytes(size)

    def _evict(self, spare: bytes) -> None:
        """The table holds more than `size` entries: the least recently used of a sample
        of stripes goes (every stripe, for tables of up to 8 stripes)."""
        mm, size = self._mm, self.slot_size
        best: tuple[int, int, bytes] | None = None  # (last access, stripe, key)
        sample = min(8, self.stripes)
        for n in range(sample):
            stripe = (self._cursor + n) & self._mask
            if not self._count(stripe):
                continue
            first = self._slots_at + stripe * STRIPE * size
            for slot in range(STRIPE):
                at = first + slot * size
                state, length, _s, _t, touched = _SLOT.unpack_from(mm, at)
                if state and (best is None or touched < best[0]):
                    key = mm[at + 16 : at + 16 + length]
                    if key != spare:
                        best = (touched, stripe, key)
        self._cursor = (self._cursor + sample) & self._mask
        if best is not None:
            self.remove(best[2], only_if_older=best[0] + 1)

    def _repair(self, stripe: int) -> None:
        """Rebuild a stripe whose writer died mid-write (stripe locked): keep the entries
        whose key still hashes to this stripe with their tag, drop the rest."""
        mm, size = self._mm, self.slot_size
        first = self._slots_at + stripe * STRIPE * size
        header = STRIPES_OFFSET + _STRIPE.size * stripe
        sequence, count = _STRIPE.unpack_from(mm, header)
        kept: dict[bytes, bytes] = {}
        for n in range(STRIPE):
            at = first + n * size
            state, length, _s, tag, _touched = _SLOT.unpack_from(mm, at)
            if state != 1 or length > self.key_len:
                continue
            key = bytes(mm[at + 16 : at + 16 + length])
            if self._hash(key) == (stripe, tag) and key not in kept:
                kept[key] = bytes(mm[at : at + size])
        mm[first : first + STRIPE * size] = bytes(STRIPE * size)
        for key, raw in kept.items():
            at = -self._probe(stripe, _SLOT.unpack_from(raw, 0)[3], key) - 1
            mm[at : at + size] = raw
        _STRIPE.pack_into(mm, header, (sequence + 1) & 0xFFFFFFFF, len(kept))
        if len(kept) != count:
            self._add_used(len(kept) - count)

    # -- what the request path and the operator do --------------------------------------

    def learn(self, key: bytes, server: str) -> None:
        """`key` sticks to `server`. Skips the lock when the entry already says so and
        was touched recently (half its expiry ago, or a second for tables that never
        expire): busy keys stay alive without a write per request."""
        server_id = self._ids.get(server)
        if server_id is None:
            return
        last_key, found = self._last
        self._last = (b"", None)  # good for one learn only
        if last_key != key:  # the request's own lookup, moments ago, is good enough
            found = self._read(key)
        if found is not None and found[0] == server_id:
            fresh_for = self.expire_ms // 2 if self.expire_ms else 1000
            if now_ms() - found[1] < fresh_for:
                return
        self._update(key, server=server_id)

    def count(self, key: bytes, counts: dict[str, int]) -> None:
        """Add to `key`'s counters (creating the entry): tracking a connection or request."""
        self._update(key, counts=counts)

    def set_data(self, key: bytes, server: str | None, sets: dict[str, int]) -> None:
        """`set table`: create the entry if needed, set its server and data."""
        server_id = self._ids.get(server) if server is not None else None
        self._update(key, server=server_id, sets=sets)

    def remove(self, key: bytes, only_if_older: int | None = None) -> bool:
        """Remove `key`'s entry; with `only_if_older`, only if it was last used before
        that time (ms): another worker may have used it since it was chosen to go."""
        stripe, tag = self._hash(key)
        self._lock(stripe)
        try:
            at = self._probe(stripe, tag, key)
            if at <= 0:
                return False
            if only_if_older is not None and _SLOT.unpack_from(self._mm, at)[4] >= only_if_older:
                return False
            self._begin(stripe)
            try:
                self._delete_at(stripe, at)
            finally:
                self._end(stripe, -1)
        finally:
            self._unlock(stripe)
        self._add_used(-1)
        return True

    def clear(self) -> int:
        """Remove every entry; how many went."""
        removed = 0
        size = self.slot_size
        for stripe in range(self.stripes):
            if not self._count(stripe):
                continue
            self._lock(stripe)
            try:
                count = self._count(stripe)
                self._begin(stripe)
                first = self._slots_at + stripe * STRIPE * size
                self._mm[first : first + STRIPE * size] = bytes(STRIPE * size)
                self._end(stripe, -count)
                removed += count
            finally:
                self._unlock(stripe)
        if removed:
            self._add_used(-removed)
        return removed

    def purge(self, stripes: int) -> None:
        """Remove expired entries from the next `stripes` stripes (master housekeeping:
        lookups already ignore them; this gives their room back)."""
        if not self.expire_ms:
            return
        mm, size = self._mm, self.slot_size
        for _ in range(min(stripes, self.stripes)):
            stripe = self._cursor = (self._cursor + 1) & self._mask
            if not self._count(stripe):
                continue
            first = self._slots_at + stripe * STRIPE * size
            expired = []
            now = now_ms()
            cutoff = now - self.expire_ms + 1  # last used before this: expired
            for n in range(STRIPE):
                at = first + n * size
                state, length, _s, _t, touched = _SLOT.unpack_from(mm, at)
                counters = (_COUNTERS.unpack_from(mm, at + self._counters_at)
                            if state and self.stored else None)
                if state and self._expired(touched, counters, now):
                    expired.append(bytes(mm[at + 16 : at + 16 + length]))
            for key in expired:
                self.remove(key, only_if_older=cutoff)

    def entries(self) -> Iterator[Entry]:
        """Every live entry (for `show table` and for migrating to a new shape)."""
        size, unpack = self.slot_size, _STRIPE.unpack_from
        now = now_ms()
        for stripe in range(self.stripes):
            header = STRIPES_OFFSET + _STRIPE.size * stripe
            if not unpack(self._mm, header)[1]:
                continue
            raw = self._stripe_copy(stripe)
            for n in range(STRIPE):
                at = n * size
                state, length, server, _tag, touched = _SLOT.unpack_from(raw, at)
                if not state:
                    continue
                counters = (
                    _COUNTERS.unpack_from(raw, at + self._counters_at) if self.stored else None
                )
                if self.expire_ms and self._expired(touched, counters, now):
                    continue
                yield Entry(raw[at + 16 : at + 16 + length], server, touched, counters)

    def _stripe_copy(self, stripe: int) -> bytes:
        """A consistent copy of a stripe's slots: read between two equal even sequences,
        or under the lock when writers keep it busy (or one died in it)."""
        mm, unpack = self._mm, _STRIPE.unpack_from
        header = STRIPES_OFFSET + _STRIPE.size * stripe
        first = self._slots_at + stripe * STRIPE * self.slot_size
        end = first + STRIPE * self.slot_size
        for _ in range(SPINS):
            before = unpack(mm, header)[0]
            if before & 1:
                continue
            raw = mm[first:end]
            if unpack(mm, header)[0] == before:
                return raw
        self._lock(stripe)
        try:
            return mm[first:end]
        finally:
            self._unlock(stripe)

    def describe(self, entry: Entry, now: int) -> dict[str, int]:
        """An entry's stored data as `show table` prints it: name -> value now."""
        if entry.counters is None:
            return {}
        return {name: self._value(entry.counters, name, now) for name in self.stored}

    def expires_in(self, entry: Entry, now: int) -> int | None:
        return entry.touched + self.expire_ms - now if self.expire_ms else None

    def migrate_from(self, old: StickTable) -> int:
        """Copy `old`'s live entries into this (new, empty) table of another shape:
        keys converted through their text, servers by name, data that both store."""
        moved = 0
        now = now_ms()
        for entry in old.entries():
            key = self.key_of(old.key_text(entry.key))
            if key is None:
                continue
            server = old.server_name(entry.server)
            sets = {
                name: value
                for name, value in old.describe(entry, now).items()
                if name in self.stored
            }
            self.set_data(key, server, sets)
            moved += 1
        return moved


@dataclass(frozen=True, slots=True)
class Entry:
    key: bytes
    server: int
    touched: int
    counters: tuple[int, ...] | None


def _zero_counters(now: int) -> list[int]:
    values = [0] * (len(COUNTERS) + 3 * len(RATES))
    for i in _RATE_INDEX.values():
        values[i] = now & 0xFFFFFFFF
    return values


def _rotate(tick: int, current: int, previous: int, period: int, now: int) -> list[int]:
    """A rate counter brought to `now`: HAProxy's sliding window over two periods."""
    elapsed = (now - tick) & 0xFFFFFFFF
    if elapsed < period:
        return [tick, current, previous]
    if elapsed < 2 * period:
        return [(tick + period) & 0xFFFFFFFF, 0, current]
    return [(now - elapsed % period) & 0xFFFFFFFF, 0, 0]


def _rate(tick: int, current: int, previous: int, period: int, now: int) -> int:
    """Events over the last `period`: this period's, plus the previous period's share of
    what the window still covers."""
    if not period:
        return current
    tick, current, previous = _rotate(tick, current, previous, period, now)
    elapsed = (now - tick) & 0xFFFFFFFF
    return current + previous * (period - elapsed) // period
