"""Maps in shared memory: each map file indexed once, read in place by every process.

A map (HAProxy's ``key value`` file) can have a million lines. Shipping it to each worker
as a dict costs a copy per process and a control message larger than the channel takes.
Instead the master parses the file once into an immutable index inside a memfd; every
worker maps the same memfd read-only and looks keys up in place. Nothing is copied per
worker and nothing is ever written after the build, so readers need no locking. The memfd
is sealed (no write, grow or shrink) where the kernel allows it, which documents that.
Runtime edits (``add map``, ``set map``, ``del map``, ``clear map``) are few: `SharedMap`
keeps them in a small overlay dict above the immutable `MapIndex`.

Layout (little-endian), self-describing so that a process given only the fd needs no
config:

    0          header: magic, version, total size, hash secret (16 random bytes), entry
               count, bucket count, IP record and bucket counts, section offsets, and the
               offset and length of the metadata
    +header    metadata, JSON: source path and identity (dev, inode, size, mtime), the
               sorted distinct key lengths (map_beg), label-run lengths and the
               delimiters around patterns (map_dom), prefix lengths (map_ip)
    8-aligned  buckets: u64 each, 0 = empty, else tag (high 32 bits of the key's hash)
               << 32 | (entry offset + 1); open addressing with linear probing, a power
               of two at least twice the entries, so a miss stops at an empty bucket soon
    ...        IP buckets: two u64 each, (1 << 40 | network << 8 | prefix length) and
               the index of the network's first IP record; one bucket per network
    ...        IP records, one per line whose key is an IPv4 address or network, in file
               order: entry offset (u32), next record of the same network (u32, or ~0),
               so "10.0.0.0/8" and "10.1.2.3/8" both stay reachable (runtime deletions)
    ...        entries, in file order, repeated keys dropped (the first wins): file order
               (u32), key length (u32), value length (u32), key bytes, value bytes (UTF-8)

The hash is keyed BLAKE2b with the secret from the header, so it is the same in every
process (Python's hash() is not) and clients cannot aim collisions at a bucket.

map_beg probes the table once per distinct key length, map_ip once per prefix length;
map_dom probes each run of whole labels of the key (with each delimiter decoration seen
around patterns, e.g. the "/" of "/static") instead of scanning patterns. Entry offsets
grow with file order, so "first in file order" is the smallest offset among the hits.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import re
import socket
import struct
from array import array
from collections.abc import Iterable, Iterator, Sized
from typing import Any

MAGIC = b"PYLBMAP\x00"
VERSION = 1

# magic, version, total size, secret, entries, buckets, IP records, IP buckets, offsets of
# buckets, IP buckets, IP records and entries, entries size, metadata offset and length
_HEADER = struct.Struct("<8sIQ16sIIIIQQQQQII")
_ENTRY = struct.Struct("<III")  # file order, key length, value length
_KEY_LEN = struct.Struct("<I")

_HI = 0xFFFFFFFF00000000
_LO = 0xFFFFFFFF
_MAX_BLOB = 0xFFFFFFFE  # entry offset + 1 must fit in a bucket's low 32 bits
_IP_FLAG = 1 << 40  # keeps an IP bucket word non-zero, even for 0.0.0.0/0
_NO_RECORD = 0xFFFFFFFF  # end of a chain of IP records
_MASKS = tuple((0xFFFFFFFF << (32 - n)) & 0xFFFFFFFF for n in range(33))
_DOM_DELIMS = b"./"
_WORD = re.compile(rb"[^./]+")

# What str.splitlines() ends lines on: one byte each in UTF-8, then three that are not.
_EOL = "\n\r\x0b\x0c\x1c\x1d\x1e"
_EOL_WIDE = "\x85\u2028\u2029"
_WIDE_EOL_BYTES = tuple(c.encode() for c in _EOL_WIDE)


def _line_pattern(eol: str) -> str:
    """One line as load_map reads it: blanks, then either a key (first word, not starting
    with #) and a value (the rest, blanks around it dropped) or anything (empty line or
    comment: no groups), then the line end (\\r\\n as one, like splitlines)."""
    return (
        rf"[ \t]*(?:([^ \t#{eol}][^ \t{eol}]*)[ \t]*((?:[^{eol}]*[^ \t{eol}])?)[ \t]*"
        rf"|[^{eol}]*)(?:\r\n|[{eol}]|\Z)"
    )


_LINE_BYTES = re.compile(_line_pattern(_EOL).encode())
_LINE_TEXT = re.compile(_line_pattern(_EOL + _EOL_WIDE))


# -- parsing --------------------------------------------------------------------------------


def _check_utf8(data: bytes, path: str) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"map file {path!r} line {line} is not valid UTF-8") from None


def _max_lines(data: bytes) -> int:
    """An upper bound on the entries of a file: its line count."""
    ends = sum(data.count(c.encode()) for c in _EOL + _EOL_WIDE)
    return ends - data.count(b"\r\n") + 1


def _parse(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of each entry line of UTF-8 ``data``, in file order, repeats included."""
    if not any(eol in data for eol in _WIDE_EOL_BYTES):
        # Usual case: every line end is one byte, so the bytes need no decoding.
        for m in _LINE_BYTES.finditer(data):
            if m[1] is not None:
                yield m[1], m[2]
        return
    for m in _LINE_TEXT.finditer(data.decode("utf-8")):
        if m[1] is not None:
            yield m[1].encode(), m[2].encode()


