"""load()/loads(): YAML text -> validated, defaults-applied Config, plus cross checks."""

from __future__ import annotations

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
    Sample,
    Server,
    Timeouts,
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
    frontends = {
        name: _frontend(name, item, defaults, global_, backends, maps)
        for name, item in sub("frontends").items()
    }
    _check_binds(sub("frontends"))
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
) -> Frontend:
    values, origin = resolve(FRONTEND, inherited(FRONTEND, defaults), item.section)
    kw = attrs(FRONTEND, values)
    kw["binds"] = tuple(address for address, _ in kw["binds"])
    kw["timeouts"] = _timeouts(kw["timeouts"])
    if kw["maxconn"] is None:
        kw["maxconn"] = global_.maxconn
    frontend = Frontend(name=name, line=item.at.key_line, **kw)
    target = frontend.default_backend
    if target is not None:
        _check_backend(frontend, target, backends, origin["default_backend"], None)
    _check_rules(frontend, origin, backends, maps)
    return frontend


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


# Frontend keys that only make sense in mode http.
RULE_KEYS = ("acl", "http-request", "use_backend", "monitor-uri", "monitor-fail", "errorfile")


def _check_rules(
    fe: Frontend, origin: dict[str, Value], backends: dict[str, Backend], maps: dict[str, str]
) -> None:
    """HTTP rules need mode http; the ACLs, backends and maps they name must exist."""
    if fe.mode != "http":
        for key in RULE_KEYS:
            if key in origin:
                raise origin[key].error(
                    f"{key} needs mode http (frontend {fe.name!r} is mode {fe.mode})",
                    line=origin[key].key_line,
                )
        return
    if fe.monitor_fail is not None and fe.monitor_uri is None:
        at = origin["monitor-fail"]
        raise at.error("monitor-fail needs monitor-uri", line=at.key_line)
    names = [acl.name for acl in fe.acl]

    def check(at: Value, line: int, samples: Iterator[Sample], cond: Condition | None,
              key: str | None = None) -> None:
        def fail(message: str) -> ConfigError:
            dotted = at.dotted if key is None else f"{at.dotted}.{key}"
            return ConfigError(message, path=at.file, line=line, key=dotted)

        for use in rules.condition_uses(cond):
            if use.name is not None and use.name not in names:
                raise fail(_no_such("ACL", use.name, names))
        for sample in samples:
            for kind, name in rules.references(sample):
                if kind == "backend" and name not in backends:
                    raise fail(_no_such("backend", name, list(backends)))
                if kind == "map" and name not in maps:
                    raise fail(_no_such("map", name, list(maps)) + " in the maps section")

    for acl in fe.acl:
        for test in acl.tests:
            check(origin["acl"], test.line, iter((test.sample,)), None, acl.name)
    for rule in fe.http_request:
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
        return
    if kw["mode"] != "http":
        raise at.error(f"stick-on {written} needs mode http (backend {name!r} is mode tcp)")
    if table.type != "string":
        raise at.error(
            f"stick-on {written} needs a stick-table of type string "
            f"(backend {name!r} has type {table.type})"
        )


def _check_binds(frontends: dict[str, Named]) -> None:
    """The same HOST:PORT may be bound once in the whole file (*:80 is 0.0.0.0:80)."""
    seen: dict[Address, tuple[str, int]] = {}
    for name, item in frontends.items():
        given = item.section["bind"]
        for address, line in given.value:
            if address in seen:
                other, other_line = seen[address]
                raise given.at.error(
                    f"{address} is already bound by frontends.{other} (line {other_line})",
                    line=line,
                )
            seen[address] = (name, line)
