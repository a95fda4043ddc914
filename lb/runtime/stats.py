"""`show info`, `show stat` and `show servers state`, in HAProxy's formats.

Current values (sessions, states, weights, limits, queues) come from the master's own
view: shared memory and the queue keeper. Cumulated counters come from every worker,
added up (lb.counters). Tools written for HAProxy read these answers unchanged: hatop
needs at least 51 fields per `show stat` row, the Prometheus exporter 33.
"""

from __future__ import annotations

import os
import platform
import time
from typing import TYPE_CHECKING, Any

import lb
from lb import counters
from lb.shared import (
    CHECK_STATUSES,
    DRAIN,
    FE_DISABLED,
    FE_FIELDS,
    FE_MAXCONN,
    GLOBAL_FIELDS,
    GLOBAL_MAXCONN,
    MAINT,
    SRV_ADMIN,
    SRV_CHECK_CODE,
    SRV_CHECK_MS,
    SRV_CHECK_STATUS,
    SRV_CHKDOWN,
    SRV_CHKFAIL,
    SRV_FIELDS,
    SRV_LASTCHG,
    SRV_MAXCONN,
    SRV_OP,
    SRV_WEIGHT,
    UP,
)

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


TLS_FIELDS = ("cur", "cum", "reused", "rate", "keys")  # lb.tls.counters.TlsCounters.snapshot


def add_tls(total: dict[str, dict[str, int]], answer: dict[str, dict[str, int]]) -> None:
    """Add one worker's TLS counters (per frontend) into a running total."""
    for name, values in answer.items():
        into = total.setdefault(name, dict.fromkeys(TLS_FIELDS, 0))
        for key in TLS_FIELDS:
            into[key] += values.get(key, 0)


def _tls_info(totals: dict[str, dict[str, dict[str, int]]]) -> dict[str, int]:
    """show info's TLS fields, from every worker's client connections over TLS. The rates
    are HAProxy's: over the last second, from the number of each second and the one
    before, and the reuse percentage is 100 - 100 * new keys / connections over it."""
    tls = dict.fromkeys(TLS_FIELDS, 0)
    for values in totals.get("ssl", {}).values():
        for key in TLS_FIELDS:
            tls[key] += values[key]
    rate, keys = tls["rate"] / 1000, tls["keys"] / 1000
    return {
        "CurrSslConns": tls["cur"],
        "CumSslConns": tls["cum"],
        "SslRate": int(rate),
        "SslRateLimit": 0,
        "SslFrontendKeyRate": int(keys),
        "SslFrontendSessionReuse_pct": int(100.0 * (1.0 - keys / rate)) if keys < rate else 0,
    }


def show_info(master: Master, totals: dict[str, dict[str, dict[str, int]]]) -> str:
    """`Name: value` lines; every field hatop insists on is there."""
    words = master.shared.words
    uptime = int(time.time() - master.started)
    fe_totals = totals["fe"].values()
    tls = _tls_info(totals)
    lines = {
        "Name": "pylb",
        "Version": lb.__version__,
        "Release_date": lb.RELEASE_DATE,
        "Nbthread": 1,
        "Nbproc": 1,
        "Process_num": 1,
        "Pid": os.getpid(),
        "Uptime": _uptime(uptime),
        "Uptime_sec": uptime,
        "Memmax_MB": 0,
        "PoolAlloc_MB": 0,
        "PoolUsed_MB": 0,
        "PoolFailed": 0,
        "Ulimit-n": os.sysconf("SC_OPEN_MAX"),
        "Maxsock": os.sysconf("SC_OPEN_MAX"),
        "Maxconn": words[GLOBAL_MAXCONN],
        "Hard_maxconn": master.config.global_.maxconn,
        "CurrConns": master.shared.total(GLOBAL_FIELDS),
        "CumConns": sum(t["stot"] for t in fe_totals),
        "CumReq": sum(t["req_tot"] for t in fe_totals),
        "MaxSslConns": 0,  # no limit
        "CurrSslConns": tls["CurrSslConns"],
        "CumSslConns": tls["CumSslConns"],
        "Maxpipes": 0,
        "PipesUsed": 0,
        "PipesFree": 0,
        "ConnRate": 0,
        "ConnRateLimit": 0,
        "MaxConnRate": 0,
        "SessRate": 0,
        "SessRateLimit": 0,
        "MaxSessRate": 0,
        "SslRate": tls["SslRate"],
        "SslRateLimit": tls["SslRateLimit"],
        "SslFrontendKeyRate": tls["SslFrontendKeyRate"],
        "SslFrontendSessionReuse_pct": tls["SslFrontendSessionReuse_pct"],
        "Tasks": len(master.workers),
        "Run_queue": 0,
        "Idle_pct": 100,
        "node": platform.node() or "pylb",
        "Workers": len(master.workers),
        "Stopping": int(master.stopping),
    }
    return "".join(f"{key}: {value}\n" for key, value in lines.items())