def _encode(text: str) -> bytes:
    # surrogatepass: a key with lone surrogates cannot match a file's UTF-8, but must not
    # raise either.
    return text.encode("utf-8", "surrogatepass")


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")


def _ipv4(text: str) -> int | None:
    """A dotted-quad IPv4 address as an integer, None if ``text`` is not one."""
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, ValueError):
        return None


def _ip_network(text: str) -> tuple[int, int] | None:
    """(network, prefix length) of ``a.b.c.d`` or ``a.b.c.d/N``; None if not one."""
    address, slash, length = text.partition("/")
    if not slash:
        plen = 32
    elif length.isascii() and length.isdigit() and len(length) <= 2 and int(length) <= 32:
        plen = int(length)
    else:
        return None
    addr = _ipv4(address)
    return None if addr is None else (addr & _MASKS[plen], plen)


def _dom_parts(key: bytes) -> tuple[bytes, bytes, bytes]:
    """(leading delimiters, pattern core, trailing delimiters): HAProxy's -m dom ignores
    the dots and slashes around a pattern."""
    core = key.strip(_DOM_DELIMS)
    lead = key.find(core) if core else len(key)  # core starts on a non-delimiter
    return key[:lead], core, key[lead + len(core):]


def _dom_match(pattern: str, key: str) -> bool:
    """HAProxy -m dom for one pattern (used for the overlay only): the pattern, without
    the dots and slashes around it, is found in ``key`` starting and ending at label
    boundaries (key start or end, or a dot or a slash)."""
    core = pattern.strip("./")
    if not core:
        return False
    at = key.find(core)
    while at >= 0:
        end = at + len(core)
        if (at == 0 or key[at - 1] in "./") and (end == len(key) or key[end] in "./"):
            return True
        at = key.find(core, at + 1)
    return False


# -- building -------------------------------------------------------------------------------


def _power_of_two(n: int) -> int:
    size = 8
    while size < n:
        size *= 2
    return size


def _hash(hasher: Any, data: bytes) -> int:
    h = hasher.copy()
    h.update(data)
    return int.from_bytes(h.digest(), "little")


