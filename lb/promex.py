"""HAProxy-compatible Prometheus exposition of pylb's statistics (sans-IO).

pylb's `/metrics` answers with the metric names, types and labels of HAProxy 2.6's built-in
Prometheus exporter ("promex"), so Grafana dashboards and alerts written for HAProxy work on
pylb unchanged. This module is the pure part: `render()` turns what `show info` and
`show stat` say (HAProxy's field and column names) into the text exposition format; the
HTTP plumbing and the gathering of the data live elsewhere.

What HAProxy does, and so what this does:

- four scopes, `?scope=global|frontend|backend|server` (pylb's own `pylb_*` metrics belong
  to "global"); families come out in HAProxy's order, each with its HELP and TYPE lines
  just before its first sample, and a family with no sample is left out entirely;
- labels: `proxy` for frontends and backends, `proxy` and `server` for servers; states as
  one series per possible `state` value (1 for the current one, 0 for the others); HTTP
  responses per class with a `code` label; HTTP-only families for `mode http` proxies only;
- times kept in milliseconds by `show stat` are exported in seconds;
- a value that is not measured ("" or missing) gives no sample, except for the families
  of features pylb does not have (compression, cache, pipes, zlib, peers, DNS, ...), which
  read 0 as they do on an HAProxy that does not use them.

The text format is written here rather than with prometheus_client because HAProxy's names
must stay byte for byte: prometheus_client renames counters to end in `_total`, which would
turn HAProxy's `haproxy_process_failed_resolutions` counter into another metric. The format
is small (HELP, TYPE, samples, escaping) and promtool checks the result in the tests.
The help texts are pylb's own wording of what HAProxy's fields mean.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import NamedTuple

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SCOPES = ("global", "frontend", "backend", "server")

# Every family of HAProxy 2.6's promex for these four scopes, in its order: names from
# addons/promex/service-prometheus.c at v2.6.0 (185), plus the backend's agg_server_status and
# agg_check_status that 2.6 maintenance releases got from 2.8 (HAProxy commits 7d6644e68 and
# e06e31ea3, "could be backported as far as 2.4"). Listener and stick-table families are left out.
HAPROXY_FAMILIES: tuple[str, ...] = (
    # global scope: `show info` fields (60)
    "haproxy_process_nbthread", "haproxy_process_nbproc", "haproxy_process_relative_process_id",
    "haproxy_process_uptime_seconds", "haproxy_process_start_time_seconds",
    "haproxy_process_max_memory_bytes", "haproxy_process_pool_allocated_bytes",
    "haproxy_process_pool_used_bytes", "haproxy_process_pool_failures_total",
    "haproxy_process_max_fds", "haproxy_process_max_sockets", "haproxy_process_max_connections",
    "haproxy_process_hard_max_connections", "haproxy_process_current_connections",
    "haproxy_process_connections_total", "haproxy_process_requests_total",
    "haproxy_process_max_ssl_connections", "haproxy_process_current_ssl_connections",
    "haproxy_process_ssl_connections_total", "haproxy_process_max_pipes",
    "haproxy_process_pipes_used_total", "haproxy_process_pipes_free_total",
    "haproxy_process_current_connection_rate", "haproxy_process_limit_connection_rate",
    "haproxy_process_max_connection_rate", "haproxy_process_current_session_rate",
    "haproxy_process_limit_session_rate", "haproxy_process_max_session_rate",
    "haproxy_process_current_ssl_rate", "haproxy_process_limit_ssl_rate",
    "haproxy_process_max_ssl_rate", "haproxy_process_current_frontend_ssl_key_rate",
    "haproxy_process_max_frontend_ssl_key_rate", "haproxy_process_frontend_ssl_reuse",
    "haproxy_process_current_backend_ssl_key_rate", "haproxy_process_max_backend_ssl_key_rate",
    "haproxy_process_ssl_cache_lookups_total", "haproxy_process_ssl_cache_misses_total",
    "haproxy_process_http_comp_bytes_in_total", "haproxy_process_http_comp_bytes_out_total",
    "haproxy_process_limit_http_comp", "haproxy_process_current_zlib_memory",
    "haproxy_process_max_zlib_memory", "haproxy_process_current_tasks",
    "haproxy_process_current_run_queue", "haproxy_process_idle_time_percent",
    "haproxy_process_stopping", "haproxy_process_jobs", "haproxy_process_unstoppable_jobs",
    "haproxy_process_listeners", "haproxy_process_active_peers", "haproxy_process_connected_peers",
    "haproxy_process_dropped_logs_total", "haproxy_process_busy_polling_enabled",
    "haproxy_process_failed_resolutions", "haproxy_process_bytes_out_total",
    "haproxy_process_spliced_bytes_out_total", "haproxy_process_bytes_out_rate",
    "haproxy_process_recv_logs_total", "haproxy_process_build_info",
    # frontend scope (28)
    "haproxy_frontend_current_sessions", "haproxy_frontend_max_sessions",
    "haproxy_frontend_limit_sessions", "haproxy_frontend_sessions_total",
    "haproxy_frontend_bytes_in_total", "haproxy_frontend_bytes_out_total",
    "haproxy_frontend_requests_denied_total", "haproxy_frontend_responses_denied_total",
    "haproxy_frontend_request_errors_total", "haproxy_frontend_status",
    "haproxy_frontend_limit_session_rate", "haproxy_frontend_max_session_rate",
    "haproxy_frontend_http_responses_total", "haproxy_frontend_http_requests_rate_max",
    "haproxy_frontend_http_requests_total", "haproxy_frontend_http_comp_bytes_in_total",
    "haproxy_frontend_http_comp_bytes_out_total",
    "haproxy_frontend_http_comp_bytes_bypassed_total",
    "haproxy_frontend_http_comp_responses_total", "haproxy_frontend_connections_rate_max",
    "haproxy_frontend_connections_total", "haproxy_frontend_intercepted_requests_total",
    "haproxy_frontend_denied_connections_total", "haproxy_frontend_denied_sessions_total",
    "haproxy_frontend_failed_header_rewriting_total", "haproxy_frontend_http_cache_lookups_total",
    "haproxy_frontend_http_cache_hits_total", "haproxy_frontend_internal_errors_total",
    # backend scope (50)
    "haproxy_backend_current_queue", "haproxy_backend_max_queue",
    "haproxy_backend_current_sessions", "haproxy_backend_max_sessions",
    "haproxy_backend_limit_sessions", "haproxy_backend_sessions_total",
    "haproxy_backend_bytes_in_total", "haproxy_backend_bytes_out_total",
    "haproxy_backend_requests_denied_total", "haproxy_backend_responses_denied_total",
    "haproxy_backend_connection_errors_total", "haproxy_backend_response_errors_total",
    "haproxy_backend_retry_warnings_total", "haproxy_backend_redispatch_warnings_total",
    "haproxy_backend_status", "haproxy_backend_weight", "haproxy_backend_active_servers",
    "haproxy_backend_backup_servers", "haproxy_backend_check_up_down_total",
    "haproxy_backend_check_last_change_seconds", "haproxy_backend_downtime_seconds_total",
    "haproxy_backend_loadbalanced_total", "haproxy_backend_max_session_rate",
    "haproxy_backend_http_responses_total", "haproxy_backend_http_requests_total",
    "haproxy_backend_client_aborts_total", "haproxy_backend_server_aborts_total",
    "haproxy_backend_http_comp_bytes_in_total", "haproxy_backend_http_comp_bytes_out_total",
    "haproxy_backend_http_comp_bytes_bypassed_total", "haproxy_backend_http_comp_responses_total",
    "haproxy_backend_last_session_seconds", "haproxy_backend_queue_time_average_seconds",
    "haproxy_backend_connect_time_average_seconds",
    "haproxy_backend_response_time_average_seconds", "haproxy_backend_total_time_average_seconds",
    "haproxy_backend_failed_header_rewriting_total", "haproxy_backend_connection_attempts_total",
    "haproxy_backend_connection_reuses_total", "haproxy_backend_http_cache_lookups_total",
    "haproxy_backend_http_cache_hits_total", "haproxy_backend_max_queue_time_seconds",
    "haproxy_backend_max_connect_time_seconds", "haproxy_backend_max_response_time_seconds",
    "haproxy_backend_max_total_time_seconds", "haproxy_backend_internal_errors_total",
    "haproxy_backend_uweight", "haproxy_backend_agg_server_status",
    "haproxy_backend_agg_server_check_status", "haproxy_backend_agg_check_status",
    # server scope (49)
    "haproxy_server_current_queue", "haproxy_server_max_queue", "haproxy_server_current_sessions",
    "haproxy_server_max_sessions", "haproxy_server_limit_sessions",
    "haproxy_server_sessions_total", "haproxy_server_bytes_in_total",
    "haproxy_server_bytes_out_total", "haproxy_server_responses_denied_total",
    "haproxy_server_connection_errors_total", "haproxy_server_response_errors_total",
    "haproxy_server_retry_warnings_total", "haproxy_server_redispatch_warnings_total",
    "haproxy_server_status", "haproxy_server_weight", "haproxy_server_check_failures_total",
    "haproxy_server_check_up_down_total", "haproxy_server_check_last_change_seconds",
    "haproxy_server_downtime_seconds_total", "haproxy_server_queue_limit",
    "haproxy_server_current_throttle", "haproxy_server_loadbalanced_total",
    "haproxy_server_max_session_rate", "haproxy_server_check_status", "haproxy_server_check_code",
    "haproxy_server_check_duration_seconds", "haproxy_server_http_responses_total",
    "haproxy_server_client_aborts_total", "haproxy_server_server_aborts_total",
    "haproxy_server_last_session_seconds", "haproxy_server_queue_time_average_seconds",
    "haproxy_server_connect_time_average_seconds", "haproxy_server_response_time_average_seconds",
    "haproxy_server_total_time_average_seconds", "haproxy_server_failed_header_rewriting_total",
    "haproxy_server_connection_attempts_total", "haproxy_server_connection_reuses_total",
    "haproxy_server_idle_connections_current", "haproxy_server_idle_connections_limit",
    "haproxy_server_max_queue_time_seconds", "haproxy_server_max_connect_time_seconds",
    "haproxy_server_max_response_time_seconds", "haproxy_server_max_total_time_seconds",
    "haproxy_server_internal_errors_total", "haproxy_server_unsafe_idle_connections_current",
    "haproxy_server_safe_idle_connections_current", "haproxy_server_used_connections_current",
    "haproxy_server_need_connections_current", "haproxy_server_uweight",
)

GAUGE, COUNTER = "gauge", "counter"
MB = 1048576  # HAProxy's *_MB fields are bytes / 2**20


class Info(NamedTuple):
    """One `haproxy_process_*` family, read from a `show info` field."""

    name: str  # after "haproxy_process_"
    type: str
    field: str  # HAProxy's `show info` field name
    help: str
    lacking: bool = False  # a feature pylb does not have: reads 0 when not given


# HAProxy's `show info` order. Its "_bytes" fields fall back on pylb's "_MB" ones (_ALIASES).
_PROCESS: tuple[Info, ...] = (
    Info("nbthread", GAUGE, "Nbthread", "Number of threads started."),
    Info("nbproc", GAUGE, "Nbproc", "Number of processes started (historical, 1)."),
    Info("relative_process_id", GAUGE, "Process_num", "Relative process number (1)."),
    Info("uptime_seconds", GAUGE, "Uptime_sec", "Seconds since the process started."),
    Info("start_time_seconds", GAUGE, "Start_time_sec", "Start time, in seconds since the epoch."),
    Info("max_memory_bytes", GAUGE, "Memmax_bytes", "Memory limit in bytes (0: none)."),
    Info("pool_allocated_bytes", GAUGE, "PoolAlloc_bytes", "Bytes allocated in memory pools.",
         lacking=True),
    Info("pool_used_bytes", GAUGE, "PoolUsed_bytes", "Bytes of memory pools in use.",
         lacking=True),
    Info("pool_failures_total", COUNTER, "PoolFailed", "Failed memory pool allocations.",
         lacking=True),
    Info("max_fds", GAUGE, "Ulimit-n", "Limit on file descriptors."),
    Info("max_sockets", GAUGE, "Maxsock", "Limit on sockets."),
    Info("max_connections", GAUGE, "Maxconn", "Limit on connections (maxconn)."),
    Info("hard_max_connections", GAUGE, "Hard_maxconn", "Hard limit on connections."),
    Info("current_connections", GAUGE, "CurrConns", "Connections now open."),
    Info("connections_total", COUNTER, "CumConns", "Connections accepted since start."),
    Info("requests_total", COUNTER, "CumReq", "Requests received since start."),
    Info("max_ssl_connections", GAUGE, "MaxSslConns", "Limit on TLS connections (0: none)."),
    Info("current_ssl_connections", GAUGE, "CurrSslConns", "TLS connections now open."),
    Info("ssl_connections_total", COUNTER, "CumSslConns", "TLS connections since start."),
    Info("max_pipes", GAUGE, "Maxpipes", "Limit on splicing pipes.", lacking=True),
    Info("pipes_used_total", COUNTER, "PipesUsed", "Splicing pipes in use.", lacking=True),
    Info("pipes_free_total", COUNTER, "PipesFree", "Splicing pipes free.", lacking=True),
    Info("current_connection_rate", GAUGE, "ConnRate", "New connections over the last second."),
    Info("limit_connection_rate", GAUGE, "ConnRateLimit", "Limit on new connections per second."),
    Info("max_connection_rate", GAUGE, "MaxConnRate", "Highest connection rate seen."),
    Info("current_session_rate", GAUGE, "SessRate", "New sessions over the last second."),
    Info("limit_session_rate", GAUGE, "SessRateLimit", "Limit on new sessions per second."),
    Info("max_session_rate", GAUGE, "MaxSessRate", "Highest session rate seen."),
    Info("current_ssl_rate", GAUGE, "SslRate", "New TLS connections over the last second."),
    Info("limit_ssl_rate", GAUGE, "SslRateLimit", "Limit on new TLS connections per second."),
    Info("max_ssl_rate", GAUGE, "MaxSslRate", "Highest TLS connection rate seen."),
    Info("current_frontend_ssl_key_rate", GAUGE, "SslFrontendKeyRate",
         "Client-side TLS key computations over the last second."),
    Info("max_frontend_ssl_key_rate", GAUGE, "SslFrontendMaxKeyRate",
         "Highest client-side TLS key computation rate seen."),
    Info("frontend_ssl_reuse", GAUGE, "SslFrontendSessionReuse_pct",
         "Percentage of client-side TLS connections that resumed a session."),
    Info("current_backend_ssl_key_rate", GAUGE, "SslBackendKeyRate",
         "Server-side TLS key computations over the last second."),
    Info("max_backend_ssl_key_rate", GAUGE, "SslBackendMaxKeyRate",
         "Highest server-side TLS key computation rate seen."),
    Info("ssl_cache_lookups_total", COUNTER, "SslCacheLookups", "TLS session cache lookups."),
    Info("ssl_cache_misses_total", COUNTER, "SslCacheMisses", "TLS session cache misses."),
    Info("http_comp_bytes_in_total", COUNTER, "CompressBpsIn",
         "Bytes fed to the HTTP compressor.", lacking=True),
    Info("http_comp_bytes_out_total", COUNTER, "CompressBpsOut",
         "Bytes out of the HTTP compressor.", lacking=True),
    Info("limit_http_comp", GAUGE, "CompressBpsRateLim",
         "Compression output rate above which compression stops.", lacking=True),
    Info("current_zlib_memory", GAUGE, "ZlibMemUsage",
         "Bytes of memory used by compression.", lacking=True),
    Info("max_zlib_memory", GAUGE, "MaxZlibMemUsage",
         "Limit on memory used by compression.", lacking=True),
    Info("current_tasks", GAUGE, "Tasks", "Tasks (active and sleeping)."),
    Info("current_run_queue", GAUGE, "Run_queue", "Tasks ready to run."),
    Info("idle_time_percent", GAUGE, "Idle_pct", "Percentage of the last second spent idle."),
    Info("stopping", GAUGE, "Stopping", "1 while the process is stopping, else 0."),
    Info("jobs", GAUGE, "Jobs", "Active jobs (connections, listeners)."),
    Info("unstoppable_jobs", GAUGE, "Unstoppable Jobs", "Jobs a soft stop waits for."),
    Info("listeners", GAUGE, "Listeners", "Listening sockets."),
    Info("active_peers", GAUGE, "ActivePeers", "Active peer connections.", lacking=True),
    Info("connected_peers", GAUGE, "ConnectedPeers", "Connected peers.", lacking=True),
    Info("dropped_logs_total", COUNTER, "DroppedLogs", "Log messages dropped."),
    Info("busy_polling_enabled", GAUGE, "BusyPolling", "1 if busy polling is on.", lacking=True),
    # a counter in HAProxy, without _total: typed gauge here (always 0: pylb has no DNS
    # resolvers), so that promtool's lint passes with the name kept byte for byte
    Info("failed_resolutions", GAUGE, "FailedResolutions",
         "Failed DNS resolutions.", lacking=True),
    Info("bytes_out_total", COUNTER, "TotalBytesOut", "Bytes sent since start."),
    Info("spliced_bytes_out_total", COUNTER, "TotalSplicdedBytesOut",  # sic, HAProxy's name
         "Bytes sent through kernel pipes.", lacking=True),
    Info("bytes_out_rate", GAUGE, "BytesOutRate", "Bytes sent over the last second."),
    Info("recv_logs_total", COUNTER, "CumRecvLogs",
         "Log messages received by log forwarding.", lacking=True),
    Info("build_info", GAUGE, "Version", "Build information, in the version label."),
)

# pylb's `show info` gives megabytes where HAProxy has both; and one more spelling
_ALIASES: dict[str, tuple[str, int]] = {
    "Memmax_bytes": ("Memmax_MB", MB),
    "PoolAlloc_bytes": ("PoolAlloc_MB", MB),
    "PoolUsed_bytes": ("PoolUsed_MB", MB),
    "TotalSplicdedBytesOut": ("TotalSplicedBytesOut", 1),
}


class Stat(NamedTuple):
    """One frontend, backend and/or server family, read from a `show stat` column."""

    name: str  # after "haproxy_<scope>_"
    type: str
    column: str  # HAProxy's `show stat` column ("" for the ones computed from others)
    scopes: str  # f(rontend), b(ackend), s(erver): where HAProxy has it
    help: str
    kind: str = "value"  # or how to make its samples: see _samples()
    ms: bool = False  # milliseconds in `show stat`, seconds in the exposition
    http: bool = False  # only for `mode http` proxies
    lacking: bool = False  # a feature pylb does not have: reads 0 when not given


# HAProxy's `show stat` column order, which is the order of its families.
_STATS: tuple[Stat, ...] = (
    Stat("current_queue", GAUGE, "qcur", "bs", "Requests waiting in the queue."),
    Stat("max_queue", GAUGE, "qmax", "bs", "Highest number of queued requests seen."),
    Stat("current_sessions", GAUGE, "scur", "fbs", "Sessions now open."),
    Stat("max_sessions", GAUGE, "smax", "fbs", "Highest number of open sessions seen."),
    Stat("limit_sessions", GAUGE, "slim", "fbs", "Limit on sessions (maxconn; backend: fullconn)."),
    Stat("sessions_total", COUNTER, "stot", "fbs", "Sessions since start."),
    Stat("bytes_in_total", COUNTER, "bin", "fbs", "Request bytes received."),
    Stat("bytes_out_total", COUNTER, "bout", "fbs", "Response bytes sent."),
    Stat("requests_denied_total", COUNTER, "dreq", "fb", "Requests denied by rules."),
    Stat("responses_denied_total", COUNTER, "dresp", "fbs", "Responses denied by rules."),
    Stat("request_errors_total", COUNTER, "ereq", "f", "Invalid requests."),
    Stat("connection_errors_total", COUNTER, "econ", "bs", "Failed connections to servers."),
    Stat("response_errors_total", COUNTER, "eresp", "bs", "Invalid or missing server responses."),
    Stat("retry_warnings_total", COUNTER, "wretr", "bs", "Connection retries."),
    Stat("redispatch_warnings_total", COUNTER, "wredis", "bs",
         "Requests sent to another server after a connection failure."),
    Stat("status", GAUGE, "status", "fbs",
         "Current status, one series per state label value (1: current).", kind="status"),
    Stat("weight", GAUGE, "weight", "bs",
         "Effective weight; backend: sum of its active servers' weights."),
    Stat("active_servers", GAUGE, "act", "b", "Active servers UP with a non-zero weight."),
    Stat("backup_servers", GAUGE, "bck", "b", "Backup servers UP with a non-zero weight."),
    Stat("check_failures_total", COUNTER, "chkfail", "s", "Failed health checks."),
    Stat("check_up_down_total", COUNTER, "chkdown", "bs", "Transitions from UP to DOWN."),
    Stat("check_last_change_seconds", GAUGE, "lastchg", "bs",
         "Seconds since the last change of state."),
    Stat("downtime_seconds_total", COUNTER, "downtime", "bs", "Seconds spent DOWN."),
    Stat("queue_limit", GAUGE, "qlimit", "s", "Limit on queued requests (maxqueue)."),
    Stat("current_throttle", GAUGE, "throttle", "s", "Slow-start throttle, in percent."),
    Stat("loadbalanced_total", COUNTER, "lbtot", "bs", "Times chosen by load balancing."),
    Stat("limit_session_rate", GAUGE, "rate_lim", "f", "Limit on new sessions per second."),
    Stat("max_session_rate", GAUGE, "rate_max", "fbs", "Highest number of sessions per second."),
    Stat("check_status", GAUGE, "check_status", "s",
         "Status of the last health check, one series per state label value (1: current).",
         kind="check_status"),
    Stat("check_code", GAUGE, "check_code", "s",
         "Layer 5-7 code of the last health check (0: none).", kind="check_code"),
    Stat("check_duration_seconds", GAUGE, "check_duration", "s",
         "Duration of the last health check, in seconds.", kind="check_duration", ms=True),
    Stat("http_responses_total", COUNTER, "", "fbs",
         "HTTP responses, per class of status code.", kind="codes", http=True),
    Stat("http_requests_rate_max", GAUGE, "req_rate_max", "f",
         "Highest number of HTTP requests per second.", http=True),
    Stat("http_requests_total", COUNTER, "req_tot", "fb", "HTTP requests.", http=True),
    Stat("client_aborts_total", COUNTER, "cli_abrt", "bs", "Transfers aborted by the client."),
    Stat("server_aborts_total", COUNTER, "srv_abrt", "bs", "Transfers aborted by the server."),
    Stat("http_comp_bytes_in_total", COUNTER, "comp_in", "fb",
         "Bytes fed to the HTTP compressor.", http=True, lacking=True),
    Stat("http_comp_bytes_out_total", COUNTER, "comp_out", "fb",
         "Bytes out of the HTTP compressor.", http=True, lacking=True),
    Stat("http_comp_bytes_bypassed_total", COUNTER, "comp_byp", "fb",
         "Bytes that bypassed the HTTP compressor.", http=True, lacking=True),
    Stat("http_comp_responses_total", COUNTER, "comp_rsp", "fb",
         "HTTP responses compressed.", http=True, lacking=True),
    Stat("last_session_seconds", GAUGE, "lastsess", "bs",
         "Seconds since the last session (-1: none yet)."),
    Stat("queue_time_average_seconds", GAUGE, "qtime", "bs",
         "Average time in the queue of the requests answered over the last second.", ms=True),
    Stat("connect_time_average_seconds", GAUGE, "ctime", "bs",
         "Average time to connect of the requests answered over the last second.", ms=True),
    Stat("response_time_average_seconds", GAUGE, "rtime", "bs",
         "Average time to the response of the requests answered over the last second.", ms=True),
    Stat("total_time_average_seconds", GAUGE, "ttime", "bs",
         "Average total time of the requests answered over the last second.", ms=True),
    Stat("connections_rate_max", GAUGE, "conn_rate_max", "f",
         "Highest number of new connections per second."),
    Stat("connections_total", COUNTER, "conn_tot", "f", "Connections accepted."),
    Stat("intercepted_requests_total", COUNTER, "intercepted", "f",
         "HTTP requests answered by the proxy itself (redirects, returns).", http=True),
    Stat("denied_connections_total", COUNTER, "dcon", "f",
         "Connections rejected by tcp-request connection rules."),
    Stat("denied_sessions_total", COUNTER, "dses", "f",
         "Sessions rejected by tcp-request session rules.", lacking=True),
    Stat("failed_header_rewriting_total", COUNTER, "wrew", "fbs", "Failed header rewrites."),
    Stat("connection_attempts_total", COUNTER, "connect", "bs", "Connection attempts to servers."),
    Stat("connection_reuses_total", COUNTER, "reuse", "bs", "Idle server connections reused."),
    Stat("http_cache_lookups_total", COUNTER, "cache_lookups", "fb",
         "HTTP cache lookups.", http=True, lacking=True),
    Stat("http_cache_hits_total", COUNTER, "cache_hits", "fb",
         "HTTP cache hits.", http=True, lacking=True),
    Stat("idle_connections_current", GAUGE, "srv_icur", "s", "Idle connections for reuse."),
    Stat("idle_connections_limit", GAUGE, "src_ilim", "s", "Limit on idle connections."),
    Stat("max_queue_time_seconds", GAUGE, "qtime_max", "bs",
         "Longest time seen in the queue.", ms=True),
    Stat("max_connect_time_seconds", GAUGE, "ctime_max", "bs",
         "Longest time seen to connect.", ms=True),
    Stat("max_response_time_seconds", GAUGE, "rtime_max", "bs",
         "Longest time seen to the response.", ms=True),
    Stat("max_total_time_seconds", GAUGE, "ttime_max", "bs",
         "Longest total time seen.", ms=True),
    Stat("internal_errors_total", COUNTER, "eint", "fbs", "Internal errors."),
    Stat("unsafe_idle_connections_current", GAUGE, "idle_conn_cur", "s",
         "Idle connections only their own client may reuse."),
    Stat("safe_idle_connections_current", GAUGE, "safe_conn_cur", "s",
         "Idle connections any client may reuse."),
    Stat("used_connections_current", GAUGE, "used_conn_cur", "s", "Connections in use."),
    Stat("need_connections_current", GAUGE, "need_conn_est", "s",
         "Estimate of the connections needed."),
    Stat("uweight", GAUGE, "uweight", "bs",
         "Weight set by the user; backend: sum of its active servers'."),
    Stat("agg_server_status", GAUGE, "", "b",
         "Servers in each state, per state label value.", kind="agg_server"),
    Stat("agg_server_check_status", GAUGE, "", "b",
         "[DEPRECATED] Servers in each state, per state label value.", kind="agg_server"),
    Stat("agg_check_status", GAUGE, "", "b",
         "Servers per status of their last health check, per state label value.",
         kind="agg_check"),
)

# state label values, in HAProxy's order
_PROXY_STATES = ("DOWN", "UP")
_SERVER_STATES = ("DOWN", "UP", "MAINT", "DRAIN", "NOLB")
# the health check statuses HAProxy lists: those of finished checks that passed or failed
_CHECK_STATES = ("HANA", "SOCKERR", "L4OK", "L4TOUT", "L4CON", "L6OK", "L6TOUT", "L6RSP",
                 "L7TOUT", "L7RSP", "L7OK", "L7OKC", "L7STS", "PROCERR", "PROCTOUT", "PROCOK")
_CODES = (("1xx", "hrsp_1xx"), ("2xx", "hrsp_2xx"), ("3xx", "hrsp_3xx"), ("4xx", "hrsp_4xx"),
          ("5xx", "hrsp_5xx"), ("other", "hrsp_other"))
# `show stat`'s type column
_ROW_SCOPES = {0: "frontend", 1: "backend", 2: "server"}

Number = int | float
Labels = tuple[tuple[str, str], ...]
Row = dict[str, object]  # a `show stat` row, by HAProxy's column names
Samples = Iterator[tuple[Labels, Number]]  # a family's samples for a row: (more labels, value)


# -- values -------------------------------------------------------------------------------

def _number(value: object) -> Number | None:
    """A number from a `show info`/`show stat` value; None when it is not measured ("",
    missing) or not a number."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            return None
        return None if math.isnan(number) else number
    return None