class _Rows:
    def __init__(self, master: Master, totals: dict[str, dict[str, dict[str, int]]]) -> None:
        self.master = master
        self.totals = totals
        self.pid = os.getpid()
        names = [*master.config.frontends, *master.config.backends]
        self.iids = {name: index for index, name in enumerate(dict.fromkeys(names), 1)}
        self.rows: list[dict[str, Any]] = []

    def add(self, kind: int, pxname: str, svname: str, sid: int, totals: dict[str, int],
            **values: Any) -> None:
        row = {name: "" for name in COLUMNS}
        row["-"] = "-"  # HAProxy's mark between its own columns and its modules'
        row.update(totals)
        row.update(pxname=pxname, svname=svname, type=kind, pid=1, iid=self.iids[pxname],
                   sid=sid, **values)
        self.rows.append(row)


def _server_status(words: Any, base: int, checked: bool) -> str:
    admin = words[base + SRV_ADMIN]
    if admin == MAINT:
        return "MAINT"
    if words[base + SRV_OP] != UP:
        return "DOWN"
    if admin == DRAIN:
        return "DRAIN"
    return "UP" if checked else "no check"


def show_stat(master: Master, totals: dict[str, dict[str, dict[str, int]]]) -> str:
    """The CSV: a `# ` header, then per proxy its FRONTEND, servers and BACKEND rows."""
    shared, keeper, config = master.shared, master.keeper, master.config
    words, layout = shared.words, shared.layout
    rows = _Rows(master, totals)
    now = int(time.time())
    for name, frontend in config.frontends.items():
        base = layout.frontends[name]
        maxconn = words[base + FE_MAXCONN]
        status = "STOP" if words[base + FE_DISABLED] else "OPEN" if maxconn > 0 else "PAUSED"
        tls = totals.get("ssl", {}).get(name, {})
        rows.add(FRONTEND, name, "FRONTEND", 0, totals["fe"].get(name, counters.zero()),
                 scur=shared.total(base + FE_FIELDS), slim=maxconn, status=status,
                 mode=frontend.mode, dresp=0, econ="", eresp="", wretr="", wredis="",
                 # HAProxy's ssl_sess counts the sessions made: handshakes that resumed none
                 ssl_sess=tls.get("cum", 0) - tls.get("reused", 0),
                 ssl_reused_sess=tls.get("reused", 0))
    for name, backend in config.backends.items():
        act = bck = weight = 0
        scur = chkdown = 0
        lastchg = 0
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
            rows.add(
                SERVER, name, server.name, sid,
                totals["srv"].get(f"{name}/{server.name}", counters.zero()),
                qcur=keeper.queued(name, server.name), scur=conns,
                slim=words[base + SRV_MAXCONN] or "", status=status,
                weight=words[base + SRV_WEIGHT], act=int(not server.backup),
                bck=int(server.backup), lastchg=now - words[base + SRV_LASTCHG],
                qlimit=server.maxqueue or "", addr=str(server.address),
                cookie=server.cookie or "", mode=backend.mode, **check,
            )
        rows.add(
            BACKEND, name, "BACKEND", 0, totals["be"].get(name, counters.zero()),
            qcur=keeper.queued(name), scur=scur, status="UP" if act or bck else "DOWN",
            weight=weight, act=act, bck=bck, chkdown=chkdown, lastchg=now - lastchg,
            mode=backend.mode, algo=backend.balance, dreq=0, ereq="",
        )
    lines = ["# " + ",".join(COLUMNS) + ","]
    for row in rows.rows:
        lines.append(",".join(str(row[name]) for name in COLUMNS) + ",")
    return "\n".join(lines) + "\n"


def show_servers_state(master: Master, backend_name: str | None = None) -> str:
    """Version 1 of HAProxy's server-state format."""
    shared, config = master.shared, master.config
    words, layout = shared.words, shared.layout
    rows = _Rows(master, {})
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
                f"{rows.iids[name]} {name} {sid} {server.name} {server.address.host} "
                f"{op_state} {admin} {words[base + SRV_WEIGHT]} {server.weight} "
                f"{now - words[base + SRV_LASTCHG]} {words[base + SRV_CHECK_STATUS]} "
                f"{3 if op_state else 1} {server.rise if op_state else 0} "
                f"{6 if server.check else 0} 0 0 0 - {server.address.port} - "
                f"{int(server.ssl)} 0 - - 0"
            )
    return "\n".join(lines) + "\n"
