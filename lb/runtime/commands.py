"""The runtime API's commands, as HAProxy's stats socket has them.

Each command is a row of `COMMANDS`: its leading words, the level it needs, its handler
and its help line. Handlers run in the master; a change they make to shared state is seen
by every worker at once (shared memory), and one that workers hold themselves (runtime
variables, maps) is acknowledged by every worker before the answer is written.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lb import maps
from lb.mapstore import SharedMap
from lb.runtime import sslcert, stats, tables
from lb.shared import (
    BE_HOLD,
    DRAIN,
    FE_DISABLED,
    FE_MAXCONN,
    GLOBAL_MAXCONN,
    MAINT,
    READY,
    SRV_ADMIN,
    SRV_MAXCONN,
    SRV_WEIGHT,
)

if TYPE_CHECKING:
    from lb.master import Master

LEVELS = {"user": 0, "operator": 1, "admin": 2}
USER, OPERATOR, ADMIN = 0, 1, 2


class CommandError(Exception):
    """A command that cannot be carried out: its message is the answer."""


@dataclass
class Session:
    """One client of the socket."""

    level: int
    timeout: float
    interactive: bool = False
    payload: str | None = None  # what followed a command line ending in `<<`


Handler = Callable[["Master", list[str], Session], Awaitable[str]]


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]
    level: int
    handler: Handler
    usage: str


# -- helpers --------------------------------------------------------------------------


def _server(master: Master, ref: str) -> tuple[str, str, int]:
    """`backend/server` -> (backend, server, shared-memory base)."""
    backend, sep, server = ref.partition("/")
    if not sep:
        raise CommandError("Require 'backend/server'.")
    if backend not in master.config.backends:
        raise CommandError("No such backend.")
    base = master.shared.layout.servers.get((backend, server))
    if base is None:
        raise CommandError("No such server.")
    return backend, server, base


def _frontend(master: Master, name: str) -> int:
    base = master.shared.layout.frontends.get(name)
    if base is None:
        raise CommandError("No such frontend.")
    return base


def _number(text: str, what: str) -> int:
    if not re.fullmatch(r"\d+", text):
        raise CommandError(f"'{text}' is not a valid {what} (expected a positive integer).")
    return int(text)


def _args(args: list[str], count: int, usage: str) -> list[str]:
    if len(args) < count:
        raise CommandError(f"Usage: {usage}")
    return args


async def _limits_changed(master: Master) -> None:
    """Make every worker act on new limits now (accept again, or stop) before we answer."""
    await master.ask("check-limits")


# -- show -----------------------------------------------------------------------------


async def show_info(master: Master, args: list[str], session: Session) -> str:
    return stats.show_info(master) + "\n"


async def show_stat(master: Master, args: list[str], session: Session) -> str:
    text = stats.show_stat(master)
    if len(args) >= 3:  # `show stat IID TYPE SID`, as hatop sends it
        iid, types, sid = (int(a) for a in args[:3])
        header, *lines = text.splitlines()
        wanted = [header]
        for line in lines:
            cells = line.split(",")
            row_iid, row_type, row_sid = int(cells[27]), int(cells[32]), int(cells[28])
            if (iid in (-1, row_iid) and (types == -1 or types & (1 << row_type))
                    and sid in (-1, row_sid)):
                wanted.append(line)
        text = "\n".join(wanted) + "\n"
    return text + "\n"


async def show_servers_state(master: Master, args: list[str], session: Session) -> str:
    backend = args[0] if args else None
    if backend is not None and backend not in master.config.backends:
        raise CommandError("Can't find backend.")
    return stats.show_servers_state(master, backend) + "\n"


async def show_sess(master: Master, args: list[str], session: Session) -> str:
    lines = []
    for handle, answer in (await master.ask_each("sessions")).items():
        for s in answer:
            proto = "tcpv6" if str(s["src"]).count(":") > 1 else "tcpv4"  # HOST:PORT
            lines.append(
                f"0x{s['id']:x}: proto={proto} src={s['src']} fe={s['fe']} be={s['be']} "
                f"srv={s['srv']} age={int(s['age'])}s state={s['state']} "
                f"worker={handle.index}/{handle.workers} gen={handle.generation}"
            )
    return "\n".join(lines) + ("\n" if lines else "") + "\n"


async def show_table(master: Master, args: list[str], session: Session) -> str:
    return _on_tables(lambda: tables.show(master.tables, master.config, args))


async def clear_counters(master: Master, args: list[str], session: Session) -> str:
    """`clear counters`: the maxima (smax, qmax, rate_max...); `clear counters all`:
    every counter, as if pylb had just started. Both go on across reloads."""
    if args and args[0] != "all":
        raise CommandError("Usage: clear counters [all]")
    if args and session.level < ADMIN:
        raise CommandError("Permission denied")
    stats.clear_maxima(master)
    if args:
        master.tally.clear(master.shared)
    return "\n"


async def clear_table(master: Master, args: list[str], session: Session) -> str:
    return _on_tables(lambda: tables.clear(master.tables, args))


async def set_table(master: Master, args: list[str], session: Session) -> str:
    return _on_tables(lambda: tables.set_(master.tables, master.config, args))


def _on_tables(run: Callable[[], str]) -> str:
    try:
        return run()
    except ValueError as err:
        raise CommandError(str(err)) from None


# -- servers --------------------------------------------------------------------------


def _set_admin(master: Master, ref: str, state: int) -> None:
    backend, _, base = _server(master, ref)
    master.shared.words[base + SRV_ADMIN] = state
    master.shared.changed(base)
    master.keeper.dispatch(backend)  # queued requests may move
    master.checker.wake_down(backend)  # its last usable server may have gone


def _weight(master: Master, ref: str, text: str) -> str:
    backend, server, base = _server(master, ref)
    cfg = next(s for s in master.config.backends[backend].servers if s.name == server)
    if text.endswith("%"):
        weight = cfg.weight * _number(text[:-1], "weight") // 100
    else:
        weight = _number(text, "weight")
    if weight > 256:
        raise CommandError("Weight must be between 0 and 256.")
    master.shared.words[base + SRV_WEIGHT] = weight
    master.shared.changed(base)
    master.checker.wake_down(backend)  # a weight of 0 may leave no usable server
    return "\n"


async def set_server(master: Master, args: list[str], session: Session) -> str:
    usage = "set server <backend>/<server> state [ready|drain|maint] | weight <w>"
    _args(args, 3, usage)
    ref, field, value = args[:3]
    if field == "state":
        states = {"ready": READY, "drain": DRAIN, "maint": MAINT}
        if value not in states:
            raise CommandError("'set server <srv> state' expects 'ready', 'drain' and 'maint'.")
        _set_admin(master, ref, states[value])
        return "\n"
    if field == "weight":
        return _weight(master, ref, value)
    raise CommandError(f"Usage: {usage}")


async def set_weight(master: Master, args: list[str], session: Session) -> str:
    _args(args, 2, "set weight <backend>/<server> <weight>[%]")
    return _weight(master, args[0], args[1])


async def enable_server(master: Master, args: list[str], session: Session) -> str:
    _set_admin(master, _args(args, 1, "enable server <backend>/<server>")[0], READY)
    return "\n"


async def disable_server(master: Master, args: list[str], session: Session) -> str:
    _set_admin(master, _args(args, 1, "disable server <backend>/<server>")[0], MAINT)
    return "\n"


async def shutdown_sessions(master: Master, args: list[str], session: Session) -> str:
    ref = _args(args, 2, "shutdown sessions server <backend>/<server>")[1]
    backend, server, _ = _server(master, ref)
    await master.ask("shutdown-sessions", be=backend, srv=server)
    return "\n"


# -- frontends and limits ---------------------------------------------------------------


async def enable_frontend(master: Master, args: list[str], session: Session) -> str:
    base = _frontend(master, _args(args, 1, "enable frontend <frontend>")[0])
    master.shared.words[base + FE_DISABLED] = 0
    await _limits_changed(master)
    return "\n"


async def disable_frontend(master: Master, args: list[str], session: Session) -> str:
    base = _frontend(master, _args(args, 1, "disable frontend <frontend>")[0])
    master.shared.words[base + FE_DISABLED] = 1
    await _limits_changed(master)
    return "\n"


async def set_maxconn(master: Master, args: list[str], session: Session) -> str:
    usage = "set maxconn frontend <frontend> <n> | server <backend>/<server> <n> | global <n>"
    _args(args, 2, usage)
    words = master.shared.words
    if args[0] == "global":
        words[GLOBAL_MAXCONN] = _number(args[1], "maxconn")
    elif args[0] == "frontend" and len(args) >= 3:
        words[_frontend(master, args[1]) + FE_MAXCONN] = _number(args[2], "maxconn")
    elif args[0] == "server" and len(args) >= 3:
        backend, _, base = _server(master, args[1])
        words[base + SRV_MAXCONN] = _number(args[2], "maxconn")
        master.keeper.dispatch(backend)  # a raised limit serves queued requests now
    else:
        raise CommandError(f"Usage: {usage}")
    await _limits_changed(master)
    return "\n"


async def set_backend(master: Master, args: list[str], session: Session) -> str:
    """`set backend <b> hold-when-down on|off`: while on, requests that find no usable
    server wait in the backend's queue; switched off, those waiting get their 503 now."""
    usage = "set backend <backend> hold-when-down on|off"
    _args(args, 3, usage)
    name, option, value = args[:3]
    base = master.shared.layout.backends.get(name)
    if base is None:
        raise CommandError("No such backend.")
    if option != "hold-when-down" or value not in ("on", "off"):
        raise CommandError(f"Usage: {usage}")
    master.shared.words[base + BE_HOLD] = value == "on"
    if value == "off":
        master.keeper.stop_holding(name)
    else:
        master.checker.wake_down(name)  # its DOWN servers may now be checked at fastinter
    return "\n"


