"""Tests for lb.mapstore: map files indexed once in a memfd and read in place, plus the
runtime edits overlay. Pure: no sockets."""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing
import os
import random
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb.mapstore import MapIndex, SharedMap
from lb.rules.syntax import load_map

REPO = Path(__file__).resolve().parent.parent

TRICKY = (
    "# a comment\n"
    "   # an indented comment\n"
    "#\n"
    "\n"
    "   \t  \n"
    "plain value\n"
    "tabbed\t\tvalue with  inner   blanks\t \n"
    "  indented   v  \n"
    "dup first\n"
    "dup second\n"
    "empty\n"
    "empty-blanks \t \n"
    "crlf value\r\n"
    "cr-only x\rafter-cr y\r"
    "vt a\x0bff b\x0cfs c\x1cgs d\x1drs e\x1e"
    "us\x1fpart-of-key v\n"
    "nbsp\xa0key v\xa0w\n"
    "key#hash #not-a-comment\n"
    "unicode-é ünï\n"
    "emptydup\n"
    "emptydup later\n"
    "last-no-newline   end  "
)
WIDE = "nel a\x85ls b\u2028ps c\u2029tail d\r\n" + TRICKY


def write(tmp_path: Path, text: str, name: str = "m.map") -> str:
    path = tmp_path / name
    path.write_bytes(text.encode())
    return str(path)


@pytest.fixture
def index_of(tmp_path: Path) -> Iterator:
    """Builds indexes from text and closes them after the test."""
    opened: list[MapIndex] = []

    def make(text: str) -> MapIndex:
        index = MapIndex.build(write(tmp_path, text, f"m{len(opened)}.map"))
        opened.append(index)
        return index

    yield make
    for index in opened:
        index.close()


# -- parity with load_map -------------------------------------------------------------------


@pytest.mark.parametrize("text", [TRICKY, WIDE, "", "\n\n", "# only\r\n", "k"],
                         ids=["tricky", "wide-line-ends", "empty", "blank", "comment", "one"])
def test_same_content_as_load_map(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    expected = list(load_map(path).items())
    with MapIndex.build(path) as index:
        assert list(index.items()) == expected
        assert len(index) == len(expected)
        for key, value in expected:
            assert index.get(key) == value
        assert index.path == path


def test_tricky_lines_read_as_haproxy_does(index_of) -> None:
    index = index_of(TRICKY)
    assert index.get("tabbed") == "value with  inner   blanks"
    assert index.get("indented") == "v"
    assert index.get("dup") == "first"
    assert index.get("empty") == "" and index.get("empty-blanks") == ""
    assert index.get("crlf") == "value"
    assert index.get("cr-only") == "x" and index.get("after-cr") == "y"
    assert [index.get(k) for k in ("vt", "ff", "fs", "gs", "rs")] == list("abcde")
    assert index.get("us\x1fpart-of-key") == "v"
    assert index.get("nbsp\xa0key") == "v\xa0w"
    assert index.get("key#hash") == "#not-a-comment"
    assert index.get("emptydup") == ""
    assert index.get("last-no-newline") == "end"
    assert index.get("#") is None and index.get("") is None


def test_random_files_match_load_map(tmp_path: Path) -> None:
    pieces = [" ", "\t", "#", "a", "b", "é", "\r", "\n", "\r\n", "\x0b", "\x0c", "\x1c",
              "\x1d", "\x1e", "\x1f", "\x85", "\u2028", "\u2029", "\xa0", ".", "/", "1"]
    rnd = random.Random(7)
    for n in range(300):
        text = "".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 60)))
        if n % 2:  # half of them on the bytes-only path (no multi-byte line end)
            text = text.replace("\x85", "").replace("\u2028", "").replace("\u2029", "")
        path = write(tmp_path, text)
        with MapIndex.build(path) as index:
            assert list(index.items()) == list(load_map(path).items()), repr(text)


def test_errors_as_load_map(tmp_path: Path) -> None:
    path = tmp_path / "bad.map"
    path.write_bytes(b"a 1\nb 2\nc \xff\n")
    with pytest.raises(ValueError) as expected:
        load_map(str(path))
    with pytest.raises(ValueError) as got:
        MapIndex.build(str(path))
    message = f"map file {str(path)!r} line 3 is not valid UTF-8"
    assert str(got.value) == str(expected.value) == message
    with pytest.raises(OSError):
        MapIndex.build(str(tmp_path / "missing.map"))


# -- the index ------------------------------------------------------------------------------