class _Builder:
    """Accumulates entries (deduplicated through the bucket table itself, so no dict of the
    whole map is ever built) and then writes the memfd."""

    def __init__(self, capacity: int) -> None:
        self.secret = os.urandom(16)
        self.hasher = hashlib.blake2b(digest_size=8, key=self.secret)
        nbuckets = _power_of_two(2 * capacity)
        self.table = array("Q", bytes(8 * nbuckets))
        self.blob = bytearray()
        self.count = 0
        self.beg_lengths: set[int] = set()
        self.dom_lengths: set[int] = set()
        self.decorations: set[tuple[bytes, bytes]] = set()
        self.ip_records = array("Q")  # (bucket word, entry offset) pairs
        self.ip_lengths: set[int] = set()

    def add_all(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        # One loop with locals: this runs once per line of a possibly huge file.
        table, blob, pack = self.table, self.blob, _ENTRY.pack
        hasher_copy, from_bytes = self.hasher.copy, int.from_bytes
        key_len = _KEY_LEN.unpack_from
        mask = len(table) - 1
        beg_lengths, dom_lengths, decorations = (
            self.beg_lengths, self.dom_lengths, self.decorations)
        count = self.count
        plain = False  # some pattern has no delimiter around it
        for key, value in pairs:
            h = hasher_copy()
            h.update(key)
            hashed = from_bytes(h.digest(), "little")
            tag = hashed & _HI
            i = hashed & mask
            klen = len(key)
            while bucket := table[i]:
                if bucket & _HI == tag:
                    at = (bucket & _LO) - 1
                    if key_len(blob, at + 4)[0] == klen and blob[at + 12:at + 12 + klen] == key:
                        break  # a repeated key: the first one stays
                i = (i + 1) & mask
            else:
                at = len(blob)
                if at > _MAX_BLOB:
                    raise ValueError("map too large (entries over 4 GiB)")
                table[i] = tag | (at + 1)
                blob += pack(count, klen, len(value))
                blob += key
                blob += value
                count += 1
                beg_lengths.add(klen)
                if key and (key[0] in _DOM_DELIMS or key[-1] in _DOM_DELIMS):
                    self._add_decorated(key)
                else:
                    dom_lengths.add(klen)
                    plain = True
                if key[:1].isdigit():
                    self._add_ip(key, at)
        self.count = count
        if plain:
            decorations.add((b"", b""))

    def _add_decorated(self, key: bytes) -> None:
        lead, core, trail = _dom_parts(key)
        if core:  # a pattern of delimiters only never matches
            self.dom_lengths.add(len(core))
            self.decorations.add((lead, trail))

    def _add_ip(self, key: bytes, at: int) -> None:
        network = _ip_network(key.decode("ascii", "replace"))
        if network is not None:
            net, plen = network
            self.ip_records.extend((_IP_FLAG | net << 8 | plen, at))
            self.ip_lengths.add(plen)

    def _ip_sections(self) -> tuple[array[int], array[int]]:
        """The IP bucket table, one bucket per distinct network: (word, first record), and
        the records in file order: (entry offset, next record of the same network)."""
        records = self.ip_records
        count = len(records) // 2
        if not count:
            return array("Q"), array("I")
        table = array("Q", bytes(16 * _power_of_two(2 * count)))  # two words a bucket
        chain = array("I", bytes(8 * count))
        last = array("I", bytes(2 * len(table)))  # build only: a network's last record
        mask = len(table) // 2 - 1
        for n in range(count):
            word = records[2 * n]
            chain[2 * n] = records[2 * n + 1]
            chain[2 * n + 1] = _NO_RECORD
            i = _hash(self.hasher, word.to_bytes(8, "little")) & mask
            while stored := table[2 * i]:
                if stored == word:  # the same network again: chained after the others
                    chain[2 * last[i] + 1] = n
                    break
                i = (i + 1) & mask
            else:
                table[2 * i] = word
                table[2 * i + 1] = n
            last[i] = n
        return table, chain

    def write(self, path: str, source: tuple[int, int, int, int] | None) -> int:
        """A sealed memfd holding the index; returns its fd."""
        ip_table, ip_chain = self._ip_sections()
        meta = json.dumps({
            "path": path,
            "source": list(source) if source is not None else None,
            "beg_lengths": sorted(self.beg_lengths),
            "dom_lengths": sorted(self.dom_lengths),
            "dom_decorations": sorted([lead.decode(), trail.decode()]
                                      for lead, trail in self.decorations),
            "ip_lengths": sorted(self.ip_lengths, reverse=True),
        }).encode()
        meta_at = _HEADER.size
        buckets_at = (meta_at + len(meta) + 7) & ~7
        ip_at = buckets_at + 8 * len(self.table)
        chain_at = ip_at + 8 * len(ip_table)
        entries_at = chain_at + 4 * len(ip_chain)
        total = entries_at + len(self.blob)
        header = _HEADER.pack(
            MAGIC, VERSION, total, self.secret, self.count, len(self.table),
            len(ip_chain) // 2, len(ip_table) // 2, buckets_at, ip_at, chain_at, entries_at,
            len(self.blob), meta_at, len(meta))
        fd = _memfd()
        try:
            padding = bytes(buckets_at - meta_at - len(meta))
            for part in (header, meta, padding, self.table, ip_table, ip_chain, self.blob):
                _write_all(fd, memoryview(part).cast("B"))
            _seal(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd


def _memfd() -> int:
    try:
        return os.memfd_create("pylb-map", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError:
        return os.memfd_create("pylb-map", os.MFD_CLOEXEC)


def _seal(fd: int) -> None:
    seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except OSError:
        pass  # no sealing here: immutable by convention only


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


# -- reading --------------------------------------------------------------------------------


class MapIndex:
    """Immutable key->value index in a memfd, shared by every process."""

    fd: int
    path: str
    source: tuple[int, int, int, int] | None

    def __init__(self, fd: int) -> None:
        """Use `open` (or `build`, `from_items`)."""
        self.fd = fd
        size = os.fstat(fd).st_size
        if size < _HEADER.size:
            raise ValueError(f"fd {fd} is not a pylb map index ({size} bytes, too small)")
        (magic, version, total, secret, count, nbuckets, ip_count, ip_nbuckets, buckets_at,
         ip_at, chain_at, entries_at, entries_size, meta_at, meta_len) = _HEADER.unpack(
            os.pread(fd, _HEADER.size, 0))
        if magic != MAGIC:
            raise ValueError(f"fd {fd} is not a pylb map index (bad magic {magic!r})")
        if version != VERSION:
            raise ValueError(f"fd {fd}: pylb map index version {version}, "
                             f"this pylb reads version {VERSION}")
        if total != size:
            raise ValueError(f"fd {fd}: pylb map index of {total} bytes, the file has {size}")
        if not (meta_at == _HEADER.size and meta_at + meta_len <= buckets_at
                and buckets_at % 8 == 0 and ip_at == buckets_at + 8 * nbuckets
                and chain_at == ip_at + 16 * ip_nbuckets
                and entries_at == chain_at + 8 * ip_count
                and entries_at + entries_size == total
                and _valid_table(nbuckets, count) and _valid_table(ip_nbuckets, ip_count)):
            raise ValueError(f"fd {fd}: pylb map index with an inconsistent header")
        self._mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        try:
            meta = json.loads(self._mm[meta_at:meta_at + meta_len])
            self.path = str(meta["path"])
            self.source = tuple(meta["source"]) if meta["source"] is not None else None
            self._beg = tuple(meta["beg_lengths"])
            self._dom = frozenset(meta["dom_lengths"])
            self._dom_max = max(self._dom, default=0)
            self._decorations = tuple((lead.encode(), trail.encode())
                                      for lead, trail in meta["dom_decorations"])
            self._ip_lengths = tuple(meta["ip_lengths"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self._mm.close()
            raise ValueError(f"fd {fd}: pylb map index with bad metadata ({exc})") from None
        self._view = memoryview(self._mm)
        self._buckets = self._view[buckets_at:ip_at].cast("Q")
        self._ip_buckets = self._view[ip_at:chain_at].cast("Q")
        self._ip_chain = self._view[chain_at:entries_at].cast("I")
        self._mask = nbuckets - 1
        self._ip_mask = ip_nbuckets - 1
        self._entries_at = entries_at
        self._entries_end = total
        self._count = count
        self._hasher = hashlib.blake2b(digest_size=8, key=secret)

    # -- creating ---------------------------------------------------------------------

    @classmethod
    def build(cls, path: str) -> MapIndex:
        """Read and index a map file (master). OSError if it cannot be read, ValueError if
        it is not UTF-8 — exactly as lb.rules.syntax.load_map."""
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())  # before reading: a later change shows as changed
            data = f.read()
        _check_utf8(data, path)
        builder = _Builder(_max_lines(data))
        builder.add_all(_parse(data))
        del data
        source = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        return cls._opened(builder.write(path, source))

    @classmethod
    def from_items(cls, items: Iterable[tuple[str, str]], path: str = "") -> MapIndex:
        """An index of (key, value) pairs; the first of repeated keys wins."""
        if not isinstance(items, Sized):
            items = list(items)
        builder = _Builder(len(items))
        builder.add_all((_encode(key), _encode(value)) for key, value in items)
        return cls._opened(builder.write(path, None))

    @classmethod
    def open(cls, fd: int) -> MapIndex:
        """Map an existing index memfd (any process). The index owns ``fd`` from then on:
        `close` closes it. ValueError if ``fd`` does not hold a pylb map index."""
        return cls(fd)

    @classmethod
    def _opened(cls, fd: int) -> MapIndex:
        try:
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd < 0:
            return
        for view in (self._buckets, self._ip_buckets, self._ip_chain, self._view):
            view.release()
        self._mm.close()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> MapIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<MapIndex {self.path!r} fd={self.fd} entries={self._count}>"

    def matches_file(self, path: str | None = None) -> bool:
        """Whether the file (by default the one it was built from) is still the same one
        with the same size and modification time, so a reload can keep this index."""
        if self.source is None:
            return False
        try:
            st = os.stat(self.path if path is None else path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == self.source

    # -- entries ----------------------------------------------------------------------

    def _find(self, key: bytes) -> int:
        """The offset of ``key``'s entry, -1 if absent."""
        h = self._hasher.copy()
        h.update(key)
        hashed = int.from_bytes(h.digest(), "little")
        buckets, mask, mm = self._buckets, self._mask, self._mm
        tag = hashed & _HI
        i = hashed & mask
        klen = len(key)
        while bucket := buckets[i]:
            if bucket & _HI == tag:
                at = self._entries_at + (bucket & _LO) - 1
                if _KEY_LEN.unpack_from(mm, at + 4)[0] == klen and \
                        mm[at + 12:at + 12 + klen] == key:
                    return at
            i = (i + 1) & mask
        return -1

    def _key(self, at: int) -> str:
        _, klen, _ = _ENTRY.unpack_from(self._mm, at)
        return _decode(self._mm[at + 12:at + 12 + klen])

    def _value(self, at: int) -> str:
        _, klen, vlen = _ENTRY.unpack_from(self._mm, at)
        start = at + 12 + klen
        return _decode(self._mm[start:start + vlen])

    def get(self, key: str, default: str | None = None) -> str | None:
        """The value of exactly ``key``."""
        at = self._find(_encode(key))
        return default if at < 0 else self._value(at)

    def __contains__(self, key: str) -> bool:
        return self._find(_encode(key)) >= 0

    def __len__(self) -> int:
        return self._count

    def items(self) -> Iterator[tuple[str, str]]:
        """(key, value) in file order."""
        mm, at, end = self._mm, self._entries_at, self._entries_end
        while at < end:
            _, klen, vlen = _ENTRY.unpack_from(mm, at)
            at += 12
            key = mm[at:at + klen]
            at += klen
            yield _decode(key), _decode(mm[at:at + vlen])
            at += vlen

    # -- pattern matches (map_beg, map_dom, map_ip) -----------------------------------

    def _beg_hits(self, key: str) -> list[int]:
        """Offsets of the entries whose key is a prefix of ``key``, in file order."""
        data = _encode(key)
        hits = []
        for length in self._beg:  # ascending
            if length > len(data):
                break
            at = self._find(data[:length])
            if at >= 0:
                hits.append(at)
        return sorted(hits)

    def _dom_hits(self, key: str) -> list[int]:
        """Offsets of the entries matching ``key`` as -m dom patterns, in file order."""
        data = _encode(key)
        spans = [m.span() for m in _WORD.finditer(data)]
        hits = set()
        for n, (start, _) in enumerate(spans):
            for _, end in spans[n:]:
                if end - start > self._dom_max:
                    break
                if end - start in self._dom:
                    run = data[start:end]
                    for lead, trail in self._decorations:
                        at = self._find(lead + run + trail)
                        if at >= 0:
                            hits.add(at)
        return sorted(hits)

    def _ip_hits(self, address: int) -> Iterator[tuple[int, int]]:
        """(prefix length, offset) of the entries whose network holds ``address``: longest
        prefix first, then file order."""
        buckets, chain, mask = self._ip_buckets, self._ip_chain, self._ip_mask
        for plen in self._ip_lengths:  # descending
            word = _IP_FLAG | (address & _MASKS[plen]) << 8 | plen
            i = _hash(self._hasher, word.to_bytes(8, "little")) & mask
            while stored := buckets[2 * i]:
                if stored == word:
                    record = buckets[2 * i + 1]
                    while record != _NO_RECORD:
                        yield plen, self._entries_at + chain[2 * record]
                        record = chain[2 * record + 1]
                    break
                i = (i + 1) & mask

    def prefixes(self, key: str) -> str | None:
        """map_beg: the value of the first pattern (file order) that ``key`` starts with."""
        hits = self._beg_hits(key)
        return self._value(hits[0]) if hits else None

    def domain(self, key: str) -> str | None:
        """map_dom: the value of the first pattern (file order) found in ``key`` as whole
        labels: delimited by dots, slashes or the ends of ``key``."""
        hits = self._dom_hits(key)
        return self._value(hits[0]) if hits else None

    def ip(self, key: str) -> str | None:
        """map_ip: the value of the longest-prefix network holding IPv4 address ``key``
        (the first in file order among equal ones); None if ``key`` is not an address."""
        address = _ipv4(key)
        if address is None or not self._ip_lengths:
            return None
        hit = next(self._ip_hits(address), None)
        return None if hit is None else self._value(hit[1])


def _valid_table(nbuckets: int, entries: int) -> bool:
    """A bucket count is a power of two (or 0 for no entries) with room to stop probes."""
    if nbuckets == 0:
        return entries == 0
    return nbuckets & (nbuckets - 1) == 0 and entries < nbuckets


# -- with runtime edits ---------------------------------------------------------------------


class SharedMap:
    """A map as rules see it: an immutable MapIndex (or none) plus runtime edits.

    The overlay maps a key to its new value, or to None for a base key deleted. Order (for
    `items` and "first in file order" matches): base entries where they are, edited or
    not, then keys only the overlay has, in the order they were added. After `clear` the
    base is hidden entirely and only later additions count.
    """

    def __init__(self, base: MapIndex | None, overlay: dict[str, str | None] | None = None,
                 cleared: bool = False) -> None:
        self._base = base
        self._cleared = cleared
        self._overlay: dict[str, str | None] = {}
        self._len = len(base) if base is not None and not cleared else 0
        for key, value in (overlay or {}).items():
            in_base = self._in_base(key)
            if value is None and not in_base:
                continue  # deleting what is not there: nothing to remember
            self._overlay[key] = value
            if in_base and value is None:
                self._len -= 1
            elif not in_base:
                self._len += 1

    @property
    def base(self) -> MapIndex | None:
        return self._base

    @property
    def cleared(self) -> bool:
        return self._cleared

    def _in_base(self, key: str) -> bool:
        """Whether the visible base has ``key`` (edits aside)."""
        return self._base is not None and not self._cleared and key in self._base

    def _lookup(self, key: str) -> str | None:
        if key in self._overlay:
            return self._overlay[key]
        if self._base is None or self._cleared:
            return None
        return self._base.get(key)

    def get(self, key: str, default: str | None = None) -> str | None:
        value = self._lookup(key)
        return default if value is None else value

    def __contains__(self, key: str) -> bool:
        return self._lookup(key) is not None

    def __len__(self) -> int:
        return self._len

    def add(self, key: str, value: str) -> None:
        """Add ``key`` or replace its value."""
        if self._lookup(key) is None:
            self._len += 1
        self._overlay[key] = value

    def set(self, key: str, value: str) -> bool:
        """Replace the value of ``key``; False (and no change) if there is no such key."""
        if self._lookup(key) is None:
            return False
        self._overlay[key] = value
        return True

    def delete(self, key: str) -> bool:
        """Remove ``key``; False if there is no such key."""
        if self._lookup(key) is None:
            return False
        if self._in_base(key):
            self._overlay[key] = None
        else:
            del self._overlay[key]
        self._len -= 1
        return True

    def clear(self) -> None:
        self._overlay.clear()
        self._cleared = True
        self._len = 0

    def _additions(self) -> Iterator[tuple[str, str]]:
        """Keys only the overlay has, in the order they were added."""
        for key, value in self._overlay.items():
            if value is not None and not self._in_base(key):
                yield key, value

    def items(self) -> Iterator[tuple[str, str]]:
        if self._base is not None and not self._cleared:
            overlay = self._overlay
            for key, value in self._base.items():
                if key in overlay:
                    edited = overlay[key]
                    if edited is not None:
                        yield key, edited
                else:
                    yield key, value
        yield from self._additions()

    def _visible(self, at: int) -> str | None:
        """The current value of the base entry at offset ``at``: None if deleted."""
        assert self._base is not None
        key = self._base._key(at)
        if key in self._overlay:
            return self._overlay[key]
        return self._base._value(at)

    def _first_visible(self, hits: list[int]) -> str | None:
        for at in hits:
            value = self._visible(at)
            if value is not None:
                return value
        return None

    def prefixes(self, key: str) -> str | None:
        """map_beg with the edits (see MapIndex.prefixes)."""
        if self._base is not None and not self._cleared:
            value = self._first_visible(self._base._beg_hits(key))
            if value is not None:
                return value
        return next((v for k, v in self._additions() if key.startswith(k)), None)

    def domain(self, key: str) -> str | None:
        """map_dom with the edits (see MapIndex.domain)."""
        if self._base is not None and not self._cleared:
            value = self._first_visible(self._base._dom_hits(key))
            if value is not None:
                return value
        return next((v for k, v in self._additions() if _dom_match(k, key)), None)

    def ip(self, key: str) -> str | None:
        """map_ip with the edits (see MapIndex.ip): longest prefix, then order."""
        address = _ipv4(key)
        if address is None:
            return None
        best: tuple[int, int, str] | None = None  # (-prefix length, rank, value)
        if self._base is not None and not self._cleared:
            for plen, at in self._base._ip_hits(address):
                value = self._visible(at)
                if value is not None:
                    best = (-plen, at, value)  # hits come best first
                    break
        rank = 1 << 62  # after every base entry
        for k, v in self._additions():
            network = _ip_network(k)
            if network is not None and address & _MASKS[network[1]] == network[0]:
                candidate = (-network[1], rank, v)
                if best is None or candidate < best:
                    best = candidate
            rank += 1
        return None if best is None else best[2]

    # -- passing edits to other processes ---------------------------------------------

    def edits(self) -> dict[str, Any]:
        """The edits as JSON-able data, for `with_edits` in another process."""
        return {"overlay": dict(self._overlay), "cleared": self._cleared}

    @classmethod
    def with_edits(cls, base: MapIndex | None, edits: dict[str, Any]) -> SharedMap:
        """``base`` with the edits of another SharedMap's `edits`."""
        overlay = edits.get("overlay", {})
        cleared = edits.get("cleared", False)
        if not isinstance(overlay, dict) or not isinstance(cleared, bool) or not all(
                isinstance(k, str) and (v is None or isinstance(v, str))
                for k, v in overlay.items()):
            raise ValueError("map edits must be {'overlay': {str: str | None}, "
                             "'cleared': bool}")
        return cls(base, overlay, cleared)
