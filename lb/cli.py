"""The `pylb` command line, with HAProxy's flags."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import ssl
import sys

import setproctitle

from lb import RELEASE_DATE, __version__, compiled, config, pidfile, privileges, reload, takeover
from lb import log as logsetup
from lb.log import log
from lb.master import Master
from lb.sock import Listener
from lb.takeover import Inheritance


class _BuildInfo(argparse.Action):
    """-vv: the version, as -v, with what it runs on (HAProxy's -vv shows its build)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"pylb {__version__} {RELEASE_DATE}")
        print(f"Python {platform.python_version()} ({sys.executable})")
        print(f"Hot path: {compiled.status()}")
        from lb.tls import tickets

        shared = tickets.unavailable() or "yes"
        print(f"TLS: {ssl.OPENSSL_VERSION}; session ticket keys shared by all workers: {shared}")
        parser.exit()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pylb", description="Multiprocess HTTP/TCP load balancer whose reloads lose nothing."
    )
    parser.add_argument("-f", dest="file", metavar="CONFIG", required=True, help="YAML config file")
    parser.add_argument("-c", dest="check", action="store_true", help="check the config and exit")
    parser.add_argument("-D", dest="daemon", action="store_true", help="run in the background")
    parser.add_argument("-p", dest="pidfile", metavar="PIDFILE", help="write the master's pid here")
    parser.add_argument("-q", dest="quiet", action="store_true", help="log warnings, errors only")
    parser.add_argument("-V", dest="verbose", action="store_true", help="log debug messages too")
    parser.add_argument(
        "-sf", dest="soft_finish", nargs="*", type=int, metavar="PID",
        help="once ready, soft-stop these old processes (SIGUSR1)",
    )
    parser.add_argument(
        "-st", dest="terminate", nargs="*", type=int, metavar="PID",
        help="once ready, stop these old processes now (SIGTERM)",
    )
    parser.add_argument("-x", dest="socket", metavar="SOCKET", help="old process's stats socket")
    parser.add_argument("-v", "--version", action="version", version=f"pylb {__version__}")
    parser.add_argument("-vv", action=_BuildInfo, help="show version and build details")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config.load(args.file)
    except config.ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    if args.check:
        if not args.quiet:
            print("Configuration file is valid")
        return 0

    g = cfg.global_
    why = privileges.check_start(privileges.identity(g.user, g.group))
    if why:
        print(f"pylb: {why}", file=sys.stderr)
        return 1
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logsetup.setup(cfg.global_.log, level)
    inheritance = None
    if args.socket or args.soft_finish or args.terminate:
        inheritance = take_over(args.socket, cfg)
    try:
        listeners, stale = reload.listeners_for(cfg, inheritance.listeners if inheritance else [])
    except OSError as err:
        print(f"pylb: {err}", file=sys.stderr)
        return 1
    for listener in stale:
        listener.sock.close()  # binds the new configuration no longer has

    pid_path = args.pidfile or cfg.global_.pidfile
    pid_path = os.path.abspath(pid_path) if pid_path else None
    if args.daemon or cfg.global_.daemon:
        logsetup.close()
        daemonize(listeners, inheritance.descriptors() if inheritance is not None else [])
        logsetup.setup(cfg.global_.log, level)  # the daemon's own stderr is /dev/null
    if pid_path:
        pidfile.write(pid_path)
    setproctitle.setproctitle(f"pylb: master [{cfg.path}]")
    log.info("pylb %s, hot path %s", __version__, compiled.status())
    old = None
    if args.soft_finish:
        old = (args.soft_finish, signal.SIGUSR1)
    elif args.terminate:
        old = (args.terminate, signal.SIGTERM)
    try:
        return Master(cfg, listeners, level, old, inheritance).run()
    finally:
        if pid_path:
            pidfile.remove(pid_path)


def take_over(path: str | None, cfg: config.Config) -> Inheritance | None:
    """Ask the running pylb (its stats socket: `-x`, else the configuration's) for its
    listening sockets and state. Without them the binds are made anew."""
    if path is None and cfg.global_.stats is not None:
        path = cfg.global_.stats.path
    if path is None:
        log.warning("no stats socket to take over from: binding anew")
        return None
    try:
        inheritance = takeover.inherit(path)
    except (OSError, ValueError) as err:
        log.warning("cannot take over from %s (%s): binding anew", path, err)
        return None
    log.info("took over %d listening sockets and the state of the running pylb",
             len(inheritance.listeners))
    return inheritance


def daemonize(listeners: list[Listener], keep: list[int]) -> None:
    import daemon  # python-daemon; imported here since only -D needs it

    context = daemon.DaemonContext(
        working_directory=os.getcwd(),  # relative paths stay relative to where we started
        umask=0o022,
        files_preserve=[listener.sock.fileno() for listener in listeners] + keep,
        detach_process=True,
    )
    context.open()
    # python-daemon leaves the /dev/null it puts on 0, 1 and 2 close-on-exec: workers must
    # inherit them, or the descriptors they receive would land on 0, 1 and 2 and anything
    # written to stdout or stderr would go into a listening socket or shared memory.
    for fd in (0, 1, 2):
        os.set_inheritable(fd, True)
