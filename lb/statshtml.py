"""The HTML of the stats page (`stats uri`), rendered from `show info` and `show stat` data.

Pure functions from dictionaries to one self-contained page: inline CSS, no script, no
external resource, so that it works under the strict Content-Security-Policy lb.statspage
sends. Everything that comes from the data (proxy and server names, statuses, addresses,
check results) goes through html.escape: names are operator-controlled, but still data.

Stable hooks for tests and scripts (documented in lb/statspage.py too):

* ``table#proxy-<name>``: one table per proxy (frontend, listeners, servers, backend row);
* ``tr#frontend-<name>``, ``tr#backend-<name>``, ``tr#server-<backend>-<server>`` (the
  server row also carries ``data-backend`` and ``data-server``, unambiguous when names
  contain dashes);
* ``td.status``: the status cell, with one ``st-*`` class (STATUS_CLASSES); the row has
  it too; every other cell has ``c-<csv column>`` (``td.c-scur``, ``td.c-lastchg``...);
* with admin on, per server row: ``form.admin-form`` holding buttons
  ``button[name=action][value=ready|drain|maint]``;
* ``#notice`` (class ``notice st-<CODE>``) after an admin action; ``#info`` the process
  header; ``a#refresh-toggle``, ``a#csv-link``.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence

Row = Mapping[str, object]

# Colour of each state, as HAProxy's page has them; the class is on the status cell and
# on its row. "going down" is UP with failed checks (e.g. "UP 1/3"), "going up" the reverse.
STATUS_CLASSES = {
    "st-up": ("#c6efc6", "UP"),
    "st-going-down": ("#ffd28a", "UP, going down"),
    "st-down": ("#f2a8a8", "DOWN"),
    "st-going-up": ("#fff19a", "DOWN, going up"),
    "st-drain": ("#a9cff5", "DRAIN: no new sessions"),
    "st-maint": ("#c9b79c", "MAINT: maintenance, no traffic"),
    "st-nocheck": ("#ececec", "no check"),
    "st-open": ("#c6efc6", "frontend OPEN"),
    "st-stop": ("#f2a8a8", "frontend STOP"),
    "st-paused": ("#c9b79c", "frontend PAUSED"),
    "st-unknown": ("#ffffff", "other"),
}

# Messages for HAProxy's `;st=` codes, shown after an admin action (unknown codes: none).
NOTICES = {
    "DONE": "Action processed successfully.",
    "NONE": "Nothing has changed.",
    "PART": "Action partially processed: some servers refused it (unknown or ambiguous "
            "names?).",
    "ERRP": "Action not processed: invalid parameters (unknown backend, server or action).",
    "EXCD": "Action not processed: the request was too large. Change fewer servers at a "
            "time.",
    "DENY": "Action denied.",
    "IVAL": "Invalid request.",
    "UNKN": "Unexpected result.",
}

ACTIONS = ("ready", "drain", "maint")


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def status_class(status: str) -> str:
    """The st-* class of a `status` column value (UP, DOWN 1/2, DRAIN, no check...)."""
    text = status.strip().upper()
    if text == "NO CHECK":
        return "st-nocheck"
    word = text.split(" ", 1)[0]
    if word in ("UP", "DOWN") and "/" in text:  # a check changing its mind
        return "st-going-down" if word == "UP" else "st-going-up"
    return {
        "UP": "st-up", "DOWN": "st-down", "NOLB": "st-drain", "DRAIN": "st-drain",
        "MAINT": "st-maint", "OPEN": "st-open", "STOP": "st-stop", "PAUSED": "st-paused",
    }.get(word, "st-unknown")


def human_time(seconds: int | None) -> str:
    """HAProxy's short durations: 3s, 1m2s, 1h2m, 2d3h."""
    if seconds is None or seconds < 0:
        return ""
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def number(row: Row, key: str) -> int | None:
    """A numeric column (int from the master, str from a parsed CSV), None when empty."""
    value = row.get(key)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        return int(str(value))
    except ValueError:
        return None


