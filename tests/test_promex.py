"""lb.promex: the /metrics exposition with HAProxy 2.6's names, from `show info` and
`show stat` data. No sockets: render() is fed the samples pylb printed, and promtool checks
what comes out."""

from __future__ import annotations

import copy
import csv
import math
import re
import shutil
import subprocess

import pytest
from samples import SHOW_INFO, SHOW_STAT

from lb.promex import (
    CONTENT_TYPE,
    HAPROXY_FAMILIES,
    SCOPES,
    ReloadHistogram,
    families,
    render,
)

# Every `show info` field of HAProxy 2.6 (src/stats.c): a fully measured process.
HAPROXY_INFO_FIELDS = (
    "Name", "Version", "Release_date", "Nbthread", "Nbproc", "Process_num", "Pid", "Uptime",
    "Uptime_sec", "Start_time_sec", "Memmax_MB", "Memmax_bytes", "PoolAlloc_MB",
    "PoolAlloc_bytes", "PoolUsed_MB", "PoolUsed_bytes", "PoolFailed", "Ulimit-n", "Maxsock",
    "Maxconn", "Hard_maxconn", "CurrConns", "CumConns", "CumReq", "MaxSslConns",
    "CurrSslConns", "CumSslConns", "Maxpipes", "PipesUsed", "PipesFree", "ConnRate",
    "ConnRateLimit", "MaxConnRate", "SessRate", "SessRateLimit", "MaxSessRate", "SslRate",
    "SslRateLimit", "MaxSslRate", "SslFrontendKeyRate", "SslFrontendMaxKeyRate",
    "SslFrontendSessionReuse_pct", "SslBackendKeyRate", "SslBackendMaxKeyRate",
    "SslCacheLookups", "SslCacheMisses", "CompressBpsIn", "CompressBpsOut",
    "CompressBpsRateLim", "ZlibMemUsage", "MaxZlibMemUsage", "Tasks", "Run_queue", "Idle_pct",
    "node", "description", "Stopping", "Jobs", "Unstoppable Jobs", "Listeners", "ActivePeers",
    "ConnectedPeers", "DroppedLogs", "BusyPolling", "FailedResolutions", "TotalBytesOut",
    "TotalSplicdedBytesOut", "BytesOutRate", "DebugCommandsIssued", "CumRecvLogs",
    "Build info", "Tainted",
)
TEXT_COLUMNS = {"pxname", "svname", "status", "check_status", "mode", "algo", "addr", "cookie",
                "tracked", "last_chk", "last_agt", "check_desc", "agent_desc", "agent_status",
                "-", ""}

# Families with no sample on the samples above: each from a figure pylb left empty there
# (not measured yet), never from a gap in lb.promex's table.
_BOTH = ("max_queue", "max_sessions", "limit_sessions", "responses_denied_total",
         "downtime_seconds_total", "max_session_rate", "last_session_seconds",
         "queue_time_average_seconds", "connect_time_average_seconds",
         "response_time_average_seconds", "total_time_average_seconds",
         "failed_header_rewriting_total", "connection_attempts_total",
         "connection_reuses_total", "max_queue_time_seconds", "max_connect_time_seconds",
         "max_response_time_seconds", "max_total_time_seconds", "internal_errors_total",
         "uweight")
SAMPLE_GAP = (
    {f"haproxy_process_{name}" for name in (  # fields missing from show info
        "start_time_seconds", "max_ssl_rate", "max_frontend_ssl_key_rate",
        "current_backend_ssl_key_rate", "max_backend_ssl_key_rate", "ssl_cache_lookups_total",
        "ssl_cache_misses_total", "jobs", "unstoppable_jobs", "listeners", "dropped_logs_total",
        "bytes_out_total", "bytes_out_rate")}
    | {f"haproxy_frontend_{name}" for name in (  # empty columns of the FRONTEND row
        "max_sessions", "limit_session_rate", "max_session_rate", "http_requests_rate_max",
        "connections_rate_max", "connections_total", "intercepted_requests_total",
        "denied_connections_total", "failed_header_rewriting_total", "internal_errors_total")}
    | {f"haproxy_backend_{name}" for name in _BOTH}
    | {f"haproxy_server_{name}" for name in (
        *_BOTH, "queue_limit", "current_throttle", "idle_connections_current",
        "idle_connections_limit", "unsafe_idle_connections_current",
        "safe_idle_connections_current", "used_connections_current",
        "need_connections_current")}
)

