"""Pure helpers of bench/bench.py: no process is started."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_under_test", REPO / "bench" / "bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

WRK_OUTPUT = """\
Running 1s test @ http://127.0.0.1:39555/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.97ms    0.97ms  11.31ms   94.79%
    Req/Sec     2.23k   207.26     2.82k    81.82%
  Latency Distribution
     50%  784.00us
     75%    1.03ms
     90%    1.36ms
     99%    6.14ms
  2444 requests in 1.10s, 1.21MB read
  Socket errors: connect 0, read 3, write 1, timeout 2
  Non-2xx or 3xx responses: 12
Requests/sec:   2221.66
Transfer/sec:      1.10MB
"""


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("text", "size"),
    [("100", 100), ("64k", 65536), ("1m", 1 << 20), ("1M", 1 << 20), ("2MB", 2 << 20),
     ("1MiB", 1 << 20), ("1g", 1 << 30), (" 7 ", 7)],
)
def test_parse_size(text: str, size: int) -> None:
    assert bench.parse_size(text) == size


@pytest.mark.parametrize("text", ["0", "", "m", "1x", "-1", "1.5m", "1 m b"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_size(text)


def test_size_text() -> None:
    assert bench.size_text(None) == "hello (6 B)"
    assert bench.size_text(1 << 20) == "1m (1048576 B)"
    assert bench.size_text(65536) == "64k (65536 B)"
    assert bench.size_text(1000) == "1000 B"


def test_body_bytes() -> None:
    assert bench.body_bytes(None) == b"hello\n"
    for size in (1, 70, 1 << 20):
        assert len(bench.body_bytes(size)) == size


def test_parse_tree(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pylb").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "pylb").chmod(0o755)
    (tmp_path / "lb").mkdir()
    (tmp_path / "lb" / "__init__.py").write_text("")
    tree = bench.parse_tree(f"base={tmp_path}")
    assert tree.label == "base" and tree.root == tmp_path.resolve()
    assert tree.target == "pylb@base"
    for bad in ("base", f"={tmp_path}", "base=", f"a b={tmp_path}", f"x={tmp_path / 'nope'}"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_tree(bad)


def test_parse_args_defaults_and_targets(tmp_path: Path) -> None:
    opts = bench.parse_args([])
    assert opts.rounds == 5 and opts.duration == 10 and opts.size is None
    assert opts.targets == ("direct", "haproxy", "pylb")
    assert opts.wrk_timeout == "10s"
    opts = bench.parse_args(["--only", "pylb,haproxy", "--size", "1m", "--rounds", "2"])
    assert opts.only == ("haproxy", "pylb") and opts.size == 1 << 20 and opts.rounds == 2
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "direct,haproxy", "--profile", str(tmp_path / "p.raw")])


def test_options_defaults_for_other_scripts() -> None:
    """reload.py, state.py build Options with the original nine fields only."""
    opts = bench.Options(
        duration=0, connections=0, workers=2, mode="http", checks=False, json_path=None,
        only=("pylb",), warmup=0, keep_tmp=False,
    )
    assert opts.rounds == 1 and opts.size is None and opts.wrk_timeout is None
    assert opts.targets == ("pylb",)


# --------------------------------------------------------------------------- nginx


def test_nginx_config_small_and_sized(tmp_path: Path) -> None:
    small = bench.nginx_config(tmp_path, (1001, 1002))
    assert 'return 200 "hello\\n";' in small and "try_files" not in small
    assert "keepalive_requests 100000000;" in small
    sized = bench.nginx_config(tmp_path, (1001, 1002), 1 << 20)
    assert f"root {tmp_path}/www; try_files /body.bin =404;" in sized
    assert "sendfile on;" in sized and "keepalive_requests 100000000;" in sized
    assert sized.count("listen 127.0.0.1:") == 2


# --------------------------------------------------------------------------- wrk


def test_parse_wrk() -> None:
    r = bench.parse_wrk(WRK_OUTPUT)
    assert r.requests == 2444
    assert r.seconds == pytest.approx(1.10)
    assert r.rps == pytest.approx(2221.66)
    assert r.non2xx == 12
    assert r.socket_errors == {"connect": 0, "read": 3, "write": 1, "timeout": 2}
    assert r.errors == 18
    assert r.latency_ms == pytest.approx({"p50": 0.784, "p75": 1.03, "p90": 1.36, "p99": 6.14})
    assert r.transfer_bytes_per_s == pytest.approx(1.10 * (1 << 20))


def test_parse_wrk_without_errors_or_transfer() -> None:
    text = WRK_OUTPUT.replace("  Socket errors: connect 0, read 3, write 1, timeout 2\n", "")
    text = text.replace("  Non-2xx or 3xx responses: 12\n", "")
    text = text.replace("Transfer/sec:      1.10MB\n", "")
    r = bench.parse_wrk(text)
    assert r.non2xx == 0 and sum(r.socket_errors.values()) == 0
    assert r.transfer_bytes_per_s is None


def test_parse_wrk_garbage() -> None:
    with pytest.raises(bench.BenchError):
        bench.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


# --------------------------------------------------------------------------- statistics


def test_spread() -> None:
    assert bench.spread([25.0, 23.5, 24.1], ".1f") == "24.1 (23.5–25.0)"
    assert bench.spread([24.1], ".1f") == "24.1"
    assert bench.spread([24.11, 24.14], ".1f") == "24.1"  # range collapses at that precision
    assert bench.spread([], ".1f") == "-"
    assert bench.spread([1.0, 2.0, 3.0, 10.0], ".1f") == "2.5 (1.0–10.0)"


def test_median_range() -> None:
    assert bench.median_range([]) is None
    assert bench.median_range([3, 1, 2]) == (2, 1, 3)


def wrk(rps: float, requests: int, seconds: float = 1.0, non2xx: int = 0, read: int = 0):
    return bench.WrkResult(
        requests=requests, seconds=seconds, rps=rps, non2xx=non2xx,
        socket_errors={"connect": 0, "read": read, "write": 0, "timeout": 0},
        latency_ms={"p50": 1.0, "p99": 2.0},
    )


def result(target: str, rnd: int, rps: float, user: float | None, system: float | None,
           **kw) -> object:
    r = bench.TargetResult(target, 1, wrk=wrk(rps, int(rps), **kw), backend_cpu_s=0.5, round=rnd)
    if user is not None and system is not None:
        r.proxy_user_s, r.proxy_sys_s, r.proxy_cpu_s = user, system, user + system
    return r


def test_summarize_medians_sums_and_paired_ratios() -> None:
    opts = bench.parse_args(["--only", "haproxy,pylb", "--rounds", "3"])
    results = [
        result("haproxy", 1, 1000, 0.005, 0.010, non2xx=1),
        result("pylb", 1, 500, 0.010, 0.010),
        result("haproxy", 2, 1000, 0.004, 0.011, read=2),
        result("pylb", 2, 800, 0.016, 0.016),
        bench.TargetResult("haproxy", 1, error="boom", round=3),
        result("pylb", 3, 900, 0.018, 0.018),
    ]
    s = bench.summarize(opts, results)
    h = s.figures["haproxy"]
    assert h["cpu_us"]["median"] == pytest.approx(15.0)
    assert h["cpu_us"]["values"] == [pytest.approx(15.0), pytest.approx(15.0), None]
    assert h["non2xx"]["sum"] == 1 and h["sock_err"]["sum"] == 2
    p = s.figures["pylb"]
    assert p["cpu_us"]["median"] == pytest.approx(40.0)
    assert p["cpu_us"]["min"] == pytest.approx(40.0) and p["rps"]["max"] == 900
    # ratios per round from that round's pair only: round 3 has no haproxy run
    cpu = s.ratios["pylb/haproxy cpu_per_request"]
    assert cpu["values"] == [pytest.approx(40 / 15), pytest.approx(40 / 15), None]
    assert s.ratios["pylb/haproxy rps"]["values"][:2] == [0.5, 0.8]
    assert s.ratios["pylb/haproxy rps"]["median"] == pytest.approx(0.65)
    assert s.ratios["pylb/haproxy user"]["values"][0] == pytest.approx(20 / 5)
    text = bench.figure_table(opts, s, results)
    assert "rounds measured" in text and "2/3" in text and "3/3" in text
    assert "40.0" in text and "CPU ms/MB" not in text


def test_round_ratios_variants_and_size() -> None:
    by = {
        "haproxy": {"cpu_us": 10.0, "user_us": 2.0, "rps": 100.0, "cpu_ms_per_mb": 1.0},
        "pylb": {"cpu_us": 20.0, "user_us": 8.0, "rps": 50.0, "cpu_ms_per_mb": 2.0},
        "pylb@base": {"cpu_us": 25.0, "user_us": 10.0, "rps": 40.0, "cpu_ms_per_mb": 2.5},
    }
    got = bench.round_ratios(by, ("haproxy", "pylb", "pylb@base"), size=True)
    assert got["pylb/haproxy cpu_per_request"] == 2.0
    assert got["pylb/haproxy user"] == 4.0
    assert got["pylb@base/haproxy cpu_ms_per_MB"] == 2.5
    assert got["pylb/pylb@base cpu_per_request"] == 0.8
    assert "pylb/direct rps" not in got
    got = bench.round_ratios({"pylb": by["pylb"]}, ("haproxy", "pylb"), size=False)
    assert got == {
        "pylb/haproxy cpu_per_request": None, "pylb/haproxy user": None, "pylb/haproxy rps": None,
    }


def test_cpu_per_mb() -> None:
    r = result("pylb", 1, 100, 0.2, 0.3)
    r.size = 1 << 20
    assert r.body_mib == 100
    assert r.proxy_ms_per_mib == pytest.approx(5.0)
    assert bench.figures_of(r)["mb_per_s"] == pytest.approx(100)


def test_busiest_worker_share() -> None:
    cpu = {
        "10 pylb: master [x.yaml]": 0.1,
        "11 pylb: worker template": 0.0,
        "12 pylb: worker 1/2 [gen 1]": 3.0,
        "13 pylb: worker 2/2 [gen 1]": 1.0,
    }
    assert bench.busiest_worker_share(cpu) == pytest.approx(75.0)
    assert bench.busiest_worker_share({"12 pylb: worker 1/1 [gen 1]": 1.0}) is None


# --------------------------------------------------------------------------- py-spy raw


MASTER = 'process 100:"pylb: master [/tmp/x/pylb.yaml]"'
W1 = 'process 101:"pylb: worker 1/2 [gen 1]"'
W2 = 'process 102:"pylb: worker 2/2 [gen 1]"'
BOOT = "_run_module_as_main (<frozen runpy>:198);main (lb/worker.py:436)"
RAW = [
    f"{MASTER};{W1};{BOOT};HttpSession.data_received (lb/httpproxy.py:213);"
    "RequestReader.feed (lb/h1.py:306) 6",
    f"{MASTER};{W1};{BOOT};HttpSession.data_received (lb/httpproxy.py:220);"
    "RequestReader.feed (lb/h1.py:310) 2",
    f"{MASTER};{W2};{BOOT};HttpSession._send (lb/httpproxy.py:500) 10",
    f"{MASTER};{W2};{BOOT};f (a.py:1);f (a.py:2);f (a.py:3) 1",  # recursion counts once
    f"{MASTER};{W2} 1",
    f"{MASTER};Master.run (lb/master.py:136) 5",
    "",
    "garbage",
]


def test_parse_raw_stack_and_function_key() -> None:
    frames, count = bench.parse_raw_stack(RAW[0])
    assert count == 6
    assert frames[0] == MASTER and frames[1] == W1
    assert frames[-1] == "RequestReader.feed (lb/h1.py:306)"
    assert bench.parse_raw_stack("garbage") is None
    assert bench.parse_raw_stack("") is None
    key = bench.function_key("RequestReader.feed (lb/h1.py:306)")
    assert key == "RequestReader.feed (lb/h1.py)"
    assert bench.function_key("<module> (x.py)") == "<module> (x.py)"
    assert bench.function_key("f (<frozen runpy>:88)") == "f (<frozen runpy>)"
    # a process title with a ';' in it stays one frame
    frames, _ = bench.parse_raw_stack('process 7:"a;b";f (x.py:1) 3')
    assert frames == ['process 7:"a;b"', "f (x.py:1)"]


def test_aggregate_raw_workers_only() -> None:
    prof = bench.aggregate_raw(RAW, lambda pid, title: bench.is_worker_title(title))
    assert prof.samples == 20
    assert prof.self_samples["RequestReader.feed (lb/h1.py)"] == 8
    assert prof.self_samples["HttpSession._send (lb/httpproxy.py)"] == 10
    assert prof.self_samples["f (a.py)"] == 1
    assert prof.self_samples[bench.NO_FRAME] == 1
    assert prof.total_samples["HttpSession.data_received (lb/httpproxy.py)"] == 8
    assert prof.total_samples["main (lb/worker.py)"] == 19
    assert prof.total_samples["f (a.py)"] == 1
    assert "Master.run (lb/master.py)" not in prof.total_samples
    assert prof.processes[(101, "pylb: worker 1/2 [gen 1]")] == 8
    assert prof.processes[(102, "pylb: worker 2/2 [gen 1]")] == 12
    everything = bench.aggregate_raw(RAW)
    assert everything.samples == 25
    assert everything.self_samples["Master.run (lb/master.py)"] == 5


def test_format_profile() -> None:
    prof = bench.aggregate_raw(RAW, lambda pid, title: pid in (101, 102))
    text = bench.format_profile(prof, top_self=2, top_total=3)
    lines = text.splitlines()
    assert lines[0] == "top 2 functions by self samples (% of 20 worker samples)"
    assert lines[2].split() == ["50.0", "50.0", "HttpSession._send", "(lb/httpproxy.py)"]
    assert lines[3].split() == ["40.0", "40.0", "RequestReader.feed", "(lb/h1.py)"]
    # the frames on (nearly) every stack are listed apart, not as the top of the total list
    assert "leaving out the 2 on >= 95% of the stacks" in text
    assert lines[-1].startswith("on >= 95% of the stacks: ")
    assert "main (lb/worker.py)" in lines[-1]
    assert bench.format_profile(bench.StackProfile()) == "no samples"


def test_is_worker_title() -> None:
    assert bench.is_worker_title("pylb: worker 1/2 [gen 1]          ")
    assert not bench.is_worker_title("pylb: worker template")
    assert not bench.is_worker_title("pylb: master [x]")


# --------------------------------------------------------------------------- --tls

TLS_FILES = bench.TlsFiles(crt=Path("/x/tls/cert.pem"), ca=Path("/x/tls/ca.pem"))


def tls_opts(*argv: str):
    return bench.replace(bench.parse_args(["--tls", *argv]), tls_files=TLS_FILES)


def test_parse_args_tls_defaults() -> None:
    opts = bench.parse_args([])
    assert not opts.tls and opts.skipped == () and opts.tls_files is None
    opts = bench.parse_args(["--tls"])
    assert opts.tls and opts.targets == ("haproxy", "pylb")
    assert opts.skipped == ("direct",)
    assert opts.tls_measures == ("keepalive", "full", "resumed")
    assert opts.tls_clients == 4 and opts.tls_profile == "full"
    opts = bench.parse_args(["--tls", "--only", "pylb,haproxy", "--rounds", "2"])
    assert opts.only == ("haproxy", "pylb") and opts.skipped == ()
    opts = bench.parse_args(
        ["--tls", "--tls-measures", "full,keepalive", "--tls-clients", "8"]
    )
    assert opts.tls_measures == ("keepalive", "full") and opts.tls_clients == 8


def test_parse_args_tls_rejects(tmp_path: Path) -> None:
    prof = str(tmp_path / "p.raw")
    for argv in (
        ["--tls-measures", "full"],  # needs --tls
        ["--tls-clients", "2"],
        ["--tls", "--tls-measures", "handshakes"],
        ["--tls", "--tls-clients", "0"],
        ["--tls", "--only", "direct"],  # nothing left to terminate TLS
        ["--tls", "--tls-profile", "full"],  # needs --profile
        ["--profile-native"],
        ["--tls", "--tls-measures", "keepalive", "--profile", prof, "--tls-profile", "full"],
    ):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
    opts = bench.parse_args(
        ["--tls", "--profile", prof, "--tls-profile", "resumed", "--profile-native"]
    )
    assert opts.tls_profile == "resumed" and opts.profile_native
    assert bench.pyspy_mode(opts) == ["--native"]
    assert bench.pyspy_mode(bench.parse_args([])) == ["--nonblocking"]
    assert "resumed handshakes (4 x openssl s_time -reuse" in bench.profile_load_text(opts)
    assert bench.profile_load_text(bench.parse_args([])) == "wrk -c50 -d10s"


def test_parse_measures() -> None:
    assert bench.parse_measures("resumed, full") == ("full", "resumed")
    for bad in ("", "full,x", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_measures(bad)


def test_haproxy_config_tls() -> None:
    plain = bench.haproxy_config(bench.parse_args([]), 8443, (1001, 1002))
    assert "    bind 127.0.0.1:8443\n" in plain
    assert "ssl" not in plain and "stats socket" not in plain
    text = bench.haproxy_config(tls_opts(), 8443, (1001, 1002))
    assert (
        "    bind 127.0.0.1:8443 ssl crt /x/tls/cert.pem alpn http/1.1 ssl-min-ver TLSv1.2\n"
        in text
    )
    assert "    stats socket /x/tls/haproxy.sock level user\n" in text
    assert "nbthread 1" in text and "server s1 127.0.0.1:1001" in text
    assert " ssl" not in text.split("backend be")[1]  # the backends stay plain
    tcp = bench.haproxy_config(tls_opts("--mode", "tcp"), 8443, (1001, 1002))
    assert "bind 127.0.0.1:8443 ssl crt /x/tls/cert.pem" in tcp and "mode tcp" in tcp
    with pytest.raises(bench.BenchError):  # --tls before the certificate is made
        bench.haproxy_config(bench.parse_args(["--tls"]), 8443, (1001, 1002))


def test_pylb_config_tls() -> None:
    yaml = pytest.importorskip("yaml")
    plain = bench.pylb_config(bench.parse_args([]), 8443, (1001, 1002))
    assert plain["frontends"]["fe"]["bind"] == "127.0.0.1:8443"
    cfg = bench.pylb_config(tls_opts(), 8443, (1001, 1002))
    assert cfg["frontends"]["fe"]["bind"] == [{
        "address": "127.0.0.1:8443", "ssl": True, "crt": "/x/tls/cert.pem",
        "alpn": "http/1.1", "ssl-min-ver": "TLSv1.2",
    }]
    assert cfg["backends"]["be"]["servers"]["s1"] == {"address": "127.0.0.1:1001"}
    text = bench.pylb_yaml(cfg)
    assert 'address: "127.0.0.1:8443"' in text and "ssl: true" in text
    assert yaml.safe_load(text)["frontends"]["fe"]["bind"] == cfg["frontends"]["fe"]["bind"]
    with pytest.raises(bench.BenchError):
        bench.pylb_config(bench.parse_args(["--tls"]), 8443, (1001, 1002))


@pytest.mark.skipif(bench.shutil.which("openssl") is None, reason="no openssl CLI")
def test_make_tls_files(tmp_path: Path) -> None:
    files = bench.make_tls_files(bench.shutil.which("openssl"), tmp_path)
    pem = files.crt.read_text()
    assert pem.index("BEGIN CERTIFICATE") < pem.index("PRIVATE KEY-----")
    assert pem.count("BEGIN CERTIFICATE") == 1  # the certificate alone, then its key
    assert "BEGIN CERTIFICATE" in files.ca.read_text()
    assert "ECDSA P-256" in files.description
    ctx = bench.ssl.SSLContext(bench.ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(files.crt)  # the key matches the certificate
    client = bench.tls_client_context(files)
    assert client.verify_mode == bench.ssl.CERT_REQUIRED and client.check_hostname


def test_s_time_request_and_argv() -> None:
    assert bench.TLS_REQUEST == f"GET {bench.STIME_WWW} HTTP/1.0\r\n\r\n".encode()
    head = bench.TLS_REQUEST.decode().split("\r\n")
    assert head[0] == "GET / HTTP/1.0" and "Host: localhost" in head
    assert bench.TLS_REQUEST.endswith(b"\r\n\r\n") and bench.TLS_REQUEST.count(b"\r\n\r\n") == 1
    argv = bench.s_time_argv("openssl", 8443, "full", 4, TLS_FILES)
    assert argv[:5] == ["openssl", "s_time", "-connect", "127.0.0.1:8443", "-new"]
    assert argv[argv.index("-www") + 1] == bench.STIME_WWW
    assert argv[argv.index("-time") + 1] == "4" and "/x/tls/ca.pem" in argv
    assert "-reuse" in bench.s_time_argv("openssl", 8443, "resumed", 4, TLS_FILES)


STIME_NEW = """\
Collecting connection statistics for 4 seconds
**********