# -- maps and variables -------------------------------------------------------------------


def _map(master: Master, name: str) -> SharedMap:
    found = master.maps.get(name)
    if found is None:
        raise CommandError("Unknown map identifier. Please use #<id> or <file>.")
    return found


async def _edit_map(master: Master, name: str, kind: str, key: str = "", value: str = "") -> bool:
    """Apply an edit in the master, then in every worker, before the answer."""
    message = {"kind": kind, "key": key, "value": value}
    done = maps.edit(_map(master, name), message)
    if done:
        await master.ask("map-edit", name=name, **message)
    return done


async def show_map(master: Master, args: list[str], session: Session) -> str:
    if not args:
        lines = ["# id (name) description"]
        for index, name in enumerate(master.maps):
            lines.append(f"{index} ({name}) entries:{len(master.maps[name])}")
        return "\n".join(lines) + "\n\n"
    content = _map(master, args[0])
    return "".join(
        f"0x{abs(hash((args[0], key))):x} {key} {value}\n" for key, value in content.items()
    ) + "\n"


async def add_map(master: Master, args: list[str], session: Session) -> str:
    _args(args, 3, "add map <map> <key> <value>")
    await _edit_map(master, args[0], "add", args[1], " ".join(args[2:]))
    return "\n"


async def set_map(master: Master, args: list[str], session: Session) -> str:
    _args(args, 3, "set map <map> <key> <value>")
    if not await _edit_map(master, args[0], "set", args[1], " ".join(args[2:])):
        raise CommandError("entry not found.")
    return "\n"


