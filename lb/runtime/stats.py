"""`show info`, `show stat` and `show servers state`, in HAProxy's formats.

Everything comes from the master's own view, without asking the workers: current values
(sessions, states, weights, limits, queues) from shared memory and the queue keeper,
cumulated counters from lb.tally, rates and request times from lb.rates, the workers'
load from lb.procload. `info` and `rows` give the figures as data (for the stats page and
/metrics too); the show functions print them. A figure pylb does not measure is empty,
never made up. Tools written for HAProxy read these answers unchanged: hatop needs at
least 51 fields per `show stat` row, the Prometheus exporter 33.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import lb
from lb import counters, procload
from lb.rates import NEW_KEYS
from lb.shared import (
    CHECK_STATUSES,
    DRAIN,
    FE_DISABLED,
    FE_FIELDS,
    FE_MAXCONN,
    FE_SMAX,
    GLOBAL_FIELDS,
    GLOBAL_MAXCONN,
    MAINT,
    SRV_ADMIN,
    SRV_CHECK_CODE,
    SRV_CHECK_MS,
    SRV_CHECK_STATUS,
    SRV_CHKDOWN,
    SRV_CHKFAIL,
    SRV_DOWNSINCE,
    SRV_DOWNTIME,
    SRV_FIELDS,
    SRV_LASTCHG,
    SRV_MAXCONN,
    SRV_OP,
    SRV_SMAX,
    SRV_WEIGHT,
    UP,
    Shared,
)
from lb.tally import Key

if TYPE_CHECKING:
    from lb.master import Master

COLUMNS = (
    "pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,"
    "wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,"
    "throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,"
    "check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,"
    "req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,"
    "lastsess,last_chk,last_agt,qtime,ctime,rtime,ttime,agent_status,agent_code,"
    "agent_duration,check_desc,agent_desc,check_rise,check_fall,check_health,agent_rise,"
    "agent_fall,agent_health,addr,cookie,mode,algo,conn_rate,conn_rate_max,conn_tot,"
    # the rest of HAProxy 2.6's own columns (empty here), then "-" and the columns of its
    # stats modules: pylb has the ssl module's (frontends only: TLS to servers is not
    # counted), and HAProxy's h2 module's are left out
    "intercepted,dcon,dses,wrew,connect,reuse,cache_lookups,cache_hits,srv_icur,src_ilim,"
    "qtime_max,ctime_max,rtime_max,ttime_max,eint,idle_conn_cur,safe_conn_cur,used_conn_cur,"
    "need_conn_est,uweight,agg_server_check_status,-,"
    "ssl_sess,ssl_reused_sess,ssl_failed_handshake"
).split(",")

FRONTEND, BACKEND, SERVER = 0, 1, 2


def _uptime(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    return f"{days}d {rest // 3600}h{rest % 3600 // 60:02d}m{rest % 60:02d}s"


def _gauges(master: Master, first: Callable[[Shared], int | None], columns: int = 1) -> int:
    """A per-slot gauge summed over every segment in use (older generations' workers
    still finishing count too); `first` finds its first slot in a segment."""
    total = 0
    for shared in master.tally.segments(master.shared):
        start = first(shared)
        if start is not None:
            total += sum(shared.words[start : start + shared.layout.slots * columns])
    return total


def _frontend_gauge(name: str, which: int) -> Callable[[Shared], int | None]:
    """Its connections (which=0) or TLS connections (which=1) in a segment."""
    def first(shared: Shared) -> int | None:
        base = shared.layout.frontends.get(name)
        return None if base is None else base + FE_FIELDS + which * shared.layout.slots
    return first


def _tls_connections(master: Master) -> int:
    return sum(_gauges(master, _frontend_gauge(name, 1)) for name in master.config.frontends)


def info(master: Master) -> dict[str, Any]:
    """show info's fields, by HAProxy's names; every one hatop insists on is there."""
    words = master.shared.words
    rates, load = master.rates, master.load
    if not load.sampled:  # asked before the master's first sample
        load.sample([h.pid for h in master.workers.values() if not h.stopping])
    uptime = int(time.time() - master.started)
    sessions = master.tally.process(master.tally.totals(master.shared))
    conns = _gauges(master, lambda shared: GLOBAL_FIELDS)
    tls_rate = rates.process_rate(counters.SSL_CONNS).rate
    keys = rates.rate(NEW_KEYS, counters.SSL_CONNS)
    listeners = len(master.listeners)
    checks = sum(s.check for b in master.config.backends.values() for s in b.servers)
    workers = [h for h in master.workers.values() if not h.stopping]
    return {
        "Name": "pylb",
        "Version": lb.__version__,
        "Release_date": lb.RELEASE_DATE,
        "Nbthread": 1,  # per process
        "Nbproc": master.config.global_.workers,
        "Process_num": 1,
        "Pid": os.getpid(),
        "Uptime": _uptime(uptime),
        "Uptime_sec": uptime,
        "Start_time_sec": int(master.started),
        "Memmax_MB": procload.memory_limit_mb(),
        "PoolAlloc_MB": "",  # pylb has no memory pools
        "PoolUsed_MB": "",
        "PoolFailed": "",
        "Ulimit-n": os.sysconf("SC_OPEN_MAX"),
        "Maxsock": os.sysconf("SC_OPEN_MAX"),
        "Maxconn": words[GLOBAL_MAXCONN],
        "Hard_maxconn": master.config.global_.maxconn,
        "CurrConns": conns,
        "CumConns": sessions[counters.STOT],
        "CumReq": sessions[counters.REQ_TOT],
        "MaxSslConns": 0,  # no limit
        "CurrSslConns": _tls_connections(master),
        "CumSslConns": sessions[counters.SSL_CONNS],
        "Maxpipes": 0,  # pylb uses no pipes
        "PipesUsed": 0,
        "PipesFree": 0,
        "ConnRate": rates.process_rate(counters.STOT).rate,
        "ConnRateLimit": 0,  # no limit
        "MaxConnRate": rates.process_rate(counters.STOT).max,
        "SessRate": rates.process_rate(counters.STOT).rate,  # a session per connection
        "SessRateLimit": 0,
        "MaxSessRate": rates.process_rate(counters.STOT).max,
        "SslRate": tls_rate,
        "SslRateLimit": 0,
        "MaxSslRate": rates.process_rate(counters.SSL_CONNS).max,
        "SslFrontendKeyRate": keys.rate,
        "SslFrontendMaxKeyRate": keys.max,
        "SslFrontendSessionReuse_pct": (
            round(100 * (1 - keys.rate / tls_rate)) if tls_rate else 0
        ),
        # HAProxy runs a task per session and per health check
        "Tasks": conns + checks,
        "Run_queue": load.run_queue,
        "Idle_pct": load.idle_pct,
        "Jobs": conns + listeners,  # as HAProxy counts them: connections and listeners
        "Unstoppable Jobs": 0,
        "Listeners": listeners,
        "DroppedLogs": sessions[counters.DROPPED_LOGS],
        "TotalBytesOut": sessions[counters.BOUT],
        "BytesOutRate": rates.process_rate(counters.BOUT).rate,
        "node": platform.node() or "pylb",
        "Workers": len(workers),
        "Generation": master.generation,
        "Reloads": master.reloads,
        "Stopping": int(master.stopping),
    }


def show_info(master: Master) -> str:
    """`Name: value` lines."""
    return "".join(f"{key}: {value}\n" for key, value in info(master).items())


def _iids(master: Master) -> dict[str, int]:
    """Each proxy's number (show stat's iid), in the configuration's order."""
    names = [*master.config.frontends, *master.config.backends]
    return {name: index for index, name in enumerate(dict.fromkeys(names), 1)}


