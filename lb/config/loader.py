"""load()/loads(): YAML text -> validated, defaults-applied Config, plus cross checks."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterator
from typing import Any

from lb.rules import syntax as rules

from .errors import ConfigError
from .fields import Named, Section, attrs, build, inherited, read_section, resolve
from .model import (
    Address,
    Backend,
    Condition,
    Config,
    Frontend,
    Global,
    IncGpc0Rule,
    Sample,
    Server,
    StickTable,
    Timeouts,
    TrackRule,
)
from .schema import BACKEND, FRONTEND, GLOBAL, ROOT, SERVER, TIMEOUT
from .yamltree import Value, compose


def load(path: str) -> Config:
    """Read and validate the configuration file at ``path``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration: {exc.strerror}", path=path) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError("file is not valid UTF-8", path=path, line=line) from None
    return loads(text, path)


def loads(text: str, path: str = "<string>") -> Config:
    """Validate configuration ``text``; ``path`` is only used in error messages."""
    node = compose(text, path)
    if node is None:
        raise ConfigError("the configuration is empty", path=path, line=1)
    root = read_section(Value(node, path), ROOT)

    def sub(key: str) -> Section:
        given = root.get(key)
        return given.value if given is not None and given.value is not None else {}

    global_ = build(GLOBAL, Global, sub("global"))
    defaults = sub("defaults")
    backends = {
        name: _backend(name, item, defaults) for name, item in sub("backends").items()
    }
    maps: dict[str, str] = sub("maps")  # type: ignore[assignment]
    tables = _declared_tables(sub("frontends"), backends)
    frontends = {
        name: _frontend(name, item, defaults, global_, backends, maps, tables)
        for name, item in sub("frontends").items()
    }
    _check_binds(sub("frontends"))
    _check_table_names(sub("frontends"), frontends, backends)
    return Config(path, text, global_, frontends, backends, maps)


def _timeouts(merged: Section) -> Timeouts:
    return build(TIMEOUT, Timeouts, merged)


def _frontend(
    name: str,
    item: Named,
    defaults: Section,
    global_: Global,
    backends: dict[str, Backend],
    maps: dict[str, str],
    tables: dict[str, StickTable],
) -> Frontend:
    values, origin = resolve(FRONTEND, inherited(FRONTEND, defaults), item.section)
    kw = attrs(FRONTEND, values)
    kw["tls"] = tuple(
        tls if tls.alpn is not None else dataclasses.replace(
            tls, alpn=("http/1.1",) if kw["mode"] == "http" else ()
        )
        for _, _, tls in kw["binds"] if tls is not None
    )
    kw["binds"] = tuple(address for address, _, _ in kw["binds"])
    kw["timeouts"] = _timeouts(kw["timeouts"])
    if kw["maxconn"] is None:
        kw["maxconn"] = global_.maxconn
    if kw["mode"] != "http":
        for key in ("stats", "prometheus"):
            if key in item.section:  # set here: a mistake; inherited: not for this one
                at = origin[key]
                raise at.error(f"{key} needs mode http (frontend {name!r} is mode "
                               f"{kw['mode']})", line=at.key_line)
            kw[key] = None
    frontend = Frontend(name=name, line=item.at.key_line, **kw)
    target = frontend.default_backend
    if target is not None:
        _check_backend(frontend, target, backends, origin["default_backend"], None)
    _check_rules(frontend, origin, backends, maps, tables)
    return frontend


def _declared_tables(frontends: dict[str, Named], backends: dict[str, Backend]
                     ) -> dict[str, StickTable]:
    """Every stick table by name (its proxy's), for track-sc and the sc_ and src_ fetches."""
    out = {name: b.stick_table for name, b in backends.items() if b.stick_table is not None}
    for name, item in frontends.items():
        given = item.section.get("stick-table")
        if given is not None and given.value is not None:
            out[name] = given.value
    return out