async def del_map(master: Master, args: list[str], session: Session) -> str:
    _args(args, 2, "del map <map> <key>")
    if not await _edit_map(master, args[0], "del", args[1]):
        raise CommandError("Key not found.")
    return "\n"


async def clear_map(master: Master, args: list[str], session: Session) -> str:
    await _edit_map(master, _args(args, 1, "clear map <map>")[0], "clear")
    return "\n"


_VAR_EXPR = re.compile(r"^(str|int)\((.*)\)$")


async def set_var(master: Master, args: list[str], session: Session) -> str:
    _args(args, 2, "set var <proc.name> <str(value)|int(value)>")
    name, expr = args[0], " ".join(args[1:])
    if not name.startswith("proc."):
        raise CommandError("Only 'proc' scope variables may be set here (proc.<name>).")
    match = _VAR_EXPR.match(expr)
    if match is None:
        raise CommandError("Expected 'str(<value>)' or 'int(<value>)'.")
    kind, value = match.groups()
    if kind == "int":
        value = str(_number(value.lstrip("-"), "integer") * (-1 if value.startswith("-") else 1))
    master.variables[name] = (kind, value)
    await master.ask("set-var", name=name, value=value)
    return "\n"


async def get_var(master: Master, args: list[str], session: Session) -> str:
    name = _args(args, 1, "get var <proc.name>")[0]
    if name not in master.variables:
        raise CommandError("Variable not found.")
    kind, value = master.variables[name]
    return f"{name}: type={'sint' if kind == 'int' else 'str'} value=<{value}>\n\n"