def test_get_len_items(index_of) -> None:
    index = index_of("b 2\na 1\nc 3\na 9\n")
    assert len(index) == 3
    assert list(index.items()) == [("b", "2"), ("a", "1"), ("c", "3")]
    assert index.get("a") == "1"
    assert index.get("z") is None
    assert index.get("z", "dflt") == "dflt"
    assert "c" in index and "z" not in index
    assert index.get("\udcff") is None  # a lone surrogate cannot match, and does not raise


def test_from_items_first_wins_and_source() -> None:
    with MapIndex.from_items([("k", "1"), ("k", "2"), ("x", "")], path="p") as index:
        assert list(index.items()) == [("k", "1"), ("x", "")]
        assert index.path == "p" and index.source is None
        assert not index.matches_file()
    with MapIndex.from_items(iter([])) as empty:
        assert len(empty) == 0 and list(empty.items()) == [] and empty.get("a") is None
        assert empty.prefixes("a") is None and empty.domain("a") is None
        assert empty.ip("1.2.3.4") is None


def test_source_identifies_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "a 1\n")
    with MapIndex.build(path) as index:
        st = os.stat(path)
        assert index.source == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        assert index.matches_file()
        Path(path).write_text("a 22\n")
        assert not index.matches_file()


def test_prefixes_first_in_file_order(index_of) -> None:
    index = index_of("/api/v2 v2\n/api api\n/ root\n/static static\n")
    assert index.prefixes("/api/v2/users") == "v2"
    assert index.prefixes("/api/v1") == "api"
    assert index.prefixes("/static/x.css") == "root"  # "/" comes before "/static"
    assert index.prefixes("nothing") is None
    later = index_of("/static static\n/ root\n")
    assert later.prefixes("/static/x.css") == "static"
    assert later.prefixes("/img") == "root"
    assert later.prefixes("/sta") == "root"


def test_prefixes_on_multibyte_keys(index_of) -> None:
    index = index_of("é e-acute\nü u\n")
    assert index.prefixes("ééé") == "e-acute"
    assert index.prefixes("e") is None


def test_domain_matches_whole_labels(index_of) -> None:
    index = index_of(
        "example.com ex\n"
        ".org org\n"
        "www.example.com www\n"
        "/static/ static\n"
        "a..b dots\n"
        "... never\n"
    )
    assert index.domain("example.com") == "ex"
    assert index.domain("www.example.com") == "ex"  # example.com is first in the file
    assert index.domain("example.com/path") == "ex"
    assert index.domain("a.example.com.") == "ex"
    assert index.domain("notexample.com") is None
    assert index.domain("example.community") is None
    assert index.domain("www.example.org") == "org"
    assert index.domain("org") == "org"
    assert index.domain("organic.net") is None
    assert index.domain("/static/app.js") == "static"
    assert index.domain("cdn.static") == "static"
    assert index.domain("staticx") is None
    assert index.domain("x.a..b.y") == "dots"
    assert index.domain("x.a.b") is None
    assert index.domain("...") is None
    assert index.domain("") is None
    first = index_of("www.example.com www\nexample.com ex\n")
    assert first.domain("www.example.com") == "www"
    assert first.domain("api.example.com") == "ex"


def test_ip_longest_prefix(index_of) -> None:
    index = index_of(
        "10.0.0.0/8 ten\n"
        "10.1.0.0/16 ten-one\n"
        "10.1.2.3 host\n"
        "10.9.9.9/8 ten-again\n"  # the same network as 10.0.0.0/8, later: never wins
        "0.0.0.0/0 any\n"
        "bogus x\n"
        "10.1.2.0/33 bad-length\n"
        "10.1.2.300 bad-address\n"
        "010.1.2.4 leading-zero\n"
        "192.168.1.1/24 lan\n"
    )
    assert index.ip("10.1.2.3") == "host"
    assert index.ip("10.1.2.4") == "ten-one"
    assert index.ip("10.2.0.1") == "ten"
    assert index.ip("192.168.1.77") == "lan"
    assert index.ip("8.8.8.8") == "any"
    assert index.ip("not an ip") is None
    assert index.ip("10.1.2") is None
    assert index.ip("::1") is None
    assert index.ip("") is None
    assert index.get("bogus") == "x"  # still an ordinary entry
    assert index_of("10.0.0.0/8 a\n").ip("11.0.0.1") is None
    assert index_of("a b\n").ip("1.2.3.4") is None