def kind_of(row: Row) -> str:
    name = str(row.get("svname", ""))
    if name == "FRONTEND":
        return "frontend"
    if name == "BACKEND":
        return "backend"
    return "listener" if number(row, "type") == 3 else "server"


# --- cells --------------------------------------------------------------------------------

def _duration(key: str) -> Callable[[Row], str]:
    return lambda row: esc(human_time(number(row, key)))


def _last_check(row: Row) -> str:
    status = str(row.get("check_status") or "")
    if not status or kind_of(row) != "server":
        return ""
    code, took = row.get("check_code"), number(row, "check_duration")
    text = f"{status}/{code}" if code not in (None, "") else status
    return esc(f"{text} in {took}ms" if took is not None else text)


def _yes_count(key: str) -> Callable[[Row], str]:
    """Servers show Y or -, backends how many servers are active/backup."""
    def cell(row: Row) -> str:
        value = number(row, key)
        if kind_of(row) == "server" and value is not None:
            return "Y" if value else "-"
        return esc(row.get(key, ""))
    return cell


def _total(row: Row) -> str:
    total = esc(row.get("stot", ""))
    codes = [(c, row.get(f"hrsp_{c}")) for c in ("1xx", "2xx", "3xx", "4xx", "5xx", "other")]
    if all(value in (None, "") for _, value in codes):
        return total
    # HTTP responses as a tooltip, as HAProxy's page does
    title = "HTTP responses: " + ", ".join(f"{c} {esc(v)}" for c, v in codes if v != "")
    return f'<span title="{title}">{total}</span>'


# (group, ((label, csv column), ...)), as HAProxy's page has them; a cell shows its column
# as is unless CELLS formats it
GROUPS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("Queue", (("Cur", "qcur"), ("Max", "qmax"), ("Limit", "qlimit"))),
    ("Session rate", (("Cur", "rate"), ("Max", "rate_max"), ("Limit", "rate_lim"))),
    ("Sessions", (("Cur", "scur"), ("Max", "smax"), ("Limit", "slim"), ("Total", "stot"),
                  ("LbTot", "lbtot"), ("Last", "lastsess"))),
    ("Bytes", (("In", "bin"), ("Out", "bout"))),
    ("Denied", (("Req", "dreq"), ("Resp", "dresp"))),
    ("Errors", (("Req", "ereq"), ("Conn", "econ"), ("Resp", "eresp"))),
    ("Warnings", (("Retr", "wretr"), ("Redis", "wredis"))),
    ("Server", (("Status", "status"), ("LastChg", "lastchg"), ("LastChk", "check_status"),
                ("Wght", "weight"), ("Act", "act"), ("Bck", "bck"), ("Chk", "chkfail"),
                ("Dwn", "chkdown"), ("Dwntme", "downtime"), ("Thrtle", "throttle"))),
)
CELLS: dict[str, Callable[[Row], str]] = {
    "stot": _total,
    "lastsess": _duration("lastsess"),
    "lastchg": _duration("lastchg"),
    "downtime": _duration("downtime"),
    "check_status": _last_check,
    "act": _yes_count("act"),
    "bck": _yes_count("bck"),
}


def _cell(row: Row, key: str) -> str:
    cell = CELLS.get(key)
    return cell(row) if cell is not None else esc(row.get(key, ""))


# --- page parts ---------------------------------------------------------------------------

CSS = """
body{font-family:Arial,Helvetica,sans-serif;font-size:12px;margin:8px;color:#000;background:#fff}
h1{font-size:18px;margin:0 0 4px}h2{font-size:14px;margin:14px 0 2px}
a{color:#225}.version{color:#555}
dl#info{display:grid;grid-template-columns:max-content auto;gap:1px 10px;margin:6px 0}
dl#info dt{font-weight:bold}dl#info dd{margin:0}
table{border-collapse:collapse;margin-bottom:6px}
th,td{border:1px solid #999;padding:1px 4px;text-align:right;white-space:nowrap}
th{background:#20435c;color:#fff;font-weight:normal}
td.name,th.name{text-align:left}td.status{font-weight:bold;text-align:center}
tr.frontend td,tr.backend td{font-weight:bold}tr.backend td{border-top:2px solid #555}
.notice{padding:6px;margin:6px 0;border:1px solid #777;font-weight:bold}
.notice.st-DONE,.notice.st-NONE{background:#c6efc6}.notice{background:#f2a8a8}
form.admin-form{display:inline;margin:0}button{font-size:11px;padding:0 4px}
table.legend td{text-align:left}
"""