10 connections in 0.01s; 1000.00 connections/user sec, bytes read 1480
10 connections in 5 real seconds, 148 bytes read per connection
"""

STIME_REUSE = """\


Now timing with session id reuse.
starting
rrrrrr*r

8 connections in 0.00s; inf connections/user sec, bytes read 1184
8 connections in 5 real seconds, 148 bytes read per connection
"""


def test_parse_s_time() -> None:
    assert bench.parse_s_time(STIME_NEW) == (10, 0, 1480)
    assert bench.parse_s_time(STIME_REUSE) == (8, 7, 1184)
    with pytest.raises(bench.BenchError):  # a mark short: output cut or garbled
        bench.parse_s_time(STIME_NEW.replace("**********", "*********"))
    with pytest.raises(bench.BenchError):
        bench.parse_s_time("ERROR\nunable to connect\n")
    load = bench.STimeResult(clients=2, connections=900, seconds=3.0)
    assert load.hps == 300


def test_parse_haproxy_ssl_counters() -> None:
    text = (
        "# pxname,svname,qcur,stot,ssl_sess,ssl_reused_sess,ssl_failed_handshake,\n"
        "fe,FRONTEND,,4004,10,3994,6,\n"
        "be,s1,0,2000,,,,\n"
    )
    assert bench.parse_haproxy_ssl_counters(text) == {"full": 10, "resumed": 3994}
    assert bench.parse_haproxy_ssl_counters(text.replace("ssl_sess", "x")) is None
    assert bench.parse_haproxy_ssl_counters("Unknown command\n") is None


def hs(target: str, measure: str, rnd: int, n: int, cpu: float, resumed: int = 0,
       **kw) -> object:
    load = bench.STimeResult(
        clients=4, connections=n, resumed=resumed, bytes_read=n * 148, seconds=2.0,
        client_cpu_s=n * 0.0008,
    )
    r = bench.HandshakeResult(
        target, measure, rnd, 1, load=load, proxy_user_s=cpu * 0.7, proxy_sys_s=cpu * 0.3,
        backend_cpu_s=n * 0.00005, answer_bytes=148, **kw,
    )
    return r


def test_handshake_figures() -> None:
    r = hs("haproxy", "full", 1, 1000, 0.5, server_counts={"full": 1000, "resumed": 0})
    f = bench.hs_figures_of(r)
    assert f["hps"] == 500 and f["per_core"] == pytest.approx(2000)
    assert f["cpu_us"] == pytest.approx(500) and f["user_us"] == pytest.approx(350)
    assert f["cpu_pct"] == pytest.approx(25) and f["client_us"] == pytest.approx(800)
    assert f["nginx_us"] == pytest.approx(50) and f["bytes_off"] == 0
    assert f["server_full"] == 1000 and f["server_resumed"] == 0
    assert "worker_max_pct" not in f
    r.load.bytes_read -= 100  # some answers were shorter than the probe's
    assert r.bytes_off == -100
    assert bench.hs_figures_of(bench.HandshakeResult("pylb", "full", 1, 1, error="x")) == {}


def test_summarize_handshakes_ratios_and_table() -> None:
    opts = tls_opts("--rounds", "3")
    results = [
        hs("haproxy", "full", 1, 1000, 0.5), hs("pylb", "full", 1, 1000, 0.8),
        hs("haproxy", "full", 2, 1000, 0.4), hs("pylb", "full", 2, 800, 0.8),
        hs("haproxy", "resumed", 1, 1000, 0.4, resumed=1000),
        bench.HandshakeResult("haproxy", "full", 3, 1, error="boom"),
        hs("pylb", "full", 3, 1000, 0.9),
    ]
    s = bench.summarize_handshakes(opts, results, "full")
    cpu = s.ratios["pylb/haproxy handshake CPU ratio"]["values"]
    core = s.ratios["pylb/haproxy handshakes per core ratio"]["values"]
    assert cpu[:2] == [pytest.approx(1.6), pytest.approx(2.5)] and cpu[2] is None
    # handshakes per core is the inverse of CPU per handshake, round by round
    assert core[:2] == [pytest.approx(1 / 1.6), pytest.approx(1 / 2.5)]
    assert s.figures["pylb"]["cpu_us"]["median"] == pytest.approx(900)
    assert s.figures["haproxy"]["handshakes"]["sum"] == 2000
    text = bench.handshake_table(opts, s, results, "full")
    assert "handshakes/s per core" in text and "CPU us/handshake" in text
    assert "2/3" in text and "3/3" in text
    assert "haproxy's count" in text  # rows of HAProxy's own counters ("-" for pylb)
    resumed = bench.summarize_handshakes(opts, results, "resumed")
    assert resumed.figures["haproxy"]["resumed"]["sum"] == 1000
    assert resumed.figures["pylb"] == {}


def test_handshake_checks() -> None:
    opts = tls_opts()
    good = [
        hs("haproxy", "full", 1, 100, 0.1, server_counts={"full": 100, "resumed": 0}),
        hs("haproxy", "resumed", 1, 100, 0.1, resumed=100,
           server_counts={"full": 4, "resumed": 100}),
        hs("pylb", "full", 1, 100, 0.1),
    ]
    assert bench.handshake_checks(opts, good) == []
    bad = [hs("pylb", "full", 1, 100, 0.1, resumed=3), hs("pylb", "resumed", 2, 100, 0.1,
                                                        resumed=90)]
    bad[1].load.bytes_read += 5
    lines = bench.handshake_checks(opts, bad)
    assert any("3 of 100 connections resumed" in ln for ln in lines)
    assert any("10 of 100 connections did not resume" in ln for ln in lines)
    assert any("+5 bytes" in ln for ln in lines)


def test_tls_targets() -> None:
    opts = tls_opts("--rounds", "2")
    keepalive = bench.Summary({}, [], {
        "pylb/haproxy cpu_per_request": {"median": 1.9, "values": [1.8, 2.0]},
    })
    full = bench.Summary({}, [], {
        "pylb/haproxy handshake CPU ratio": {"median": 1.5, "values": [1.4, 1.6]},
        "pylb/haproxy handshakes per core ratio": {"median": 0.67, "values": [0.71, 0.63]},
    })
    text = bench.tls_targets(opts, keepalive, {"full": full})
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["target", "(issue", "14)"]
    cpu = next(ln for ln in lines if "handshake CPU ratio" in ln)
    assert "1.50 (1.40–1.60)" in cpu and "<= 1.43" in cpu and cpu.endswith("MISSED")
    core = next(ln for ln in lines if "per core" in ln)
    assert ">= 0.70" in core and core.endswith("MISSED")
    ka = next(ln for ln in lines if "keep-alive" in ln)
    assert "<= 2.00" in ka and ka.endswith("met")
    assert bench.tls_targets(tls_opts("--only", "pylb"), keepalive, {"full": full}) == ""


def test_negotiated_text() -> None:
    neg = {
        "probe": {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384",
                  "alpn": "http/1.1", "answer_bytes": 148, "status": "HTTP/1.1 200 OK"},
        "s_client": {"Server Temp Key": "X25519, 253 bits", "Signature type": "ECDSA",
                     "Verification": "OK"},
    }
    text = bench.negotiated_text(neg)
    assert text.startswith("TLSv1.3 TLS_AES_256_GCM_SHA384, X25519, signature ECDSA")
    assert "ALPN http/1.1" in text and "verification OK" in text and "148 B" in text


def test_format_by_file_native() -> None:
    prof = bench.StackProfile(samples=10)
    prof.self_samples.update({
        "epoll_pwait (libc.so.6)": 4,
        "0x7f00 (/usr/lib/x86_64-linux-gnu/libcrypto.so.3)": 3,
        "HttpSession._send (lb/httpproxy.py)": 2,
        "write (libc.so.6)": 1,
    })
    assert bench.file_of("0x7f00 (/usr/lib/x86_64-linux-gnu/libcrypto.so.3)") == "libcrypto.so.3"
    lines = bench.format_by_file(prof).splitlines()
    assert "(% of 6 worker samples; 4 more in epoll_wait/epoll_pwait left out)" in lines[0]
    assert lines[2].split() == ["50.0", "libcrypto.so.3"]
    assert lines[3].split() == ["33.3", "lb/httpproxy.py"]


# --------------------------------------------------------------------------- --plot


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


plot = _load("bench_plot_under_test", REPO / "bench" / "plot.py")


def _load_reload():
    # reload.py imports `bench` by name (it runs from bench/): give it the module above
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "bench", bench)
        return _load("reload_under_test", REPO / "bench" / "reload.py")


reload_ = _load_reload()

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def charts(monkeypatch: pytest.MonkeyPatch):
    """The scripts `import plot` when drawing: this test's copy (no sys.path change)."""
    pytest.importorskip("matplotlib")
    monkeypatch.setitem(sys.modules, "plot", plot)
    return plot