class _Rows:
    def __init__(self, master: Master) -> None:
        self.master = master
        self.totals = master.tally.totals(master.shared)
        self.pid = os.getpid()
        self.iids = _iids(master)
        self.rows: list[dict[str, Any]] = []

    def add(self, kind: int, pxname: str, svname: str, sid: int, key: Key, http: bool,
            **values: Any) -> None:
        """A row: its counters (the HTTP ones on HTTP proxies only, as in HAProxy), its
        session rate, then `values`."""
        row: dict[str, Any] = dict.fromkeys(COLUMNS, "")
        row["-"] = "-"  # HAProxy's mark between its own columns and its modules'
        counted = self.totals.get(key, [0] * counters.WORDS)
        row.update(zip(counters.STAT_COLUMNS, counted, strict=False))
        if not http:
            for name in _HTTP_COLUMNS:
                row[name] = ""
        rates = self.master.rates
        sessions = rates.rate(key, counters.STOT)
        row.update(pxname=pxname, svname=svname, type=kind, pid=self.pid,
                   iid=self.iids[pxname], sid=sid, rate=sessions.rate,
                   rate_max=sessions.max)
        if kind != FRONTEND and http:
            row.update(_times(rates.average_times(key), counted))
        row.update(values)
        self.rows.append(row)