def _css() -> str:
    colours = "".join(f".{name}{{background:{colour}}}"
                      for name, (colour, _) in STATUS_CLASSES.items())
    return CSS + colours + "\n"


def _info_items(info: Mapping[str, object]) -> list[tuple[str, str, str]]:
    """(id, label, value) of the header lines; fields missing from `info` are skipped."""
    def get(key: str) -> str:
        value = info.get(key)
        return "" if value is None else str(value)

    items = [
        ("pid", "pid", get("Pid")),
        ("uptime", "uptime", get("Uptime")),
        ("generation", "generation", get("Generation") or get("generation")),
        ("workers", "workers", get("Workers")),
        ("stopping", "stopping", "yes" if get("Stopping") not in ("", "0") else ""),
        ("limits", "system limits",
         f"ulimit-n = {get('Ulimit-n')}; maxsock = {get('Maxsock')}; "
         f"maxconn = {get('Maxconn')} (hard {get('Hard_maxconn')})"
         if get("Maxconn") else ""),
        ("conns", "current conns",
         f"{get('CurrConns')} (total {get('CumConns')}, requests {get('CumReq')})"
         if get("CurrConns") else ""),
        ("ssl", "SSL conns",
         f"{get('CurrSslConns')} (total {get('CumSslConns')})" if get("CurrSslConns") else ""),
        ("rates", "rates",
         f"conn {get('ConnRate')}/s (max {get('MaxConnRate')}); "
         f"sess {get('SessRate')}/s (max {get('MaxSessRate')}); SSL {get('SslRate')}/s"
         if get("ConnRate") else ""),
        ("tasks", "running tasks", f"{get('Tasks')} (run queue {get('Run_queue')})"
         if get("Tasks") else ""),
        ("idle", "idle", f"{get('Idle_pct')} %" if get("Idle_pct") else ""),
    ]
    return [item for item in items if item[2]]


def _header(info: Mapping[str, object]) -> str:
    node, name = info.get("node") or "", info.get("Name") or "pylb"
    version = f"{esc(name)} version {esc(info.get('Version', ''))}"
    if info.get("Release_date"):
        version += f", released {esc(info['Release_date'])}"
    lines = "".join(f'<dt>{esc(label)}</dt><dd id="info-{key}">{esc(value)}</dd>'
                    for key, label, value in _info_items(info))
    return (f"<h1>Statistics report for pid {esc(info.get('Pid', ''))}"
            f"{' on ' + esc(node) if node else ''}</h1>\n"
            f'<p class="version">{version}</p>\n<dl id="info">{lines}</dl>\n')


def _links(uri: str, refresh: float | None, norefresh: bool) -> str:
    links = [f'<a id="refresh-link" href="{esc(uri + (";norefresh" if norefresh else ""))}">'
             "Refresh now</a>"]
    if refresh is not None:
        target, label = (uri, "Enable refresh") if norefresh else (
            uri + ";norefresh", "Disable refresh")
        links.append(f'<a id="refresh-toggle" href="{esc(target)}">{label}</a>')
    links.append(f'<a id="csv-link" href="{esc(uri + ";csv")}">CSV export</a>')
    return "<p>" + " | ".join(links) + "</p>\n"


def _legend() -> str:
    cells = "".join(f'<td class="{name}">{esc(label)}</td>'
                    for name, (_, label) in STATUS_CLASSES.items() if name != "st-unknown")
    return f'<table class="legend"><tr><th>Legend</th>{cells}</tr></table>\n'


def _notice(code: str | None) -> str:
    if code not in NOTICES:
        return ""
    return f'<div id="notice" class="notice st-{esc(code)}">{esc(NOTICES[code])}</div>\n'