def test_open_rejects_what_is_not_an_index(tmp_path: Path) -> None:
    fd = os.memfd_create("not-a-map")
    try:
        with pytest.raises(ValueError, match="too small"):
            MapIndex.open(fd)
        os.write(fd, b"x" * 4096)
        with pytest.raises(ValueError, match="not a pylb map index"):
            MapIndex.open(fd)
    finally:
        os.close(fd)
    with MapIndex.from_items([("a", "1")]) as index:
        image = bytearray(os.pread(index.fd, os.fstat(index.fd).st_size, 0))
    for change, message in ((lambda b: struct.pack_into("<I", b, 8, 99), "version 99"),
                            (lambda b: b.extend(b"\0" * 8), "bytes, the file has"),
                            (lambda b: struct.pack_into("<I", b, 40, 3), "inconsistent")):
        broken = bytearray(image)
        change(broken)
        fd = os.memfd_create("broken-map")
        try:
            os.write(fd, broken)
            with pytest.raises(ValueError, match=message):
                MapIndex.open(fd)
        finally:
            os.close(fd)


def test_memfd_is_sealed_and_close_is_idempotent() -> None:
    index = MapIndex.from_items([("a", "1")])
    try:
        seals = fcntl.fcntl(index.fd, fcntl.F_GET_SEALS)
    except OSError:
        pytest.skip("no memfd sealing here")
    assert seals & fcntl.F_SEAL_WRITE
    with pytest.raises(OSError) as err:
        os.pwrite(index.fd, b"x", 0)
    assert err.value.errno == errno.EPERM
    index.close()
    index.close()
    assert index.fd == -1


CHILD = """
import json, sys
from lb.mapstore import MapIndex, SharedMap
index = MapIndex.open(int(sys.argv[1]))
shared = SharedMap.with_edits(index, json.loads(sys.argv[2]))
print(json.dumps({"items": list(index.items()), "path": index.path,
                  "get": index.get("/b"), "beg": index.prefixes("/a/x"),
                  "ip": index.ip("10.0.0.7"), "shared": list(shared.items())}))
index.close()
"""


def test_open_in_another_process(tmp_path: Path) -> None:
    path = write(tmp_path, "/a 1\n/b 2\n10.0.0.0/24 net\n")
    with MapIndex.build(path) as index:
        shared = SharedMap(index)
        shared.add("new", "n")
        shared.delete("/a")
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(index.fd), json.dumps(shared.edits())],
            pass_fds=(index.fd,), capture_output=True, text=True, check=True, cwd=REPO)
        got = json.loads(out.stdout)
        assert got["items"] == [list(item) for item in index.items()]
        assert got["path"] == path
        assert (got["get"], got["beg"], got["ip"]) == ("2", "1", "net")
        assert got["shared"] == [list(item) for item in shared.items()]


def _forked_lookup(fd: int, queue: multiprocessing.Queue) -> None:
    index = MapIndex.open(os.dup(fd))
    queue.put((len(index), index.get("k2"), index.domain("www.k3")))
    index.close()


def test_open_in_a_forked_child() -> None:
    with MapIndex.from_items([("k1", "1"), ("k2", "2"), ("k3", "3")]) as index:
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_forked_lookup, args=(index.fd, queue))
        child.start()
        assert queue.get(timeout=10) == (3, "2", "3")
        child.join(10)
        assert child.exitcode == 0


def test_large_map(tmp_path: Path) -> None:
    n = 200_000
    path = tmp_path / "big.map"
    with open(path, "w") as f:
        f.writelines(f"/path/{i:06d} backend_{i % 10}\n" for i in range(n))
    started = time.perf_counter()
    with MapIndex.build(str(path)) as index:
        built = time.perf_counter() - started
        assert len(index) == n
        rnd = random.Random(3)
        for i in rnd.sample(range(n), 2000):
            assert index.get(f"/path/{i:06d}") == f"backend_{i % 10}"
            assert index.prefixes(f"/path/{i:06d}/x") == f"backend_{i % 10}"
        assert index.get("/path/200000") is None
        assert index.domain("/path/000042") == "backend_2"
        assert sum(1 for _ in index.items()) == n
        assert os.fstat(index.fd).st_size < 20_000_000
    assert built < 4.0


# -- runtime edits --------------------------------------------------------------------------


@pytest.fixture
def base() -> Iterator[MapIndex]:
    with MapIndex.from_items([("a", "1"), ("b", "2"), ("c", "3")]) as index:
        yield index