def _times(averages: list[int] | None, counted: list[int]) -> dict[str, Any]:
    """A server's or backend's request times (ms): averages over the last requests
    answered, the longest, and the seconds since it last got one (lastsess)."""
    last = counted[counters.LASTSESS]
    times: dict[str, Any] = {
        "lastsess": int(time.monotonic()) - last if last else "",
        "qtime_max": counted[counters.QTIME_MAX], "ctime_max": counted[counters.CTIME_MAX],
        "rtime_max": counted[counters.RTIME_MAX], "ttime_max": counted[counters.TTIME_MAX],
    }
    if averages is not None:
        times.update(zip(("qtime", "ctime", "rtime", "ttime"), averages, strict=True))
    return times


_HTTP_COLUMNS = ("hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx", "hrsp_other",
                 "req_tot", "req_rate", "req_rate_max")


def _downtime(words: Any, base: int, now: int) -> int:
    """Seconds a server spent DOWN since pylb started (while it is down, so far)."""
    since = words[base + SRV_DOWNSINCE]
    return words[base + SRV_DOWNTIME] + (now - since if since else 0)


def _server_status(words: Any, base: int, checked: bool) -> str:
    admin = words[base + SRV_ADMIN]
    if admin == MAINT:
        return "MAINT"
    if words[base + SRV_OP] != UP:
        return "DOWN"
    if admin == DRAIN:
        return "DRAIN"
    return "UP" if checked else "no check"


def rows(master: Master) -> list[dict[str, Any]]:
    """show stat's rows, by column name: per proxy its FRONTEND, servers and BACKEND."""
    shared, keeper, config, rates = master.shared, master.keeper, master.config, master.rates
    words, layout = shared.words, shared.layout
    table = _Rows(master)
    now = int(time.time())
    for name, frontend in config.frontends.items():
        base = layout.frontends[name]
        maxconn = words[base + FE_MAXCONN]
        status = "STOP" if words[base + FE_DISABLED] else "OPEN" if maxconn > 0 else "PAUSED"
        key = ("fe", name)
        counted = table.totals.get(key, [0] * counters.WORDS)
        requests, conns = rates.rate(key, counters.REQ_TOT), rates.rate(key, counters.STOT)
        http = frontend.mode == "http"
        table.add(
            FRONTEND, name, "FRONTEND", 0, key, http,
            scur=_gauges(master, _frontend_gauge(name, 0)), smax=words[base + FE_SMAX],
            slim=maxconn, status=status, mode=frontend.mode, dresp=0,
            econ="", eresp="", wretr="", wredis="", lbtot="", cli_abrt="", srv_abrt="",
            connect="", reuse="", rate_lim=0, wrew=0 if http else "",
            req_rate=requests.rate if http else "", req_rate_max=requests.max if http else "",
            conn_rate=conns.rate, conn_rate_max=conns.max, conn_tot=counted[counters.STOT],
            # HAProxy's ssl_sess counts the sessions made: handshakes that resumed none
            ssl_sess=counted[counters.SSL_CONNS] - counted[counters.SSL_REUSED],
            ssl_reused_sess=counted[counters.SSL_REUSED],
        )
    for name, backend in config.backends.items():
        act = bck = weight = 0
        scur = chkdown = 0
        lastchg = 0
        http = backend.mode == "http"
        for sid, server in enumerate(backend.servers, 1):
            base = layout.servers[(name, server.name)]
            status = _server_status(words, base, server.check)
            usable = status in ("UP", "no check")
            if usable:
                weight += words[base + SRV_WEIGHT]
                if server.backup:
                    bck += 1
                else:
                    act += 1
            conns = shared.total(base + SRV_FIELDS)
            scur += conns
            chkdown += words[base + SRV_CHKDOWN]
            lastchg = max(lastchg, words[base + SRV_LASTCHG])
            check = {}
            if server.check:
                check = {
                    "check_status": CHECK_STATUSES[words[base + SRV_CHECK_STATUS]],
                    "check_code": words[base + SRV_CHECK_CODE] or "",
                    "check_duration": words[base + SRV_CHECK_MS],
                    "chkfail": words[base + SRV_CHKFAIL],
                    "chkdown": words[base + SRV_CHKDOWN],
                    "check_rise": server.rise, "check_fall": server.fall,
                }
            table.add(
                SERVER, name, server.name, sid, ("srv", f"{name}/{server.name}"), http,
                qcur=keeper.queued(name, server.name), qmax=keeper.queued_max(name, server.name),
                scur=conns, smax=words[base + SRV_SMAX],
                slim=words[base + SRV_MAXCONN] or "", status=status, dreq="", ereq="",
                dcon="", intercepted="", dresp=0, wrew=0 if http else "",
                downtime=_downtime(words, base, now),
                weight=words[base + SRV_WEIGHT], uweight=words[base + SRV_WEIGHT],
                act=int(not server.backup),
                bck=int(server.backup), lastchg=now - words[base + SRV_LASTCHG],
                qlimit=server.maxqueue or "", addr=str(server.address),
                cookie=server.cookie or "", mode=backend.mode, **check,
            )
        table.add(
            BACKEND, name, "BACKEND", 0, ("be", name), http,
            qcur=keeper.queued(name), qmax=keeper.queued_max(name), scur=scur,
            status="UP" if act or bck else "DOWN", weight=weight, uweight=weight, act=act,
            bck=bck, chkdown=chkdown, lastchg=now - lastchg, mode=backend.mode,
            algo=backend.balance, dreq=0, ereq="", dcon="", intercepted="", dresp=0,
            wrew=0 if http else "",
        )
    return table.rows