def _format(value: Number) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class _Family:
    """One metric family: HELP and TYPE lines, then its samples; nothing without samples."""

    def __init__(self, name: str, type_: str, help_: str) -> None:
        self.name, self.type, self.help = name, type_, help_
        self.samples: list[str] = []

    def add(self, value: Number, labels: Labels = (), suffix: str = "") -> None:
        text = ",".join(f'{key}="{_escape_label(val)}"' for key, val in labels)
        braces = "{" + text + "}" if text else ""
        self.samples.append(f"{self.name}{suffix}{braces} {_format(value)}\n")

    def text(self) -> str:
        if not self.samples:
            return ""
        head = f"# HELP {self.name} {_escape_help(self.help)}\n# TYPE {self.name} {self.type}\n"
        return head + "".join(self.samples)


# -- global scope: show info --------------------------------------------------------------

def _info_value(info: dict[str, object], field: str) -> Number | None:
    value = _number(info.get(field))
    if value is None and field in _ALIASES:
        other, scale = _ALIASES[field]
        value = _number(info.get(other))
        if value is not None:
            value *= scale
    return value


def _process(info: dict[str, object]) -> Iterator[_Family]:
    for metric in _PROCESS:
        family = _Family("haproxy_process_" + metric.name, metric.type, metric.help)
        if metric.name == "build_info":
            version = info.get(metric.field)
            if version not in (None, ""):
                family.add(1, (("version", str(version)),))
        else:
            value = _info_value(info, metric.field)
            if value is None and metric.lacking:
                value = 0
            if value is not None:
                family.add(value)
        yield family