def assert_png(path: Path, min_size: tuple[int, int] = (500, 300)) -> tuple[int, int]:
    """A real PNG that matplotlib reads back; its (width, height) in pixels."""
    from matplotlib import image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = image.imread(path)
    height, width = pixels.shape[:2]
    assert width >= min_size[0] and height >= min_size[1]
    assert pixels.std() > 0  # something drawn, not a blank page
    return width, height


def test_parse_args_plot(tmp_path: Path) -> None:
    assert bench.parse_args([]).plot is None
    opts = bench.parse_args(["--only", "haproxy,pylb", "--plot", str(tmp_path / "c.png")])
    assert opts.plot == tmp_path / "c.png"
    assert opts.command == f"bench/bench.py --only haproxy,pylb --plot {tmp_path / 'c.png'}"
    for bad in (str(tmp_path), str(tmp_path / "nope" / "c.png")):  # checked before the run
        with pytest.raises(SystemExit):
            bench.parse_args(["--plot", bad])


def test_reload_parse_args_plot(tmp_path: Path) -> None:
    assert reload_.parse_args([]).plot is None
    opts = reload_.parse_args(["--methods", "usr2", "--plot", str(tmp_path / "r.png")])
    assert opts.plot == tmp_path / "r.png" and opts.methods == ("usr2",)
    assert opts.command.startswith("bench/reload.py --methods usr2 --plot ")
    with pytest.raises(SystemExit):  # the tunnel scenario has its own report
        reload_.parse_args(["--tunnels", "--plot", str(tmp_path / "r.png")])