# -- session --------------------------------------------------------------------------


async def set_timeout(master: Master, args: list[str], session: Session) -> str:
    _args(args, 2, "set timeout cli <seconds>")
    if args[0] != "cli":
        raise CommandError("'set timeout' only supports 'cli'.")
    session.timeout = float(_number(args[1], "timeout"))
    return "\n" if not session.interactive else ""


async def help_(master: Master, args: list[str], session: Session) -> str:
    lines = ["The following commands are valid at this level:"]
    for command in COMMANDS:
        if command.level <= session.level:
            lines.append(f"  {command.usage}")
    lines.append("  prompt : toggle interactive mode with prompt")
    lines.append("  quit : disconnect")
    return "\n".join(lines) + "\n\n"


def _age(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h{seconds % 3600 // 60:02d}m" \
        f"{seconds % 60:02d}s"


async def show_proc(master: Master, args: list[str], session: Session) -> str:
    """The master, the current generation's workers and the old ones still draining,
    with what keeps each of those alive (tunnels the new generation cannot take, requests
    still waiting for their answer)."""
    held = await master.ask_each("connections")
    if any(h.generation != master.generation for h in master.workers.values()):
        staying = await master.ask_each("staying")
    else:
        staying = {}
    # The tables are read after the answers: a worker that exited meanwhile is not listed.
    now = time.monotonic()
    line = "{:<8} {:<8} {:<12} {:<12} {:<13} {}"
    lines = [
        line.format("#<PID>", "<type>", "<generation>", "<reloads>", "<uptime>", "<conns>"),
        line.format(os.getpid(), "master", master.generation, master.reloads,
                    _age(time.time() - master.started), sum(held.values())),
    ]
    current = [h for h in master.workers.values() if h.generation == master.generation]
    old = [h for h in master.workers.values() if h.generation != master.generation]
    for title, handles in (("# workers", current), ("# old workers", old)):
        lines.append(title)
        for handle in sorted(handles, key=lambda h: (h.generation, h.index)):
            row = line.format(
                handle.pid, "worker", handle.generation, "-",
                _age(now - handle.started), held.get(handle, "?"),
            )
            why = staying.get(handle)
            lines.append(f"{row:<66} {why}" if why else row)
    return "\n".join(lines) + "\n\n"


async def reload_(master: Master, args: list[str], session: Session) -> str:
    """Reload, answering once the new generation accepts (or why it could not)."""
    done, why = await master.reload()
    if done:
        return f"Success=1\n--\ngeneration {master.generation} ready\n\n"
    return f"Success=0\n--\n{why}\n\n"


COMMANDS = (
    Command(("help",), USER, help_, "help : this message"),
    Command(("show", "info"), USER, show_info, "show info : report information about pylb"),
    Command(("show", "stat"), USER, show_stat, "show stat [<iid> <type> <sid>] : CSV stats"),
    Command(("show", "servers", "state"), USER, show_servers_state,
            "show servers state [<backend>] : dump the servers' runtime state"),
    Command(("set", "timeout"), USER, set_timeout, "set timeout cli <delay> : idle timeout"),
    Command(("show", "sess"), OPERATOR, show_sess, "show sess : list client connections"),
    Command(("show", "table"), OPERATOR, show_table,
            "show table [<table> [data.<type> <op> <v>] | [key <key>]] : stick tables"),
    Command(("show", "map"), OPERATOR, show_map, "show map [<map>] : list maps or entries"),
    Command(("get", "var"), OPERATOR, get_var, "get var <name> : a runtime variable"),
    Command(("clear", "counters"), OPERATOR, clear_counters,
            "clear counters [all] : clear max statistics counters (all: every counter)"),
    Command(("clear", "table"), ADMIN, clear_table,
            "clear table <table> [data.<type> <op> <v>] | [key <key>] : remove entries"),
    Command(("set", "table"), ADMIN, set_table,
            "set table <table> key <key> [data.<type> <value>]* : set an entry"),
    Command(("set", "server"), ADMIN, set_server,
            "set server <b>/<s> state ready|drain|maint | weight <w> : change a server"),
    Command(("set", "weight"), ADMIN, set_weight, "set weight <b>/<s> <w>[%] : change weight"),
    Command(("enable", "server"), ADMIN, enable_server, "enable server <b>/<s> : ready"),
    Command(("disable", "server"), ADMIN, disable_server, "disable server <b>/<s> : maint"),
    Command(("enable", "frontend"), ADMIN, enable_frontend,
            "enable frontend <f> : accept again"),
    Command(("disable", "frontend"), ADMIN, disable_frontend,
            "disable frontend <f> : stop accepting (connections wait)"),
    Command(("set", "maxconn"), ADMIN, set_maxconn,
            "set maxconn frontend <f> <n> | server <b>/<s> <n> | global <n> : limits"),
    Command(("set", "backend"), ADMIN, set_backend,
            "set backend <b> hold-when-down on|off : hold requests while no server is up"),
    Command(("shutdown", "sessions"), ADMIN, shutdown_sessions,
            "shutdown sessions server <b>/<s> : kill a server's connections"),
    Command(("add", "map"), ADMIN, add_map, "add map <map> <key> <value> : add an entry"),
    Command(("set", "map"), ADMIN, set_map, "set map <map> <key> <value> : change an entry"),
    Command(("del", "map"), ADMIN, del_map, "del map <map> <key> : remove an entry"),
    Command(("clear", "map"), ADMIN, clear_map, "clear map <map> : remove all entries"),
    Command(("set", "var"), ADMIN, set_var, "set var <proc.name> <expr> : set a variable"),
    Command(("show", "proc"), OPERATOR, show_proc,
            "show proc : the master and its workers, current and old"),
    Command(("reload",), ADMIN, reload_, "reload : new generation of workers, state kept"),
    Command(("show", "ssl", "cert"), OPERATOR, sslcert.show_ssl_cert,
            "show ssl cert [<certfile>] : certificates in use, or one in detail"),
    Command(("set", "ssl", "cert"), ADMIN, sslcert.set_ssl_cert,
            "set ssl cert <certfile> <payload> : replace a certificate (a transaction)"),
    Command(("commit", "ssl", "cert"), ADMIN, sslcert.commit_ssl_cert,
            "commit ssl cert <certfile> : serve the new certificate on every worker"),
    Command(("abort", "ssl", "cert"), ADMIN, sslcert.abort_ssl_cert,
            "abort ssl cert <certfile> : drop the transaction"),
)


def find(words: list[str]) -> tuple[Command, list[str]] | None:
    """The command these words run, and its arguments."""
    best: tuple[Command, list[str]] | None = None
    for command in COMMANDS:
        size = len(command.words)
        if tuple(words[:size]) == command.words and (best is None or size > len(best[0].words)):
            best = (command, words[size:])
    return best


async def execute(master: Master, line: str, session: Session) -> str:
    """Run one command line (no `;`); the answer, errors included, ends with an empty line."""
    words = line.split()
    if not words:
        return ""
    found = find(words)
    if found is None:
        return f"Unknown command: '{line}'. Enter 'help' for the list of commands.\n\n"
    command, args = found
    if command.level > session.level:
        return "Permission denied\n\n"
    try:
        return await command.handler(master, args, session)
    except CommandError as err:
        return f"{err}\n\n"
    except ValueError as err:
        return f"Invalid argument: {err}\n\n"