# -- frontend, backend and server scopes: show stat ---------------------------------------

class _Proxies:
    """`show stat` rows sorted by scope, and what some families need across rows."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows: dict[str, list[Row]] = {scope: [] for scope in SCOPES[1:]}
        for row in rows:
            kind = _number(row.get("type"))
            scope = None if kind is None else _ROW_SCOPES.get(int(kind))
            if scope is not None:
                self.rows[scope].append(row)
        self.modes = {str(row.get("pxname")): str(row.get("mode", ""))
                      for row in self.rows["backend"] + self.rows["frontend"]}
        self.servers: dict[str, list[Row]] = {}
        for row in self.rows["server"]:
            self.servers.setdefault(str(row.get("pxname")), []).append(row)

    def http(self, row: Row) -> bool:
        mode = row.get("mode") or self.modes.get(str(row.get("pxname")), "")
        return str(mode).lower() == "http"


def _proxy_state(status: str) -> str:
    """HAProxy: a frontend is UP unless stopped (PAUSED is UP); a backend is UP while it
    can serve."""
    return "DOWN" if status.strip().upper().startswith(("STOP", "DOWN")) else "UP"


def _server_state(status: str) -> str:
    """One of _SERVER_STATES from `show stat`'s status: "UP 1/3" (going down) is still UP,
    "DOWN 1/2" (going up) still DOWN, "no check" UP, "MAINT (via x/y)" MAINT..."""
    status = status.strip().upper()
    for state in ("MAINT", "DRAIN", "NOLB", "UP"):
        if status.startswith(state):
            return state
    return "UP" if status == "NO CHECK" else "DOWN"


def _check_status(row: Row) -> str:
    """The status of the last check, "" when checks are off (or paused, in maintenance);
    "* " marks a check in progress."""
    return str(row.get("check_status", "")).removeprefix("* ").strip()


def _one_of(states: tuple[str, ...], current: str) -> Samples:
    for state in states:
        yield (("state", state),), int(state == current)


def _count_of(states: tuple[str, ...], found: list[str]) -> Samples:
    for state in states:
        yield (("state", state),), found.count(state)


def _status(scope: str, row: Row) -> Samples:
    status = str(row.get("status", "")).strip()
    if status and scope == "server":
        yield from _one_of(_SERVER_STATES, _server_state(status))
    elif status:
        yield from _one_of(_PROXY_STATES, _proxy_state(status))


def _aggregate(kind: str, servers: list[Row]) -> Samples:
    if kind == "agg_server":
        found = [_server_state(str(row.get("status", ""))) for row in servers]
        yield from _count_of(_SERVER_STATES, found)
    else:
        yield from _count_of(_CHECK_STATES, [_check_status(row) for row in servers])


def _check(kind: str, row: Row, column: str) -> Samples:
    """HAProxy has check_status and check_code for servers whose checks run, and
    check_duration once a check has finished."""
    check = _check_status(row)
    if kind == "check_status" and check:
        yield from _one_of(_CHECK_STATES, check)
    elif kind == "check_code" and check:
        yield (), _number(row.get(column)) or 0  # 0 when the check gave no layer 5-7 code
    elif kind == "check_duration" and check not in ("", "INI", "UNK"):
        value = _number(row.get(column))
        if value is not None:
            yield (), value / 1000


def _samples(metric: Stat, scope: str, row: Row, column: str, proxies: _Proxies) -> Samples:
    """The samples of one family for one row."""
    if metric.kind == "status":
        yield from _status(scope, row)
    elif metric.kind.startswith("agg_"):
        # as HAProxy: nothing for a backend without servers
        yield from _aggregate(metric.kind, proxies.servers.get(str(row.get("pxname")), []))
    elif metric.kind.startswith("check_"):
        yield from _check(metric.kind, row, column)
    else:
        value = _number(row.get(column))
        if value is None and metric.lacking:
            value = 0
        if value is not None:
            yield (), value / 1000 if metric.ms else value


def _labels(scope: str, row: Row) -> Labels:
    proxy = ("proxy", str(row.get("pxname", "")))
    return (proxy, ("server", str(row.get("svname", "")))) if scope == "server" else (proxy,)


def _stats(scope: str, proxies: _Proxies) -> Iterator[_Family]:
    rows = proxies.rows[scope]
    for metric in _STATS:
        if scope[0] not in metric.scopes:
            continue
        family = _Family(f"haproxy_{scope}_{metric.name}", metric.type, metric.help)
        # like HAProxy, all proxies for one code, then all for the next
        passes = _CODES if metric.kind == "codes" else ((None, metric.column),)
        for code, column in passes:
            for row in rows:
                if metric.http and not proxies.http(row):
                    continue
                labels = _labels(scope, row) + ((("code", code),) if code else ())
                for extra, value in _samples(metric, scope, row, column, proxies):
                    family.add(value, labels + extra)
        yield family


# -- pylb's own ---------------------------------------------------------------------------

class ReloadHistogram:
    """Durations of reloads, for `pylb_reload_duration_seconds`. Plain data, carried from
    one master to the next across a takeover by as_dict()/from_dict()."""

    BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BUCKETS) + 1)  # per bucket, not cumulated; last: +Inf
        self.sum = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, seconds: float) -> None:
        if not math.isfinite(seconds):
            return  # a broken clock must not poison the sum
        seconds = max(0.0, float(seconds))
        self.counts[bisect_left(self.BUCKETS, seconds)] += 1  # first bucket with le >= it
        self.sum += seconds

    def buckets(self) -> list[tuple[float, int]]:
        """(upper bound, cumulative count) pairs, ending with +Inf."""
        bounds = (*self.BUCKETS, math.inf)
        total, out = 0, []
        for bound, count in zip(bounds, self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out

    def as_dict(self) -> dict[str, object]:
        bounds = (*self.BUCKETS, math.inf)
        return {"buckets": {_format(b): n for b, n in zip(bounds, self.counts, strict=True)},
                "sum": self.sum}

    @classmethod
    def from_dict(cls, data: object) -> ReloadHistogram:
        """The histogram as_dict() described; an empty one for anything else. Counts made
        with other bucket bounds go to the first of ours that is not below theirs, so every
        `le` stays true."""
        histogram = cls()
        if not isinstance(data, dict):
            return histogram
        buckets, total = data.get("buckets"), data.get("sum")
        if not isinstance(buckets, dict) or isinstance(total, bool):
            return histogram
        if not isinstance(total, int | float) or not math.isfinite(total) or total < 0:
            return histogram
        for key, count in buckets.items():
            bound = _number(key)
            if bound is None or isinstance(count, bool) or not isinstance(count, int) or count < 0:
                return cls()
            histogram.counts[bisect_left(cls.BUCKETS, bound)] += count
        histogram.sum = float(total)
        return histogram


def _pylb(pylb: dict[str, object]) -> Iterator[_Family]:
    reloads = _Family("pylb_reloads_total", COUNTER, "Reloads: new generations of workers.")
    value = _number(pylb.get("reloads_total"))
    if value is not None:
        reloads.add(value)
    yield reloads

    histogram = pylb.get("reload_seconds")
    if isinstance(histogram, dict):
        histogram = ReloadHistogram.from_dict(histogram)
    durations = _Family("pylb_reload_duration_seconds", "histogram",
                        "Time taken by reloads, in seconds.")
    if isinstance(histogram, ReloadHistogram):
        for bound, count in histogram.buckets():
            durations.add(count, (("le", _format(bound)),), "_bucket")
        durations.add(histogram.sum, (), "_sum")
        durations.add(histogram.count, (), "_count")
    yield durations

    generation = _Family("pylb_generation", GAUGE, "Generation of the workers serving now.")
    value = _number(pylb.get("generation"))
    if value is not None:
        generation.add(value)
    yield generation


# -- the exposition -----------------------------------------------------------------------

def _wanted(scopes: Iterable[str] | None) -> set[str]:
    """HAProxy's ?scope= values: "*" is all of them, "" none; others (listener,
    sticktable) have nothing in pylb."""
    if scopes is None:
        return set(SCOPES)
    wanted = set(scopes)
    return set(SCOPES) if "*" in wanted else wanted & set(SCOPES)


def render(info: dict[str, object], rows: list[dict[str, object]], pylb: dict[str, object],
           scopes: set[str] | None = None) -> bytes:
    """The exposition of `show info` fields, `show stat` rows (dicts keyed by HAProxy's
    column names) and pylb's reload figures, for the scopes asked (None: all)."""
    wanted = _wanted(scopes)
    out: list[_Family] = []
    if "global" in wanted:
        out += _process(info)
    proxies = _Proxies(rows)
    for scope in SCOPES[1:]:
        if scope in wanted:
            out += _stats(scope, proxies)
    if "global" in wanted:
        out += _pylb(pylb)
    return "".join(family.text() for family in out).encode()


_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def families(text: bytes) -> set[str]:
    """The names of the families that have at least one sample in an exposition."""
    typed: set[str] = set()
    found: set[str] = set()
    for line in text.decode("utf-8", "replace").splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 3:
                typed.add(parts[2])
            continue
        match = _NAME.match(line)
        if line.startswith("#") or not match:
            continue
        name = match.group()
        for suffix in ("_bucket", "_sum", "_count", "_total"):
            if name not in typed and name.endswith(suffix) and name[: -len(suffix)] in typed:
                name = name[: -len(suffix)]
        found.add(name)
    return found