# What promtool's linter says of HAProxy's own names: the one counter not ending in _total.
HAPROXY_LINT: set[str] = set()  # promtool's lint says nothing


# -- helpers ------------------------------------------------------------------------------

def _value(text: str) -> int | str:
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def parse_info(text: str = SHOW_INFO) -> dict[str, object]:
    """`show info` as the data gathering gives it: numbers as ints."""
    pairs = (line.split(": ", 1) for line in text.splitlines() if ": " in line)
    return {key: _value(value) for key, value in pairs}


def parse_stat(text: str = SHOW_STAT) -> list[dict[str, object]]:
    lines = text.splitlines()
    header = lines[0].removeprefix("# ").split(",")
    return [{key: _value(value) for key, value in zip(header, row, strict=False)}
            for row in csv.reader(lines[1:]) if row]


def row(rows: list[dict[str, object]], pxname: str, svname: str) -> dict[str, object]:
    return next(r for r in rows if r["pxname"] == pxname and r["svname"] == svname)


def pylb_data() -> dict[str, object]:
    histogram = ReloadHistogram()
    histogram.observe(0.3)
    return {"generation": 4, "reloads_total": 3, "reload_seconds": histogram}


def full_info() -> dict[str, object]:
    info: dict[str, object] = dict.fromkeys(HAPROXY_INFO_FIELDS, 7)
    info.update(Name="pylb", Version="0.1.0", Release_date="2026/11/21", node="vm",
                description="", Uptime="0d 0h00m02s")
    return info


def full_rows() -> list[dict[str, object]]:
    """The sample rows with every empty column filled: pylb measuring all HAProxy does."""
    rows = parse_stat()
    for r in rows:
        for key, value in r.items():
            if value == "" and key not in TEXT_COLUMNS:
                r[key] = 5
    return rows


SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def samples(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """{(name, labels): value} of an exposition (a parser of our own: prometheus_client's
    renames counters that do not end in _total)."""
    out = {}
    for line in text.decode().splitlines():
        if line.startswith("#"):
            continue
        match = SAMPLE.fullmatch(line)
        assert match, line
        name, labels, value = match.groups()
        pairs = frozenset(
            (key, re.sub(r'\\[\\"n]', lambda m: UNESCAPE[m.group()], val))
            for key, val in LABEL.findall(labels or ""))
        out[(name, pairs)] = float(value)
    return out


def value(text: bytes, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def series(text: bytes, name: str, **labels: str) -> dict[frozenset, float]:
    """Every sample of `name` whose labels include `labels`."""
    want = set(labels.items())
    return {key[1]: v for key, v in samples(text).items() if key[0] == name and want <= key[1]}


def promtool(text: bytes) -> set[str]:
    """promtool's lint problems; fails on anything it cannot parse."""
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: apt-get install -y prometheus"
    done = subprocess.run([binary, "check", "metrics"], input=text, capture_output=True,
                          timeout=60)
    output = (done.stdout + done.stderr).decode()
    assert done.returncode == 0, output  # 3: lint problems; 1: not parsable
    return {line.strip() for line in output.splitlines() if line.strip()}


# -- the format and the names -------------------------------------------------------------

def test_haproxy_families_list() -> None:
    assert len(HAPROXY_FAMILIES) == 187 == len(set(HAPROXY_FAMILIES))
    prefixes = {name.split("_")[1] for name in HAPROXY_FAMILIES}
    assert prefixes == {"process", "frontend", "backend", "server"}
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    assert SCOPES == ("global", "frontend", "backend", "server")


def test_promtool_accepts_the_samples() -> None:
    assert promtool(render(parse_info(), parse_stat(), pylb_data())) <= HAPROXY_LINT


def test_promtool_accepts_everything_filled_and_odd_names() -> None:
    rows = full_rows()
    for r in rows:  # names that need escaping in label values
        r["pxname"] = 'a"p\\p\n' if r["pxname"] == "app" else r["pxname"]
    text = render(full_info(), rows, pylb_data())
    assert promtool(text) <= HAPROXY_LINT
    assert value(text, "haproxy_backend_sessions_total", proxy='a"p\\p\n') == 21


def test_coverage_of_haproxy_families() -> None:
    full = families(render(full_info(), full_rows(), pylb_data()))
    sample = families(render(parse_info(), parse_stat(), pylb_data()))
    ours = {"pylb_reloads_total", "pylb_reload_duration_seconds", "pylb_generation"}
    for found in (full, sample):
        assert {name for name in found if name.startswith("haproxy_")} <= set(HAPROXY_FAMILIES)
        assert found - set(HAPROXY_FAMILIES) == ours
    full_share = len(full & set(HAPROXY_FAMILIES)) / len(HAPROXY_FAMILIES)
    sample_share = len(sample & set(HAPROXY_FAMILIES)) / len(HAPROXY_FAMILIES)
    print(f"HAProxy 2.6 families exposed: {len(full & set(HAPROXY_FAMILIES))} of 187 "
          f"({full_share:.0%}) when every figure is measured; on pylb's samples "
          f"{len(sample & set(HAPROXY_FAMILIES))} ({sample_share:.0%})")
    assert full_share >= 0.8
    assert full >= set(HAPROXY_FAMILIES)  # the table maps every family
    assert set(HAPROXY_FAMILIES) - sample == SAMPLE_GAP


def test_types_are_haproxys() -> None:
    """In HAProxy 2.6 a family is a counter exactly when its name ends in _total, but for
    haproxy_process_failed_resolutions, a gauge here (always 0), for promtool's lint."""
    text = render(full_info(), full_rows(), pylb_data()).decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    for name in HAPROXY_FAMILIES:
        counter = name.endswith("_total")
        assert types[name] == ("counter" if counter else "gauge"), name
    assert types["pylb_reloads_total"] == "counter"
    assert types["pylb_reload_duration_seconds"] == "histogram"
    assert types["pylb_generation"] == "gauge"
    assert text.count("# HELP ") == text.count("# TYPE ") == len(types)
    assert "_created" not in text


# -- values -------------------------------------------------------------------------------

def test_frontend_values() -> None:
    text = render(parse_info(), parse_stat(), pylb_data())
    assert value(text, "haproxy_frontend_http_requests_total", proxy="www") == 21  # req_tot
    assert value(text, "haproxy_frontend_sessions_total", proxy="www") == 21
    assert value(text, "haproxy_frontend_bytes_in_total", proxy="www") == 1623
    assert value(text, "haproxy_frontend_bytes_out_total", proxy="www") == 2604
    assert value(text, "haproxy_frontend_limit_sessions", proxy="www") == 4096
    assert series(text, "haproxy_frontend_http_responses_total", proxy="www") == {
        frozenset({("proxy", "www"), ("code", code)}): n
        for code, n in (("1xx", 0), ("2xx", 21), ("3xx", 0), ("4xx", 0), ("5xx", 0),
                        ("other", 0))}
    assert value(text, "haproxy_frontend_status", proxy="www", state="UP") == 1
    assert value(text, "haproxy_frontend_status", proxy="www", state="DOWN") == 0


def test_backend_and_server_values() -> None:
    text = render(parse_info(), parse_stat(), pylb_data())
    assert value(text, "haproxy_backend_http_requests_total", proxy="app") == 21
    assert value(text, "haproxy_backend_bytes_in_total", proxy="app") == 2211
    assert value(text, "haproxy_backend_active_servers", proxy="app") == 2
    assert value(text, "haproxy_backend_check_last_change_seconds", proxy="app") == 3
    assert value(text, "haproxy_backend_status", proxy="app", state="UP") == 1
    assert value(text, "haproxy_server_sessions_total", proxy="app", server="s1") == 11
    assert value(text, "haproxy_server_bytes_out_total", proxy="app", server="s2") == 1240
    assert value(text, "haproxy_server_loadbalanced_total", proxy="app", server="s1") == 11
    assert value(text, "haproxy_server_check_last_change_seconds", proxy="app",
                 server="s1") == 3
    # not a server family in HAProxy
    assert not series(text, "haproxy_server_http_requests_total")


def test_server_status_up() -> None:
    text = render(parse_info(), parse_stat(), pylb_data())
    assert b'haproxy_server_status{proxy="app",server="s1",state="UP"} 1\n' in text
    assert series(text, "haproxy_server_status", server="s1") == {
        frozenset({("proxy", "app"), ("server", "s1"), ("state", state)}): int(state == "UP")
        for state in ("DOWN", "UP", "MAINT", "DRAIN", "NOLB")}


@pytest.mark.parametrize(("status", "state"), [
    ("UP", "UP"), ("no check", "UP"), ("UP 1/3", "UP"), ("DOWN", "DOWN"),
    ("DOWN 1/2", "DOWN"), ("DOWN (agent)", "DOWN"), ("MAINT", "MAINT"),
    ("MAINT (via app/s2)", "MAINT"), ("MAINT (resolution)", "MAINT"), ("DRAIN", "DRAIN"),
    ("DRAIN (agent)", "DRAIN"), ("NOLB", "NOLB"), ("NOLB 2/3", "NOLB"),
])
def test_server_states(status: str, state: str) -> None:
    rows = parse_stat()
    row(rows, "app", "s1")["status"] = status
    text = render({}, rows, {}, {"server", "backend"})
    found = series(text, "haproxy_server_status", server="s1")
    assert len(found) == 5
    assert {dict(labels)["state"] for labels, v in found.items() if v == 1} == {state}
    aggregate = series(text, "haproxy_backend_agg_server_status", proxy="app")
    counted = {dict(labels)["state"]: v for labels, v in aggregate.items()}
    assert counted[state] == (2 if state == "UP" else 1)
    assert sum(counted.values()) == 2
    assert series(text, "haproxy_backend_agg_server_check_status") == aggregate


def test_backend_and_frontend_down() -> None:
    rows = parse_stat()
    row(rows, "app", "BACKEND")["status"] = "DOWN"
    row(rows, "www", "FRONTEND")["status"] = "STOP"
    text = render({}, rows, {})
    assert value(text, "haproxy_backend_status", proxy="app", state="DOWN") == 1
    assert value(text, "haproxy_backend_status", proxy="app", state="UP") == 0
    assert value(text, "haproxy_frontend_status", proxy="www", state="DOWN") == 1
    row(rows, "www", "FRONTEND")["status"] = "PAUSED"  # paused is not stopped, for HAProxy
    text = render({}, rows, {})
    assert value(text, "haproxy_frontend_status", proxy="www", state="UP") == 1


def test_health_checks() -> None:
    rows = parse_stat()
    text = render({}, rows, {})
    s1 = series(text, "haproxy_server_check_status", server="s1")
    assert len(s1) == 16  # every status of a finished check
    assert {dict(labels)["state"] for labels, v in s1.items() if v == 1} == {"L7OK"}
    assert value(text, "haproxy_server_check_code", proxy="app", server="s1") == 200
    assert value(text, "haproxy_server_check_duration_seconds", proxy="app",
                 server="s1") == 0.008
    assert value(text, "haproxy_server_check_duration_seconds", proxy="app", server="s2") == 0
    assert value(text, "haproxy_backend_agg_check_status", proxy="app", state="L7OK") == 2
    assert value(text, "haproxy_backend_agg_check_status", proxy="app", state="L4CON") == 0

    s1, s2 = row(rows, "app", "s1"), row(rows, "app", "s2")
    s1.update(check_status="* L4CON", check_code="", check_duration=1500)  # in progress
    s2.update(status="no check", check_status="", check_code="", check_duration="",
              chkfail="", chkdown="", check_rise="", check_fall="")
    text = render({}, rows, {})
    assert value(text, "haproxy_server_check_status", proxy="app", server="s1",
                 state="L4CON") == 1
    assert value(text, "haproxy_server_check_code", proxy="app", server="s1") == 0
    assert value(text, "haproxy_server_check_duration_seconds", proxy="app",
                 server="s1") == 1.5
    for name in ("check_status", "check_code", "check_duration_seconds",
                 "check_failures_total"):
        assert not series(text, f"haproxy_server_{name}", server="s2"), name
    assert value(text, "haproxy_backend_agg_check_status", proxy="app", state="L7OK") == 0

    s1.update(check_status="INI", check_duration=0)  # no check finished yet
    text = render({}, rows, {})
    assert not any(series(text, "haproxy_server_check_status", server="s1").values())
    assert value(text, "haproxy_server_check_code", proxy="app", server="s1") == 0
    assert not series(text, "haproxy_server_check_duration_seconds")


def test_times_in_seconds() -> None:
    rows = parse_stat()
    row(rows, "app", "BACKEND").update(qtime=12, ttime=250, rtime_max=1500, lastsess=-1)
    row(rows, "app", "s2").update(ctime="3", ttime_max=9, downtime=60)
    text = render({}, rows, {})
    assert value(text, "haproxy_backend_queue_time_average_seconds", proxy="app") == 0.012
    assert value(text, "haproxy_backend_total_time_average_seconds", proxy="app") == 0.25
    assert value(text, "haproxy_backend_max_response_time_seconds", proxy="app") == 1.5
    assert value(text, "haproxy_backend_last_session_seconds", proxy="app") == -1
    assert value(text, "haproxy_server_connect_time_average_seconds", proxy="app",
                 server="s2") == 0.003
    assert value(text, "haproxy_server_max_total_time_seconds", proxy="app",
                 server="s2") == 0.009
    assert value(text, "haproxy_server_downtime_seconds_total", proxy="app", server="s2") == 60
    assert b" 0.009\n" in text  # no 0.009000000000000001


def test_empty_values_are_omitted() -> None:
    text = render(parse_info(), parse_stat(), pylb_data())
    assert not series(text, "haproxy_server_limit_sessions")  # slim "": no maxconn
    assert b"haproxy_frontend_max_sessions" not in text  # no HELP/TYPE without samples
    assert b"haproxy_process_start_time_seconds" not in text  # not in show info
    info = parse_info()
    info.update(Start_time_sec="", Jobs="", Tasks="3")  # "" not measured; strings are fine
    text = render(info, [], {}, {"global"})
    assert b"haproxy_process_start_time_seconds" not in text
    assert b"haproxy_process_jobs" not in text
    assert value(text, "haproxy_process_current_tasks") == 3
    rows = parse_stat()
    row(rows, "app", "s1")["slim"] = 100
    text = render({}, rows, {})
    assert series(text, "haproxy_server_limit_sessions") == {
        frozenset({("proxy", "app"), ("server", "s1")}): 100}


def test_features_pylb_lacks_read_zero() -> None:
    text = render(parse_info(), parse_stat(), pylb_data())
    for name in ("http_comp_bytes_in_total", "http_comp_responses_total",
                 "http_cache_lookups_total", "http_cache_hits_total"):
        assert value(text, f"haproxy_frontend_{name}", proxy="www") == 0, name
        assert value(text, f"haproxy_backend_{name}", proxy="app") == 0, name
    for name in ("http_comp_bytes_in_total", "current_zlib_memory", "active_peers",
                 "failed_resolutions", "spliced_bytes_out_total", "recv_logs_total",
                 "pool_allocated_bytes"):
        assert value(text, f"haproxy_process_{name}") == 0, name
    rows = parse_stat()
    row(rows, "www", "FRONTEND")["comp_in"] = 99  # measured one day: the figure wins
    text = render({"CompressBpsIn": 12}, rows, {})
    assert value(text, "haproxy_frontend_http_comp_bytes_in_total", proxy="www") == 99
    assert value(text, "haproxy_process_http_comp_bytes_in_total") == 12


def test_http_families_for_http_proxies_only() -> None:
    rows = parse_stat()
    for r in rows:
        r["mode"] = "tcp"
    text = render({}, rows, {})
    fams = families(text)
    for scope in ("frontend", "backend", "server"):
        assert f"haproxy_{scope}_http_responses_total" not in fams
        assert f"haproxy_{scope}_bytes_in_total" in fams
    for name in ("http_requests_total", "http_comp_bytes_in_total", "http_cache_hits_total"):
        assert f"haproxy_frontend_{name}" not in fams
        assert f"haproxy_backend_{name}" not in fams


def test_process_values() -> None:
    info = parse_info()
    text = render(info, [], {}, {"global"})
    assert value(text, "haproxy_process_build_info", version="0.1.0") == 1
    assert value(text, "haproxy_process_connections_total") == 21
    assert value(text, "haproxy_process_max_fds") == 20000
    assert value(text, "haproxy_process_idle_time_percent") == 100
    info.update(Memmax_MB=512, PoolUsed_MB=2, PoolUsed_bytes=123)
    text = render(info, [], {}, {"global"})
    assert value(text, "haproxy_process_max_memory_bytes") == 512 * 1048576
    assert value(text, "haproxy_process_pool_used_bytes") == 123  # HAProxy's own field first


def test_scopes() -> None:
    info, rows, pylb = parse_info(), parse_stat(), pylb_data()

    def prefixes(scopes: set[str] | None) -> set[str]:
        return {name.split("_")[1] if name.startswith("haproxy_") else "pylb"
                for name in families(render(info, rows, pylb, scopes))}

    assert prefixes(None) == prefixes({"*"}) == {"process", "frontend", "backend", "server",
                                                  "pylb"}
    assert prefixes({"global"}) == {"process", "pylb"}
    assert prefixes({"server"}) == {"server"}
    assert prefixes({"frontend", "backend"}) == {"frontend", "backend"}
    assert render(info, rows, pylb, set()) == b""
    assert render(info, rows, pylb, {""}) == b""
    assert render(info, rows, pylb, {"listener", "sticktable"}) == b""


# -- pylb's own ---------------------------------------------------------------------------

def test_pylb_metrics_and_histogram() -> None:
    histogram = ReloadHistogram()
    for seconds in (0.003, 0.2, 0.25, 7.0, 30.0):
        histogram.observe(seconds)
    text = render({}, [], {"generation": 4, "reloads_total": 5, "reload_seconds": histogram})
    assert value(text, "pylb_reloads_total") == 5
    assert value(text, "pylb_generation") == 4
    buckets = {dict(labels)["le"]: v
               for labels, v in series(text, "pylb_reload_duration_seconds_bucket").items()}
    assert buckets == {"0.005": 1, "0.01": 1, "0.025": 1, "0.05": 1, "0.1": 1, "0.25": 3,
                       "0.5": 3, "1.0": 3, "2.5": 3, "5.0": 3, "10.0": 4, "+Inf": 5}
    assert value(text, "pylb_reload_duration_seconds_count") == 5
    assert value(text, "pylb_reload_duration_seconds_sum") == pytest.approx(37.453)
    assert b"# HELP pylb_reload_duration_seconds " in text
    assert b"# TYPE pylb_reload_duration_seconds histogram\n" in text
    assert promtool(text) <= HAPROXY_LINT  # no problem with pylb_*


def test_histogram_round_trip_and_garbage() -> None:
    histogram = ReloadHistogram()
    for seconds in (0.001, 0.04, 0.04, 3.0, 99.0, -1.0, math.nan, math.inf):
        histogram.observe(seconds)  # a negative time counts as 0; NaN and inf not at all
    assert histogram.count == 6
    assert histogram.sum == pytest.approx(102.081)
    again = ReloadHistogram.from_dict(histogram.as_dict())
    assert (again.counts, again.sum) == (histogram.counts, histogram.sum)
    assert ReloadHistogram.from_dict(copy.deepcopy(histogram.as_dict())).buckets() == \
        histogram.buckets()

    valid = histogram.as_dict()
    for garbage in (None, "x", 3, [], {}, {"buckets": []}, {"buckets": {}, "sum": "1"},
                    {"buckets": {"0.1": 1}}, {"buckets": {"0.1": -1}, "sum": 0},
                    {"buckets": {"0.1": 1.5}, "sum": 0}, {"buckets": {"x": 1}, "sum": 0},
                    {"buckets": {"NaN": 1}, "sum": 0}, {"buckets": {"0.1": True}, "sum": 0},
                    {**valid, "sum": math.nan}, {**valid, "sum": -3.0}, {**valid, "sum": True}):
        empty = ReloadHistogram.from_dict(garbage)
        assert (empty.count, empty.sum) == (0, 0.0), garbage

    # bounds of another layout: counted in the first of ours not below them
    moved = ReloadHistogram.from_dict({"buckets": {"0.2": 2, "0.25": 1, "3": 4, "+Inf": 1},
                                       "sum": 9.5})
    assert dict(moved.buckets())[0.25] == 3
    assert dict(moved.buckets())[5.0] == 7
    assert moved.count == 8 and moved.sum == 9.5


def test_pylb_data_tolerated() -> None:
    nothing = families(render({}, [], {}, {"global"}))
    assert not {name for name in nothing if name.startswith("pylb_")}
    as_dict = {"generation": "2", "reloads_total": 1,
               "reload_seconds": {"buckets": {"0.5": 1}, "sum": 0.4}}
    text = render({}, [], as_dict, {"global"})
    assert value(text, "pylb_generation") == 2
    assert value(text, "pylb_reload_duration_seconds_count") == 1


def test_families_helper() -> None:
    text = (b"# HELP a_total x\n# TYPE a_total counter\na_total 1\n"
            b"# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n"
            b"# TYPE empty gauge\nplain 3\n")
    assert families(text) == {"a_total", "h", "plain"}