def _admin_form(row: Row, action: str, csrf: str) -> str:
    backend, server = esc(row.get("pxname", "")), esc(row.get("svname", ""))
    buttons = "".join(
        f'<button type="submit" name="action" value="{name}" class="action-{name}" '
        f'title="set server {backend}/{server} state {name}">{name}</button>'
        for name in ACTIONS)
    return (f'<form method="post" action="{esc(action)}" class="admin-form">'
            f'<input type="hidden" name="b" value="{backend}">'
            f'<input type="hidden" name="s" value="{server}">'
            f'<input type="hidden" name="csrf" value="{esc(csrf)}">{buttons}</form>')


def _row(row: Row, form_action: str, csrf: str | None) -> str:
    kind, proxy, name = kind_of(row), str(row.get("pxname", "")), str(row.get("svname", ""))
    state = status_class(str(row.get("status") or ""))
    if kind == "server":
        attrs = (f' id="server-{esc(proxy)}-{esc(name)}" data-backend="{esc(proxy)}"'
                 f' data-server="{esc(name)}"')
    elif kind in ("frontend", "backend"):
        attrs = f' id="{kind}-{esc(proxy)}"'
    else:
        attrs = ""
    title = row.get("addr") or row.get("algo") or ""  # HAProxy's legends, as a tooltip
    title_attr = f' title="{esc(title)}"' if title else ""
    cells = [f'<td class="name"{title_attr}>{esc(name)}</td>']
    for _, columns in GROUPS:
        for _, key in columns:
            css = f"status {state}" if key == "status" else f"c-{key}"
            cells.append(f'<td class="{css}">{_cell(row, key)}</td>')
    if csrf is not None:
        form = _admin_form(row, form_action, csrf) if kind == "server" else ""
        cells.append(f'<td class="admin">{form}</td>')
    return f'<tr class="{kind} {state}"{attrs}>{"".join(cells)}</tr>\n'


def _table(proxy: str, rows: Sequence[Row], form_action: str, csrf: str | None) -> str:
    groups = "".join(f'<th colspan="{len(columns)}">{label}</th>' for label, columns in GROUPS)
    labels = "".join(f"<th>{label}</th>" for _, columns in GROUPS for label, _ in columns)
    admin = '<th rowspan="2">Admin</th>' if csrf is not None else ""
    order = {"frontend": 0, "listener": 1, "server": 2, "backend": 3}
    body = "".join(_row(row, form_action, csrf)
                   for row in sorted(rows, key=lambda r: order[kind_of(r)]))  # stable sort
    return (f'<h2>{esc(proxy)}</h2>\n<table class="proxy" id="proxy-{esc(proxy)}">\n'
            f'<tr><th class="name" rowspan="2">Name</th>{groups}{admin}</tr>\n'
            f"<tr>{labels}</tr>\n{body}</table>\n")


def render_page(info: Mapping[str, object], rows: Sequence[Row], *, uri: str,
                refresh: float | None, norefresh: bool, notice: str | None,
                csrf: str | None) -> str:
    """The whole page. `refresh` is the configured delay (None: none), `norefresh` the
    visitor's `;norefresh`; `notice` a `;st=` code; `csrf` the token to put in the admin
    forms, None when admin is off (no admin column then)."""
    by_proxy: dict[str, list[Row]] = {}
    for row in rows:
        by_proxy.setdefault(str(row.get("pxname", "")), []).append(row)
    form_action = uri + (";norefresh" if norefresh else "")  # the redirect keeps it
    meta = ""
    if refresh is not None and not norefresh:
        # to the bare uri: a reload must not show an old `;st=` notice again
        meta = f'<meta http-equiv="refresh" content="{max(1, round(refresh))}; url={esc(uri)}">\n'
    tables = "".join(_table(proxy, proxy_rows, form_action, csrf)
                     for proxy, proxy_rows in by_proxy.items())
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        f"{meta}<title>Statistics report for {esc(info.get('Name') or 'pylb')}</title>\n"
        f"<style>{_css()}</style></head>\n<body>\n"
        f"{_header(info)}{_notice(notice)}{_links(uri, refresh, norefresh)}{_legend()}"
        f"{tables}</body></html>\n"
    )
