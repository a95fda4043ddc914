"""load()/loads(): YAML text -> validated, defaults-applied Config, plus cross checks."""

from __future__ import annotations

import difflib
from typing import Any

from .errors import ConfigError
from .fields import Named, Section, attrs, build, inherited, read_section, resolve
from .model import Address, Backend, Config, Frontend, Global, Server, Timeouts
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
    frontends = {
        name: _frontend(name, item, defaults, global_, backends)
        for name, item in sub("frontends").items()
    }
    _check_binds(sub("frontends"))
    return Config(path, text, global_, frontends, backends)


def _timeouts(merged: Section) -> Timeouts:
    return build(TIMEOUT, Timeouts, merged)


def _frontend(
    name: str, item: Named, defaults: Section, global_: Global, backends: dict[str, Backend]
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
        at = origin["default_backend"]
        backend = backends.get(target)
        if backend is None:
            close = difflib.get_close_matches(target, list(backends), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise at.error(f"no backend named {target!r}{hint}")
        if backend.mode != frontend.mode:
            raise at.error(
                f"backend {target!r} is mode {backend.mode} "
                f"but frontend {name!r} is mode {frontend.mode}"
            )
    return frontend


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