def test_matplotlib_imported_only_when_drawing() -> None:
    code = (
        "import sys; sys.path.insert(0, 'bench'); import plot, bench, reload; "
        "bench.parse_args(['--plot', 'x.png']); "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_bar_of_stats_and_values() -> None:
    assert plot.Bar.of_stats({"median": 2.0, "min": 1.0, "max": 3.0, "values": [1, 2, 3]}) == (
        plot.Bar(2.0, 1.0, 3.0)
    )
    assert plot.Bar.of_stats({}).value is None
    assert plot.Bar.of_stats({"median": None, "min": None, "max": None}).value is None
    assert plot.Bar.of_values([0.03, None, 0.01, 0.02], 1000) == plot.Bar(20.0, 10.0, 30.0)
    assert plot.Bar.of_values([]).value is None


def test_plot_bars_writes_png(tmp_path: Path, charts) -> None:
    chart = plot.Chart(
        title="pylb bench: haproxy vs pylb (http, body hello (6 B))",
        panels=[
            plot.Panel("throughput", "requests/s", ("req/s",), {
                "haproxy": (plot.Bar(42041, 41228, 42586),),
                "pylb": (plot.Bar(33426, 24517, 34191),),
            }, ".0f"),
            plot.Panel("proxy CPU per request", "CPU µs per request",
                       ("total", "user", "system"), {
                           "haproxy": (plot.Bar(12.4), plot.Bar(2.9, 2.6, 2.9),
                                       plot.Bar(9.6, 9.5, 9.8)),
                           "pylb": (plot.Bar(None, note="FAILED"),) * 3,
                       }, ".1f"),
            plot.Panel("pylb/haproxy, per round", "ratio", ("CPU/req", "req/s"), {
                "median": (plot.Bar(1.82, 1.78, 1.82), plot.Bar(0.58, 0.5, 0.8)),
            }, ".2f", reference=1.0, shared=False),
        ],
        caption=["$ bench/bench.py --rounds 3", "x" * 400],  # a long line is wrapped
    )
    path = plot.bars(tmp_path / "chart.png", chart)
    assert path == tmp_path / "chart.png"
    width, height = assert_png(path, (1000, 700))
    assert width < 2000 and height < 2000


def bench_info() -> dict:
    return {
        "time": "2026-11-26T20:24:32+0000", "host": "vm", "cpus": 2, "cpus_usable": 2,
        "loadavg_at_start": [0.1, 0.2, 0.3], "python": "3.11.7",
        "python_executable": "/x/python", "kernel": "6.1", "commit": "507e904",
        "versions": {"nginx": "nginx/1.22.1", "wrk": "wrk 4.1.0", "haproxy": "HAProxy 2.6"},
        "pylb": {}, "calibration": {"start": "8.2 usec", "end": "8.3 usec"},
    }


def bench_run() -> object:
    return bench.Run(results=[
        result("direct", 1, 60000, None, None),
        result("haproxy", 1, 42000, 0.15, 0.35, non2xx=1),
        result("pylb", 1, 33000, 0.40, 0.35),
        result("direct", 2, 61000, None, None),
        result("haproxy", 2, 41000, 0.12, 0.38),
        bench.TargetResult("pylb", 1, error="boom", round=2),
    ])


def test_bench_chart_from_the_report_figures(tmp_path: Path, charts) -> None:
    opts = bench.parse_args(["--rounds", "2", "--plot", str(tmp_path / "c.png")])
    run = bench_run()
    summary = bench.summarize(opts, run.results)
    chart = bench.chart(opts, bench_info(), run, summary, {})
    panels = {p.title: p for p in chart.panels}
    rps = panels["throughput (wrk -c50)"]
    assert list(rps.series) == ["direct", "haproxy", "pylb"]
    assert rps.series["haproxy"] == (plot.Bar(41500, 41000, 42000),)  # median (min-max)
    cpu = panels["proxy CPU per request (process tree)"]
    assert list(cpu.series) == ["haproxy", "pylb"]  # direct has no proxy CPU
    assert cpu.groups == ("total", "user", "system")
    assert cpu.series["pylb"][0] == plot.Bar.of_stats(summary.figures["pylb"]["cpu_us"])
    ratios = panels["ratios a/b, per round (1 = equal)"]  # as ratio_lines prints them
    assert ratios.groups == (
        "CPU/req\npylb/haproxy", "user CPU\npylb/haproxy", "req/s\npylb/haproxy",
        "req/s\npylb/direct", "req/s\nhaproxy/direct",
    )
    assert ratios.reference == 1.0 and not ratios.shared
    (bars,) = ratios.series.values()
    assert bars[0] == plot.Bar.of_values(summary.ratios["pylb/haproxy cpu_per_request"]["values"])
    low, high = 41000 / 61000, 42000 / 60000  # haproxy/direct req/s, rounds 2 and 1
    assert (bars[-1].value, bars[-1].low, bars[-1].high) == pytest.approx(
        ((low + high) / 2, low, high)
    )
    # one pair only: named in the title
    opts2 = bench.parse_args(["--rounds", "2", "--only", "haproxy,pylb"])
    run2 = bench.Run(results=[r for r in run.results if r.target != "direct"])
    chart2 = bench.chart(opts2, bench_info(), run2, bench.summarize(opts2, run2.results), {})
    assert chart2.panels[-1].title == "pylb/haproxy, per round (1 = equal)"
    assert chart2.panels[-1].groups == ("CPU/req", "user CPU", "req/s")
    caption = "\n".join(chart.caption)
    assert "$ bench/bench.py --rounds 2 --plot" in caption
    assert "2026-11-26T20:24:32+0000 on vm" in caption and "rounds=2" in caption
    assert "pylb 1/2" in caption and "haproxy 1" in caption  # measured runs, wrk errors
    assert_png(plot.bars(opts.plot, chart))


def test_bench_chart_tls(tmp_path: Path, charts) -> None:
    opts = tls_opts("--rounds", "2", "--tls-measures", "full,resumed")
    results = [
        hs("haproxy", "full", 1, 1000, 0.5), hs("pylb", "full", 1, 1000, 0.8),
        hs("haproxy", "full", 2, 1000, 0.4), hs("pylb", "full", 2, 800, 0.8),
        hs("haproxy", "resumed", 1, 1000, 0.2, resumed=1000),
        bench.HandshakeResult("pylb", "resumed", 1, 1, error="boom"),
    ]
    hsum = {m: bench.summarize_handshakes(opts, results, m) for m in ("full", "resumed")}
    run = bench.Run(handshakes=results)
    chart = bench.chart(opts, bench_info(), run, bench.summarize(opts, []), hsum)
    titles = [p.title for p in chart.panels]
    assert not any("keep-alive" in t or "latency" in t for t in titles)  # not measured
    hps = chart.panels[0]
    assert hps.groups == ("full", "resumed")
    assert hps.series["pylb"][1].note == "FAILED"
    cpu = chart.panels[1]
    bar = cpu.series["haproxy"][0]
    assert (bar.value, bar.low, bar.high) == pytest.approx((450, 400, 500))
    ratios = chart.panels[-1]
    assert ratios.title == "pylb/haproxy, per round (1 = equal)"
    assert ratios.groups[:2] == ("CPU/handshake\nfull", "handshakes/core\nfull")
    assert "failed handshake runs (left out): 1" in chart.caption[-1]
    assert_png(plot.bars(tmp_path / "tls.png", chart))


def test_bench_report_plot_only_adds_the_chart(tmp_path: Path, charts, capsys) -> None:
    argv = ["--rounds", "2"]
    bench.report(bench.parse_args(argv), bench_info(), bench_run())
    table = capsys.readouterr().out
    path = tmp_path / "c.png"
    bench.report(bench.parse_args([*argv, "--plot", str(path)]), bench_info(), bench_run())
    out = capsys.readouterr().out
    assert out == f"{table}\nchart written to {path}\n"
    assert_png(path)


def reload_result(proxy: str, method: str, failures: int, reloads: int,
                  reload_s: list[float], respawn_ms: list[float] | None = None) -> object:
    return reload_.RunResult(
        proxy, method, reload_.DESCRIPTION[proxy, method],
        wrk=wrk(30000, 900000, seconds=30, read=failures), reloads=reloads,
        reload_s=reload_s, respawn_ms=respawn_ms or [], respawn_asked=len(respawn_ms or []),
        after_drain=3, expected_after_drain=3,
    )


def reload_results() -> list:
    return [
        reload_result("pylb", "usr2", 0, 150, [0.028, 0.025, 0.066], [15, 28, 14]),
        reload_result("pylb", "sf", 2, 148, [0.130, 0.150, 0.210], [16, 22]),
        reload_.RunResult("pylb", "hup", "kill -HUP master", error="pylb did not start"),
        reload_result("haproxy", "usr2", 3896, 295, [0.031, 0.030, 0.076]),
    ]


def test_reload_chart(tmp_path: Path, charts) -> None:
    opts = reload_.parse_args(["--methods", "usr2,hup,sf", "--duration", "30"])
    results = reload_results()
    chart = reload_.chart(opts, {"time": "T", "host": "vm", "cpus": 2}, results)
    failures, per100, times, rps, respawn = chart.panels
    assert failures.groups == ("usr2", "sf", "hup")  # in the order they ran
    assert failures.series["pylb"] == (plot.Bar(0), plot.Bar(2), plot.Bar(None, note="FAILED"))
    assert failures.series["haproxy"] == (plot.Bar(3896), plot.Bar(None), plot.Bar(None))
    assert per100.series["haproxy"][0].value == pytest.approx(3896 * 100 / 295)
    assert times.series["pylb"][0] == plot.Bar(28.0, 25.0, 66.0)  # ms: median, min, max
    assert rps.series["pylb"][0] == plot.Bar(30000)
    assert list(respawn.series) == ["pylb"] and respawn.series["pylb"][1] == plot.Bar(19, 16, 22)
    caption = "\n".join(chart.caption)
    assert "wrk -t1 -c50 --timeout 5s for 30s" in caption and "haproxy usr2 295" in caption
    assert_png(plot.bars(tmp_path / "reload.png", chart))


def test_reload_report_plot(tmp_path: Path, charts, capsys) -> None:
    path = tmp_path / "r.png"
    opts = reload_.parse_args(["--plot", str(path)])
    tools = bench.Tools(nginx="/nonexistent/nginx", wrk="/nonexistent/wrk", haproxy=None,
                        pylb=None)
    reload_.report(opts, tools, reload_results(), True)
    out = capsys.readouterr().out
    assert "reload under load: wrk -t1 -c50" in out
    assert out.endswith(f"\nchart written to {path}\n")
    assert_png(path)