def _no_such(what: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"no {what} named {name!r}{hint}"


def _check_backend(
    frontend: Frontend, target: str, backends: dict[str, Backend], at: Value, line: int | None
) -> None:
    """``target`` exists and has the frontend's mode (default_backend, use_backend)."""
    backend = backends.get(target)
    if backend is None:
        raise at.error(_no_such("backend", target, list(backends)), line=line)
    if backend.mode != frontend.mode:
        raise at.error(
            f"backend {target!r} is mode {backend.mode} "
            f"but frontend {frontend.name!r} is mode {frontend.mode}",
            line=line,
        )


# Frontend keys that only make sense in mode http (acl and tcp-request connection work in
# both modes).
RULE_KEYS = ("http-request", "use_backend", "monitor-uri", "monitor-fail", "errorfile")


def _check_rules(
    fe: Frontend,
    origin: dict[str, Value],
    backends: dict[str, Backend],
    maps: dict[str, str],
    tables: dict[str, StickTable],
) -> None:
    """HTTP rules need mode http; the ACLs, backends, maps and stick tables they name must
    exist; rules that run before a request is read use no fetch that needs one."""
    http = fe.mode == "http"
    if not http:
        for key in RULE_KEYS:
            if key in origin:
                raise origin[key].error(
                    f"{key} needs mode http (frontend {fe.name!r} is mode {fe.mode})",
                    line=origin[key].key_line,
                )
    if fe.monitor_fail is not None and fe.monitor_uri is None:
        at = origin["monitor-fail"]
        raise at.error("monitor-fail needs monitor-uri", line=at.key_line)
    acls = {acl.name: acl for acl in fe.acl}
    names = list(acls)
    tracked = _tracked_tables(fe)

    def check(at: Value, line: int, samples: Iterator[Sample], cond: Condition | None,
              key: str | None = None, connection: bool = False) -> None:
        """``connection``: a rule that runs before any request is read (tcp-request
        connection, or any rule of a tcp frontend)."""

        def fail(message: str) -> ConfigError:
            dotted = at.dotted if key is None else f"{at.dotted}.{key}"
            return ConfigError(message, path=at.file, line=line, key=dotted)

        for use in rules.condition_uses(cond):
            if use.name is not None and use.name not in names:
                raise fail(_no_such("ACL", use.name, names))
            if use.name is not None and connection:
                for test in acls[use.name].tests:
                    if test.sample.fetch in rules.HTTP_FETCHES:
                        raise fail(f"ACL {use.name!r} uses {rules.fetch_text(test.sample)}, "
                                   "which needs an HTTP request; tcp-request connection rules "
                                   "run before anything is read")
        for sample in samples:
            if connection and sample.fetch in rules.HTTP_FETCHES:
                raise fail(f"{rules.fetch_text(sample)} needs an HTTP request (frontend "
                           f"{fe.name!r} is mode {fe.mode})")
            for kind, name in rules.references(sample):
                if kind == "backend" and name not in backends:
                    raise fail(_no_such("backend", name, list(backends)))
                if kind == "map" and name not in maps:
                    raise fail(_no_such("map", name, list(maps)) + " in the maps section")
                if kind == "table" and name not in tables:
                    raise fail(_no_such("stick table", name, list(tables)))
            problem = _table_sample_problem(sample, fe, tables, tracked)
            if problem is not None:
                raise fail(problem)

    def check_counter_rule(at: Value, rule: Any) -> None:
        problem = _counter_rule_problem(rule, fe, tables, tracked)
        if problem is not None:
            raise ConfigError(problem, path=at.file, line=rule.line, key=at.dotted)

    for acl in fe.acl:
        for test in acl.tests:
            check(origin["acl"], test.line, iter((test.sample,)), None, acl.name,
                  connection=not http)
    for rule in fe.tcp_request_connection:
        at = origin["tcp-request connection"]
        check_counter_rule(at, rule)
        check(at, rule.line, rules.rule_samples(rule), rule.cond, connection=True)
    if not http:
        return
    for rule in fe.http_request:
        check_counter_rule(origin["http-request"], rule)
        check(origin["http-request"], rule.line, rules.rule_samples(rule), rule.cond)
    for use in fe.use_backend:
        at = origin["use_backend"]
        check(at, use.line, rules.rule_samples(use), use.cond)
        if use.dynamic is None:
            _check_backend(fe, use.backend, backends, at, use.line)
        else:
            default = rules.map_default(use.dynamic)
            if default is not None:
                _check_backend(fe, default, backends, at, use.line)
    if fe.monitor_fail is not None:
        at = origin["monitor-fail"]
        anonymous = (u.anonymous.sample for u in rules.condition_uses(fe.monitor_fail)
                     if u.anonymous is not None)
        check(at, at.line, anonymous, fe.monitor_fail)


def _tracked_tables(fe: Frontend) -> dict[int, list[str]]:
    """Stick counter -> the tables the frontend's track-sc rules track it in."""
    out: dict[int, list[str]] = {}
    for rule in (*fe.tcp_request_connection, *fe.http_request):
        if isinstance(rule, TrackRule):
            out.setdefault(rule.sc, []).append(rule.table or fe.name)
    return out


# What each operation of the sc_ and src_ fetches needs stored: one of these.
_NEEDS = {"inc_gpc0": ("gpc0", "gpc0_rate"), "clr_gpc0": ("gpc0",), "tracked": ()}


def _stored_problem(what: str, operation: str, names: list[str],
                    tables: dict[str, StickTable]) -> str | None:
    """None when one of the tables stores what ``operation`` reads or writes."""
    wanted = _NEEDS.get(operation, (operation,))
    known = [name for name in names if name in tables]
    if not wanted or not known:
        return None  # tracked needs nothing; a missing table is reported by its rule
    if any(data in wanted for name in known for data, _ in tables[name].store):
        return None
    which = " or ".join(wanted)
    where = (f"table {known[0]!r} does not" if len(known) == 1
             else f"none of the tables {', '.join(map(repr, known))} does")
    return f"{what}: {where} store {which} (add it to the stick-table's store)"


def _own_table(fe: Frontend) -> str | None:
    return fe.name if fe.stick_table is not None else None


def _table_sample_problem(sample: Sample, fe: Frontend, tables: dict[str, StickTable],
                          tracked: dict[int, list[str]]) -> str | None:
    """What is wrong with an sc_ or src_ fetch in this frontend, if anything."""
    what = rules.fetch_text(sample)
    if sample.fetch == "sc":
        operation, sc, table = sample.args
        names = [table] if table else tracked.get(int(sc), [])
        if not names:
            return (f"{what}: no track-sc{sc} rule in frontend {fe.name!r}, so stick counter "
                    f"{sc} is never tracked")
        return _stored_problem(what, operation, names, tables)
    if sample.fetch == "src_table":
        operation, table = sample.args
        name = table or _own_table(fe)
        if name is None:
            return (f"{what} needs a stick table: frontend {fe.name!r} has no stick-table "
                    f"(declare one, or name a table: {what.split('(')[0]}(NAME))")
        if name in tables and tables[name].type == "integer":
            return (f"{what}: table {name!r} is of type integer, which cannot hold client "
                    "addresses")
        return _stored_problem(what, operation, [name], tables)
    return None


def _counter_rule_problem(rule: Any, fe: Frontend, tables: dict[str, StickTable],
                          tracked: dict[int, list[str]]) -> str | None:
    """What is wrong with a track-scN or sc-inc-gpc0(N) rule, if anything."""
    if isinstance(rule, TrackRule):
        action = f"track-sc{rule.sc}"
        name = rule.table or _own_table(fe)
        if name is None:
            return (f"{action} needs a stick table: frontend {fe.name!r} has no stick-table "
                    f"(declare one, or name a table: {action} "
                    f"{rules.fetch_text(rule.sample)} table NAME)")
        if name not in tables:
            return _no_such("stick table", name, list(tables))
        if rule.sample.fetch == "src" and not rule.sample.converters and \
                tables[name].type == "integer":
            return f"{action} src: table {name!r} is of type integer, which cannot hold addresses"
    elif isinstance(rule, IncGpc0Rule):
        action = f"sc-inc-gpc0({rule.sc})"
        names = tracked.get(rule.sc, [])
        if not names:
            return (f"{action}: no track-sc{rule.sc} rule in frontend {fe.name!r}, so stick "
                    f"counter {rule.sc} is never tracked")
        return _stored_problem(action, "inc_gpc0", names, tables)
    return None


def _backend(name: str, item: Named, defaults: Section) -> Backend:
    values, origin = resolve(BACKEND, inherited(BACKEND, defaults), item.section)
    kw = attrs(BACKEND, values)
    kw["balance"], kw["balance_arg"] = kw["balance"]
    kw["timeouts"] = _timeouts(kw["timeouts"])
    default_server: Section = values["default-server"]
    servers: dict[str, Named] = values["servers"]
    kw["servers"] = tuple(
        Server(name=server, **attrs(SERVER, resolve(SERVER, default_server, s.section)[0]))
        for server, s in servers.items()
    )
    if kw["mode"] == "tcp":
        if kw["balance"] in ("uri", "hdr"):
            raise origin["balance"].error(
                f"balance {values['balance'][0]} needs mode http (backend {name!r} is mode tcp)"
            )
        if kw["cookie"] is not None:
            raise origin["cookie"].error(f"cookie needs mode http (backend {name!r} is mode tcp)")
    _check_stick(name, kw, origin)
    return Backend(name=name, line=item.at.key_line, **kw)


def _check_stick(name: str, kw: dict[str, Any], origin: dict[str, Value]) -> None:
    """stick-on needs a table to store in, HTTP for cookies and headers, and a string
    table for values that are not addresses."""
    on: tuple[str, str | None] | None = kw["stick_on"]
    if on is None:
        return
    at = origin["stick-on"]
    written = at.text
    table = kw["stick_table"]
    if table is None:
        raise at.error(f"stick-on needs a stick-table (backend {name!r} has none)")
    if on[0] == "src":
        if table.type == "integer":
            raise at.error(f"stick-on src needs a stick-table of type ip, ipv6 or string "
                           f"(backend {name!r} has type integer)")
        return
    if kw["mode"] != "http":
        raise at.error(f"stick-on {written} needs mode http (backend {name!r} is mode tcp)")
    if table.type != "string":
        raise at.error(
            f"stick-on {written} needs a stick-table of type string "
            f"(backend {name!r} has type {table.type})"
        )


def _check_table_names(
    items: dict[str, Named], frontends: dict[str, Frontend], backends: dict[str, Backend]
) -> None:
    """A stick table is named after its proxy: a frontend and a backend of the same name
    cannot both declare one."""
    for name, frontend in frontends.items():
        backend = backends.get(name)
        if frontend.stick_table is not None and backend is not None and backend.stick_table:
            at = items[name].section["stick-table"].at
            raise at.error(f"backend {name!r} already has a stick table named {name!r}; "
                           "tables are named after their proxy")


def _check_binds(frontends: dict[str, Named]) -> None:
    """The same HOST:PORT may be bound once in the whole file (*:80 is 0.0.0.0:80)."""
    seen: dict[Address, tuple[str, int]] = {}
    for name, item in frontends.items():
        given = item.section["bind"]
        for address, line, _tls in given.value:
            if address in seen:
                other, other_line = seen[address]
                raise given.at.error(
                    f"{address} is already bound by frontends.{other} (line {other_line})",
                    line=line,
                )
            seen[address] = (name, line)
