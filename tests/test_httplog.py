"""Tests for lb.httplog: HAProxy-format request log lines and the sinks that write them.
Pure: no pylb processes, only local files and sockets."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb import httplog
from lb.httplog import Record, RequestLog, format_http, format_tcp

ROOT = Path(__file__).resolve().parents[1]

# 2026-11-21 08:50:01.123 UTC
T0 = 1795251001.123


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run every test in UTC so that dates are exact; restore the zone afterwards."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    httplog._clear_caches()
    yield
    monkeypatch.undo()
    time.tzset()
    httplog._clear_caches()


def record(**changes: object) -> Record:
    rec = Record(
        client_ip="127.0.0.1", client_port=34567, accept_time=T0,
        frontend="www", backend="app", server="s1",
        tq=0, tw=0, tc=1, tr=2, tt=3, status=200, bytes_read=123, termination="----",
        actconn=1, feconn=1, beconn=0, srv_conn=0, retries=0, srv_queue=0, backend_queue=0,
        request_line="GET / HTTP/1.1", mode="http",
    )
    return dataclasses.replace(rec, **changes)  # type: ignore[arg-type]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path, for UNIX sockets (107 bytes at most)."""
    path = Path(tempfile.mkdtemp(prefix="hl", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


SYSLOG_RE = re.compile(
    r"<134>(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [ 123]\d \d\d:\d\d:\d\d "
    r"(?P<tag>[^\[]+)\[(?P<pid>\d+)\]: (?P<line>.*)",
    re.DOTALL,
)


# -- formats ----------------------------------------------------------------------------------


def test_http_line() -> None:
    assert format_http(record()) == (
        '127.0.0.1:34567 [21/Nov/2026:08:50:01.123] www app/s1 0/0/1/2/3 200 123 - - ---- '
        '1/1/0/0/0 0/0 "GET / HTTP/1.1"'
    )


def test_http_line_without_server_and_with_unset_timers() -> None:
    rec = record(server="<NOSRV>", tw=-1, tc=-1, tr=-1, tt=5, status=503, bytes_read=217,
                 termination="SC--", actconn=7, feconn=5, beconn=2, retries=3,
                 request_line="POST /api?x=1 HTTP/1.0")
    assert format_http(rec) == (
        '127.0.0.1:34567 [21/Nov/2026:08:50:01.123] www app/<NOSRV> 0/-1/-1/-1/5 503 217 - - '
        'SC-- 7/5/2/0/3 0/0 "POST /api?x=1 HTTP/1.0"'
    )
    # a request that never arrived (timeout, bad request): every timer but tt unset
    rec = record(backend="www", server="<NOSRV>", tq=-1, tw=-1, tc=-1, tr=-1, tt=10001,
                 status=408, bytes_read=0, termination="cR--", request_line="")
    assert format_http(rec) == (
        '127.0.0.1:34567 [21/Nov/2026:08:50:01.123] www www/<NOSRV> -1/-1/-1/-1/10001 408 0 '
        '- - cR-- 1/1/0/0/0 0/0 "<BADREQ>"'
    )


def test_http_line_options() -> None:
    # redispatched retries get HAProxy's + prefix; queues and IPv6 clients as HAProxy
    rec = record(client_ip="::1", client_port=5, retries=1, redispatched=True,
                 srv_queue=4, backend_queue=9, termination="--NI")
    assert format_http(rec) == (
        '::1:5 [21/Nov/2026:08:50:01.123] www app/s1 0/0/1/2/3 200 123 - - --NI '
        '1/1/0/0/+1 4/9 "GET / HTTP/1.1"'
    )


def test_request_line_is_escaped() -> None:
    rec = record(request_line='GET /a"b#c\r\nX: \x7f\xe9\u20ac HTTP/1.1')
    assert format_http(rec).endswith('"GET /a#22b#23c#0D#0AX: #7F#E9#E2#82#AC HTTP/1.1"')
    rec = record(request_line="GET /\udcff HTTP/1.1")  # a byte kept by surrogateescape
    assert format_http(rec).endswith('"GET /#FF HTTP/1.1"')


def test_tcp_line() -> None:
    rec = record(frontend="db", backend="pg", tq=-1, tr=-1, tw=0, tc=1, tt=3, mode="tcp",
                 termination="----", status=-1, request_line="")
    assert format_tcp(rec) == (
        "127.0.0.1:34567 [21/Nov/2026:08:50:01.123] db pg/s1 0/1/3 123 -- 1/1/0/0/0 0/0"
    )
    rec = record(frontend="db", backend="pg", server="<NOSRV>", tw=-1, tc=-1, tt=5002,
                 bytes_read=0, termination="SC--", retries=3, mode="tcp")
    assert format_tcp(rec) == (
        "127.0.0.1:34567 [21/Nov/2026:08:50:01.123] db pg/<NOSRV> -1/-1/5002 0 SC 1/1/0/0/3 0/0"
    )


def test_accept_date_milliseconds_and_padding() -> None:
    assert httplog.accept_date(T0) == "21/Nov/2026:08:50:01.123"
    assert httplog.accept_date(T0 + 0.876) == "21/Nov/2026:08:50:01.999"  # same second
    assert httplog.accept_date(T0 + 0.877) == "21/Nov/2026:08:50:02.000"
    assert httplog.accept_date(1767225599.9999) == "31/Dec/2025:23:59:59.999"  # truncated
    assert httplog.accept_date(1767225600.0) == "01/Jan/2026:00:00:00.000"
    assert httplog.accept_date(1770508800.05) == "08/Feb/2026:00:00:00.050"
    # every ms of a second formats exactly (no 0.123 -> 122 float slips)
    base = 1795251001
    for ms in range(1000):
        assert httplog.accept_date(base + ms / 1000).endswith(f":01.{ms:03d}")


def test_accept_date_is_local_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Kolkata")  # +05:30, no DST
    time.tzset()
    httplog._clear_caches()
    assert httplog.accept_date(T0) == "21/Nov/2026:14:20:01.123"
    monkeypatch.setenv("TZ", "America/New_York")  # -05:00 in November
    time.tzset()
    httplog._clear_caches()
    assert httplog.accept_date(T0) == "21/Nov/2026:03:50:01.123"


def test_date_cache_follows_the_clock() -> None:
    seen = [httplog.accept_date(T0 + i * 0.25) for i in range(12)]
    assert seen[0] == "21/Nov/2026:08:50:01.123"
    assert seen[4] == "21/Nov/2026:08:50:02.123"
    assert seen[11] == "21/Nov/2026:08:50:03.873"
    assert httplog.accept_date(T0 - 3600) == "21/Nov/2026:07:50:01.123"  # going back too
    assert httplog.syslog_timestamp(T0) == "Nov 21 08:50:01"
    assert httplog.syslog_timestamp(1770377654.5) == "Feb  6 11:34:14"  # day padded by a space


def test_write_picks_the_format_by_mode(tmp_path: Path) -> None:
    path = tmp_path / "req.log"
    with RequestLog(str(path)) as log:
        log.write(record())
        log.write(record(mode="tcp"))
    assert path.read_text().splitlines() == [format_http(record()), format_tcp(record())]


# -- files ------------------------------------------------------------------------------------


def test_file_appends(tmp_path: Path) -> None:
    path = tmp_path / "req.log"
    path.write_text("earlier line\n")
    log = RequestLog(str(path))
    log.write(record())
    # unbuffered: the line is in the file before close
    assert path.read_text() == "earlier line\n" + format_http(record()) + "\n"
    log.write(record(status=404))
    assert log.dropped == 0
    log.close()
    log.write(record(status=500))  # after close: dropped, no error
    lines = path.read_text().splitlines()
    assert [line.split()[5] for line in lines[1:]] == ["200", "404"]
    assert oct(path.stat().st_mode & 0o777) in ("0o644", "0o640", "0o600", "0o604")


def test_file_reopen_after_logrotate_rename(tmp_path: Path) -> None:
    path = tmp_path / "req.log"
    log = RequestLog(str(path))
    log.write(record(status=201))
    path.rename(tmp_path / "req.log.1")
    log.write(record(status=202))  # before reopen: still the renamed file
    log.reopen()
    log.write(record(status=203))
    log.write(record(status=204))
    log.close()
    old = (tmp_path / "req.log.1").read_text().splitlines()
    new = path.read_text().splitlines()
    assert [line.split()[5] for line in old] == ["201", "202"]
    assert [line.split()[5] for line in new] == ["203", "204"]


def test_file_target_that_vanished(tmp_path: Path) -> None:
    logdir = tmp_path / "logs"
    logdir.mkdir()
    log = RequestLog(str(logdir / "req.log"))
    log.write(record())
    kept = os.open(logdir / "req.log", os.O_RDONLY)  # to read the unlinked file later
    shutil.rmtree(logdir)
    log.reopen()  # the directory is gone: cannot reopen, does not raise
    assert log.last_error is not None and "No such file" in log.last_error
    log.write(record(status=202))  # the old file stays in use rather than losing lines
    assert log.dropped == 0
    assert os.read(kept, 4096).decode().count("\n") == 2
    os.close(kept)
    logdir.mkdir()  # it comes back: reopen() uses it
    log.reopen()
    log.write(record(status=299))
    assert (logdir / "req.log").read_text().split()[5] == "299"
    log.close()


def test_unopenable_file_does_not_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "missing" / "req.log"
    log = RequestLog(str(path))
    for _ in range(3):
        log.write(record())
    log.reopen()
    assert log.dropped == 3
    assert log.last_error is not None and "No such file" in log.last_error
    path.parent.mkdir()
    log.write(record())  # within RETRY_INTERVAL of the last attempt: not tried yet
    assert log.dropped == 4 and not path.exists()
    log.close()
    monkeypatch.setattr(httplog, "RETRY_INTERVAL", 0.0)
    log = RequestLog(str(tmp_path / "later" / "req.log"))
    (tmp_path / "later").mkdir()
    log.write(record(status=299))  # the first write after RETRY_INTERVAL opens it
    assert (tmp_path / "later" / "req.log").read_text().split()[5] == "299"
    assert log.dropped == 0
    log.close()


_WRITER = """
import sys
from lb.httplog import Record, RequestLog
path, who = sys.argv[1], sys.argv[2]
log = RequestLog(path)
for i in range(500):
    rec = Record(who, i, 1795251001.123, "www", "app", "s1", 0, 0, 1, 2, 3, 200, i,
                 "----", 1, 1, 0, 0, 0, 0, 0, "GET /" + who * 2000 + " HTTP/1.1", "http")
    log.write(rec)
log.close()
assert log.dropped == 0
"""


def test_concurrent_appends_from_two_processes_do_not_tear_lines(tmp_path: Path) -> None:
    path = tmp_path / "shared.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), who], env=env)
        for who in ("a", "b")
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    lines = path.read_text().split("\n")
    assert lines.pop() == ""
    assert len(lines) == 1000
    seen: dict[str, list[int]] = {"a": [], "b": []}
    for line in lines:
        m = re.fullmatch(r'([ab]):(\d+) \[.*\] www app/s1 .* "GET /([ab]+) HTTP/1\.1"', line)
        assert m is not None, line[:100]
        who, port, path_part = m[1], int(m[2]), m[3]
        assert path_part == who * 2000
        seen[who].append(port)
    assert seen["a"] == list(range(500))
    assert seen["b"] == list(range(500))


def test_stderr_target(capfd: pytest.CaptureFixture[str]) -> None:
    log = RequestLog("stderr")
    log.write(record())
    log.close()
    out, err = capfd.readouterr()
    assert err == format_http(record()) + "\n"
    assert out == ""


# -- syslog -----------------------------------------------------------------------------------


def test_udp_syslog_datagram() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(5)
        port = receiver.getsockname()[1]
        log = RequestLog(f"udp@127.0.0.1:{port}")
        log.write(record())
        log.write(record(mode="tcp"))
        first = receiver.recv(65536).decode()
        second = receiver.recv(65536).decode()
        log.close()
    m = SYSLOG_RE.fullmatch(first)
    assert m is not None, first
    assert (m["tag"], int(m["pid"]), m["line"]) == ("pylb", os.getpid(), format_http(record()))
    m = SYSLOG_RE.fullmatch(second)
    assert m is not None and m["line"] == format_tcp(record(mode="tcp"))
    assert not first.endswith("\n")


def test_udp_syslog_ipv6_and_tag() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as receiver:
        try:
            receiver.bind(("::1", 0))
        except OSError:
            pytest.skip("no ::1")
        receiver.settimeout(5)
        port = receiver.getsockname()[1]
        log = RequestLog(f"udp@[::1]:{port}", tag="lb-test")
        log.write(record())
        data = receiver.recv(65536).decode()
        log.close()
    m = SYSLOG_RE.fullmatch(data)
    assert m is not None and m["tag"] == "lb-test"


def test_udp_receiver_gone_does_not_raise() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = RequestLog(f"udp@127.0.0.1:{port}")  # nobody listens: ICMP port unreachable
    for _ in range(20):
        log.write(record())
        time.sleep(0.001)
    log.close()


def test_long_lines_are_cut_to_one_datagram(short_dir: Path) -> None:
    path = short_dir / "log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        receiver.settimeout(5)
        log = RequestLog(f"unix@{path}")
        log.write(record(request_line="GET /" + "x" * 20000 + " HTTP/1.1"))
        data = receiver.recv(65536)
        log.close()
    assert len(data) == httplog.MAX_DATAGRAM
    assert SYSLOG_RE.fullmatch(data.decode()) is not None


def test_unix_syslog_datagram(short_dir: Path) -> None:
    path = short_dir / "log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        receiver.settimeout(5)
        log = RequestLog(f"unix@{path}")
        log.write(record())
        data = receiver.recv(65536).decode()
        log.close()
    m = SYSLOG_RE.fullmatch(data)
    assert m is not None, data
    assert (m["tag"], int(m["pid"]), m["line"]) == ("pylb", os.getpid(), format_http(record()))


def test_unix_receiver_vanishes_and_comes_back(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(httplog, "RETRY_INTERVAL", 0.0)
    path = short_dir / "log"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    log = RequestLog(f"unix@{path}")
    log.write(record(status=201))
    assert receiver.recv(65536).decode().endswith('"GET / HTTP/1.1"')
    receiver.close()
    path.unlink()
    for _ in range(3):  # the syslog daemon is gone: dropped, no error
        log.write(record(status=202))
    assert log.dropped == 3
    assert log.last_error is not None
    # it restarts (a new socket at the same path): later writes reach it
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        receiver.settimeout(5)
        log.write(record(status=203))
        m = SYSLOG_RE.fullmatch(receiver.recv(65536).decode())
        assert m is not None and m["line"].split()[5] == "203"
        # and reopen() reconnects at once
        log.reopen()
        log.write(record(status=204))
        m = SYSLOG_RE.fullmatch(receiver.recv(65536).decode())
        assert m is not None and m["line"].split()[5] == "204"
    log.close()


def test_unix_target_missing_at_start(short_dir: Path) -> None:
    log = RequestLog(f"unix@{short_dir}/nothing-here")
    log.write(record())
    log.write(record(mode="tcp"))
    assert log.dropped == 2
    log.reopen()
    log.close()
    log.write(record())


def test_full_receiver_drops_instead_of_blocking(short_dir: Path) -> None:
    path = short_dir / "log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        receiver.bind(str(path))
        log = RequestLog(f"unix@{path}")
        start = time.monotonic()
        for _ in range(5000):  # nobody reads: the receive buffer fills up
            log.write(record())
        elapsed = time.monotonic() - start
        log.close()
    assert log.dropped > 0
    assert elapsed < 10


def test_write_never_raises_on_a_bad_record(tmp_path: Path) -> None:
    log = RequestLog(str(tmp_path / "x.log"))
    log.write(record(accept_time="yesterday"))  # type: ignore[arg-type]
    assert log.dropped == 1
    log.close()
    assert (tmp_path / "x.log").read_text() == ""


@pytest.mark.parametrize("target", ["", "udp@nohost", "udp@h:0", "unix@"])
def test_malformed_targets_are_rejected_up_front(target: str) -> None:
    with pytest.raises(ValueError):
        RequestLog(target)
