"""The worker template: a process that has imported pylb and holds nothing else, from which
the master gets new workers by fork, in a few milliseconds instead of an interpreter start.

The master starts it once (`python -m lb.template FD`) and asks it for a worker by sending
one packet on FD with the new worker's end of its control channel (SCM_RIGHTS). The
template forks twice: the first child forks the worker and exits at once, so the worker
is re-parented to the master, which is a child subreaper (PR_SET_CHILD_SUBREAPER). The
worker is then the master's child like one it had started itself: the master reaps it,
reads its exit status, and the worker's PR_SET_PDEATHSIG watches the master. The template
answers with the worker's pid, or `error: why`.

A worker forked here inherits only what the template has: its modules, the standard
streams, and the descriptor it is given; the template's own end of FD is closed in it.
The template holds no socket but FD, no loop, no thread and no state: forking it is safe,
and a worker that crashes takes nothing of it along. It exits when the master goes (end of
stream, or its death signal); the master starts another if it dies.

`lb.generation` falls back to starting workers as fresh interpreters whenever the
template cannot answer.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import setproctitle

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
REPARENT_WAIT = 2.0  # seconds a new worker waits to be the master's child
FORK_TIMEOUT = 2.0  # seconds the master waits for the template's answer
RESTART_DELAY = 1.0  # seconds between two starts of a template that keeps dying


# -- the master's side ----------------------------------------------------------------------


def become_subreaper() -> None:
    """Make the calling process (the master) the parent of every orphan below it: the
    workers forked by the template."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


class Forked:
    """A worker the template forked, as the master's child (what lb.generation needs of
    a subprocess.Popen)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def wait(self) -> int:
        if self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:  # not ours after all (never re-parented)
                self.returncode = 255
        return self.returncode


class Template:
    """The master's handle on its worker template: started, asked for workers, restarted
    when it dies. Every failure leaves `fork` returning None: start a fresh interpreter."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self._command = command
        self._env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self.ready = False
        self._started = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [*self._command, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                env=self._env,
            )
        except OSError:
            ours.close()
            self.proc = None
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self.ready = False
        self._started = time.monotonic()

    def fork(self, channel: int) -> Forked | None:
        """A worker on `channel` (the worker's end of its control channel), forked by
        the template, which must be `available()`; None if it failed (it may have forked
        one anyway: give the next attempt another channel)."""
        sock = self._sock
        if sock is None:
            return None
        try:
            sock.settimeout(FORK_TIMEOUT)
            socket.send_fds(sock, [b"w"], [channel])
            reply = sock.recv(64)
        except OSError:
            reply = b""
        finally:
            with contextlib.suppress(OSError):
                sock.setblocking(False)
        if reply[:1].isdigit():
            return Forked(int(reply))
        self.stop()  # silent, stalled or broken: replaced by the next check()
        return None

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until the template is ready (or gone, or `timeout`); is it?"""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.available():
            if self._sock is None or self.proc is None or self.proc.poll() is not None:
                return False
            left = deadline - loop.time()
            if left <= 0:
                return False
            readable = loop.create_future()
            loop.add_reader(self._sock, lambda f=readable: f.done() or f.set_result(None))
            try:
                await asyncio.wait_for(readable, left)
            except TimeoutError:
                pass
            finally:
                if self._sock is not None:
                    loop.remove_reader(self._sock)
        return True

    def available(self) -> bool:
        """Is the template running and ready (it has imported everything)?"""
        if self.ready:
            return True
        if self._sock is None:
            return False
        try:
            self.ready = self._sock.recv(16) == b"ready"  # type: ignore[union-attr]
        except BlockingIOError:
            return False
        except OSError:
            self.stop()
        return self.ready

    def check(self, on_restart: Callable[[], None] | None = None) -> None:
        """Reap a template that died and start another (not more than once a second)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            return
        if proc is not None:
            self.stop()
        if time.monotonic() - self._started < RESTART_DELAY:
            return
        try:
            self.start()
        except OSError:
            return
        if on_restart is not None:
            on_restart()

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        proc, self.proc = self.proc, None
        self.ready = False
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


# -- the template's side --------------------------------------------------------------------


def serve(sock: socket.socket, master: int) -> None:
    """Answer the master's requests until it goes."""
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, 64, 4)
        except InterruptedError:
            continue
        except OSError:  # the master's end is gone
            return
        if not data:
            for fd in fds:
                os.close(fd)
            return
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            answer = b"error: expected one descriptor"
        else:
            try:
                answer = str(fork_worker(sock, fds[0], master)).encode()
            except OSError as err:
                answer = f"error: {err.strerror or err}".encode()
            finally:
                os.close(fds[0])
        try:
            sock.send(answer)
        except OSError:  # the master's end is gone
            return


def fork_worker(sock: socket.socket, channel: int, master: int) -> int:
    """Fork a worker on `channel`, re-parented to the master; its pid."""
    read_end, write_end = os.pipe()
    try:
        middle = os.fork()
        if middle == 0:  # the first child: fork the worker, tell its pid, leave
            code = 1
            try:
                os.close(read_end)
                pid = os.fork()
                if pid == 0:
                    os.close(write_end)
                    _become_worker(sock, channel, master)  # never returns
                os.write(write_end, str(pid).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        write_end = -1
        text = os.read(read_end, 32)
        os.waitpid(middle, 0)  # its exit re-parents the worker to the master
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    if not text:
        raise OSError(0, "the worker could not be forked")
    return int(text)


def _become_worker(sock: socket.socket, channel: int, master: int) -> None:
    """In the forked worker: shed the template, wait to be the master's child, run."""
    code = 1
    try:
        sock.close()
        deadline = time.monotonic() + REPARENT_WAIT
        while os.getppid() != master and time.monotonic() < deadline:
            time.sleep(0.0002)  # the first child is exiting
        from lb import worker  # imported by main() already: a lookup

        code = worker.main([str(channel)])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a worker's crash is reported, never raised here
        logging.getLogger("pylb").exception("worker crashed")
    finally:
        # What the interpreter does at exit, which os._exit skips: the atexit handlers
        # (a worker's frontends let go of their stick counters there), logs, streams.
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        logging.shutdown()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(argv[0]))
    master = os.getppid()
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR2, signal.SIGWINCH):
        signal.signal(sig, signal.SIG_IGN)  # the master decides; workers set their own
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != master:
        return 1
    setproctitle.setproctitle("pylb: worker template")
    from lb import privileges, worker  # noqa: F401 - what every worker needs, imported once
    if os.geteuid() == 0:  # it reads nothing but the master's socket: it needs no more
        privileges.keep_only(privileges.TEMPLATE_KEEPS, strict=False)
    # Everything imported now is shared with every worker, copy-on-write: keep it out of
    # the collector's way (a collection would touch, and so copy, every page).
    gc.collect()
    gc.freeze()
    sock.send(b"ready")
    serve(sock, master)
    return 0


if __name__ == "__main__":
    sys.exit(main())
