"""Pure helpers of bench/bench.py: no process is started."""

from __future__ import annotations

import argparse
import importlib.util
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
