"""What a reload carries from one generation to the next: listening sockets and state.

A reload re-reads the configuration and starts a new generation of workers. The listening
sockets of binds that remain are the very same sockets (their kernel backlog with them);
new binds are bound now; binds that are gone are closed once the old generation has let go.
Runtime state moves by name: a server or frontend present in both configurations keeps
what the operator and the health checks made of it.
"""

from __future__ import annotations

from lb import config, sock
from lb.shared import (
    BE_HOLD,
    FE_DISABLED,
    FE_MAXCONN,
    FE_SMAX,
    GLOBAL_MAXCONN,
    SRV_ADMIN,
    SRV_CHECK_CODE,
    SRV_CHECK_MS,
    SRV_CHECK_STATUS,
    SRV_CHKDOWN,
    SRV_CHKFAIL,
    SRV_DOWNSINCE,
    SRV_DOWNTIME,
    SRV_LASTCHG,
    SRV_MAXCONN,
    SRV_OP,
    SRV_SMAX,
    SRV_WEIGHT,
    Shared,
)
from lb.sock import Listener

# Carried as they are: what checks and operators decided.
_SERVER_STATE = (
    SRV_OP, SRV_ADMIN, SRV_LASTCHG, SRV_CHKFAIL, SRV_CHKDOWN, SRV_CHECK_STATUS,
    SRV_CHECK_CODE, SRV_CHECK_MS, SRV_SMAX, SRV_DOWNTIME, SRV_DOWNSINCE,
)


def listeners_for(
    cfg: config.Config, current: list[Listener]
) -> tuple[list[Listener], list[Listener]]:
    """The listeners of `cfg`, reusing current sockets for the binds that remain, and the
    current listeners that are no longer needed. Raises OSError (new binds closed) when a
    new address cannot be bound."""
    by_address = {(lst.address): lst for lst in current}
    wanted: list[Listener] = []
    fresh: list[Listener] = []
    try:
        for frontend in cfg.frontends.values():
            for address in frontend.binds:
                found = by_address.pop(str(address), None)
                if found is not None:
                    wanted.append(Listener(frontend.name, found.address, found.sock))
                    continue
                try:
                    listening = sock.bind(address, frontend.backlog)
                except OSError as err:
                    raise OSError(
                        f"cannot bind frontend {frontend.name} to {address}: {err.strerror}"
                    ) from err
                listener = Listener(frontend.name, str(address), listening)
                fresh.append(listener)
                wanted.append(listener)
    except OSError:
        for listener in fresh:
            listener.sock.close()
        raise
    return wanted, list(by_address.values())


def _runtime(old_value: int, old_configured: int, new_configured: int) -> int:
    """A value changed at run time stays; one the operator left alone follows the config."""
    return old_value if old_value != old_configured else new_configured


def carry_state(
    old: Shared, old_cfg: config.Config, new: Shared, new_cfg: config.Config
) -> None:
    """Copy runtime state from the old generation's memory into the new one, by name."""
    src, dst = old.words, new.words
    dst[GLOBAL_MAXCONN] = _runtime(
        src[GLOBAL_MAXCONN], old_cfg.global_.maxconn, new_cfg.global_.maxconn
    )
    for name, frontend in new_cfg.frontends.items():
        before = old_cfg.frontends.get(name)
        if before is None:
            continue
        old_base, new_base = old.layout.frontends[name], new.layout.frontends[name]
        dst[new_base + FE_MAXCONN] = _runtime(
            src[old_base + FE_MAXCONN], before.maxconn, frontend.maxconn
        )
        dst[new_base + FE_DISABLED] = src[old_base + FE_DISABLED]
        dst[new_base + FE_SMAX] = src[old_base + FE_SMAX]
    for name, backend in new_cfg.backends.items():
        previous = old_cfg.backends.get(name)
        if previous is not None:
            dst[new.layout.backends[name] + BE_HOLD] = _runtime(
                src[old.layout.backends[name] + BE_HOLD], previous.hold_when_down,
                backend.hold_when_down,
            )
    for (backend, server), new_base in new.layout.servers.items():
        old_base = old.layout.servers.get((backend, server))
        if old_base is None:
            continue
        before = _server(old_cfg, backend, server)
        after = _server(new_cfg, backend, server)
        for field in _SERVER_STATE:
            dst[new_base + field] = src[old_base + field]
        dst[new_base + SRV_WEIGHT] = _runtime(
            src[old_base + SRV_WEIGHT], before.weight, after.weight
        )
        dst[new_base + SRV_MAXCONN] = _runtime(
            src[old_base + SRV_MAXCONN], before.maxconn, after.maxconn
        )


def _server(cfg: config.Config, backend: str, name: str) -> config.Server:
    return next(s for s in cfg.backends[backend].servers if s.name == name)