def clear_maxima(master: Master) -> None:
    """`clear counters`: the highest values seen start again from the current ones."""
    shared = master.shared
    words, layout = shared.words, shared.layout
    for base in layout.frontends.values():
        words[base + FE_SMAX] = shared.total(base + FE_FIELDS)
    for base in layout.servers.values():
        words[base + SRV_SMAX] = shared.total(base + SRV_FIELDS)
    master.keeper.qmax.clear()
    master.tally.clear_max(master.shared)
    master.rates.clear_max()


def show_stat(master: Master) -> str:
    """The CSV: a `# ` header, then a line per row."""
    lines = ["# " + ",".join(COLUMNS) + ","]
    for row in rows(master):
        lines.append(",".join(str(row[name]) for name in COLUMNS) + ",")
    return "\n".join(lines) + "\n"


def show_servers_state(master: Master, backend_name: str | None = None) -> str:
    """Version 1 of HAProxy's server-state format."""
    shared, config = master.shared, master.config
    words, layout = shared.words, shared.layout
    iids = _iids(master)
    now = int(time.time())
    lines = [
        "1",
        "# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
        "srv_iweight srv_time_since_last_change srv_check_status srv_check_result "
        "srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id "
        "srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr "
        "srv_agent_addr srv_agent_port",
    ]
    for name, backend in config.backends.items():
        if backend_name is not None and name != backend_name:
            continue
        for sid, server in enumerate(backend.servers, 1):
            base = layout.servers[(name, server.name)]
            op_state = 2 if words[base + SRV_OP] == UP else 0
            admin = {MAINT: 0x01, DRAIN: 0x08}.get(words[base + SRV_ADMIN], 0)
            lines.append(
                f"{iids[name]} {name} {sid} {server.name} {server.address.host} "
                f"{op_state} {admin} {words[base + SRV_WEIGHT]} {server.weight} "
                f"{now - words[base + SRV_LASTCHG]} {words[base + SRV_CHECK_STATUS]} "
                f"{3 if op_state else 1} {server.rise if op_state else 0} "
                f"{6 if server.check else 0} 0 0 0 - {server.address.port} - "
                f"{int(server.ssl)} 0 - - 0"
            )
    return "\n".join(lines) + "\n"