def test_overlay_edits(base: MapIndex) -> None:
    m = SharedMap(base)
    assert len(m) == 3 and m.get("a") == "1"
    m.add("d", "4")  # new key: after the base
    m.add("a", "10")  # replaces, keeps its place
    assert m.set("b", "20")
    assert not m.set("zz", "x")
    assert m.delete("c")
    assert not m.delete("c") and not m.delete("zz")
    assert len(m) == 3
    assert list(m.items()) == [("a", "10"), ("b", "20"), ("d", "4")]
    assert m.get("c") is None and m.get("c", "dflt") == "dflt"
    assert "c" not in m and "d" in m
    m.add("c", "30")  # back again
    assert len(m) == 4 and m.get("c") == "30"
    assert m.delete("d") and len(m) == 3 and "d" not in m
    assert base.get("a") == "1"  # the base never changes
    m.clear()
    assert len(m) == 0 and list(m.items()) == [] and m.get("a") is None
    assert not m.set("a", "x") and not m.delete("a")
    m.add("b", "new")
    assert len(m) == 1 and list(m.items()) == [("b", "new")]
    assert m.delete("b") and len(m) == 0


def test_without_base() -> None:
    m = SharedMap(None)
    assert len(m) == 0 and m.get("x") is None
    m.add("x", "1")
    m.add("y", "2")
    assert list(m.items()) == [("x", "1"), ("y", "2")] and len(m) == 2
    assert m.prefixes("xyz") == "1" and m.domain("a.y") == "2"


def test_edits_round_trip_through_json(base: MapIndex) -> None:
    m = SharedMap(base)
    m.add("new", "n")
    m.delete("a")
    m.set("b", "bb")
    copy = SharedMap.with_edits(base, json.loads(json.dumps(m.edits())))
    assert list(copy.items()) == list(m.items()) == [("b", "bb"), ("c", "3"), ("new", "n")]
    assert len(copy) == len(m) == 3
    m.clear()
    m.add("only", "o")
    copy = SharedMap.with_edits(base, json.loads(json.dumps(m.edits())))
    assert copy.cleared and list(copy.items()) == [("only", "o")] and len(copy) == 1
    # a deletion of a key the base does not have is dropped, not counted
    assert len(SharedMap(base, {"zz": None, "a": None})) == 2
    with pytest.raises(ValueError):
        SharedMap.with_edits(base, {"overlay": {"a": 1}})
    with pytest.raises(ValueError):
        SharedMap.with_edits(base, {"overlay": {}, "cleared": "yes"})


def test_pattern_matches_honour_the_overlay() -> None:
    items = [("/api/v2", "v2"), ("/api", "api"), ("example.com", "ex"),
             ("www.example.com", "www"), ("10.0.0.0/8", "ten"), ("10.1.0.0/16", "ten-one"),
             ("10.9.9.9/8", "ten-again")]
    with MapIndex.from_items(items) as index:
        m = SharedMap(index)
        assert m.prefixes("/api/v2/x") == "v2"
        m.delete("/api/v2")
        assert m.prefixes("/api/v2/x") == "api"
        m.set("/api", "API")
        assert m.prefixes("/api/v2/x") == "API"
        m.add("/", "root")  # added: after every base pattern
        assert m.prefixes("/api/v2/x") == "API" and m.prefixes("/img") == "root"

        assert m.domain("www.example.com") == "ex"
        m.delete("example.com")
        assert m.domain("www.example.com") == "www"
        assert m.domain("shop.example.com") is None
        assert m.domain("api.example.com") == "API"  # "/api" is the label "api"
        m.add(".example.com.", "added")
        assert m.domain("shop.example.com") == "added"
        assert m.domain("www.example.com") == "www"

        assert m.ip("10.1.2.3") == "ten-one"
        m.add("10.1.2.0/24", "added-24")  # longer prefix beats file order
        assert m.ip("10.1.2.3") == "added-24"
        m.delete("10.1.2.0/24")
        m.delete("10.1.0.0/16")
        assert m.ip("10.1.2.3") == "ten"
        m.delete("10.0.0.0/8")
        assert m.ip("10.1.2.3") == "ten-again"  # same network, next in the file
        m.delete("10.9.9.9/8")
        assert m.ip("10.1.2.3") is None
        m.add("0.0.0.0/0", "any")
        assert m.ip("10.1.2.3") == "any" and m.ip("bad") is None

        m.clear()
        assert m.prefixes("/api") is None and m.domain("example.com") is None
        assert m.ip("10.1.2.3") is None
