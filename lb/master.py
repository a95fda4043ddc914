"""The master: owns the listening sockets, starts and watches the workers.

Like gunicorn's arbiter, signal handlers only enqueue; one loop (`_main`) takes events
off the queue and acts. A worker's exit is seen through its pidfd (uvloop keeps SIGCHLD
for itself). Workers are separate programs (`python -m lb.worker`), each with
a control channel to the master over which it receives the configuration and, with
SCM_RIGHTS, every listening socket.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import uvloop

import lb
from lb import config, control, maps, reload, systemd, takeover
from lb.check import Checker
from lb.log import log
from lb.queue import Keeper
from lb.runtime.server import StatsSocket
from lb.shared import MAX_SLOTS, Shared
from lb.sock import Listener
from lb.tables import Tables
from lb.takeover import Inheritance

RESPAWN_BACKOFF_MAX = 30.0
QUICK_DEATH = 5.0  # a worker dying sooner than this after its start counts as crashing
STOP_GRACE = 5.0  # how long stopping workers get before SIGKILL on a hard stop
TICK = 0.1  # period of the master's housekeeping
RELOAD_TIMEOUT = 30.0  # how long a new generation gets to accept

_SIGNAL_NAMES = {s.value: s.name for s in signal.Signals}


@dataclass(eq=False)
class Elder:
    """A worker of the pylb we took over from, as our slot keeper sees it: its grants go
    back over the handover connection."""

    pid: int
    sock: socket.socket

    @property
    def channel(self) -> Elder:
        return self

    def send(self, message: dict[str, Any]) -> None:
        try:
            takeover.send_line(self.sock, {"slot": message, "pid": self.pid})
        except OSError:
            pass  # the old process is gone: nothing waits for this answer


@dataclass(eq=False)
class WorkerHandle:
    index: int
    generation: int
    workers: int
    proc: subprocess.Popen[bytes]
    channel: control.Channel
    pidfd: int
    slot: int
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    stopping: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __str__(self) -> str:
        return f"worker {self.index}/{self.workers} gen {self.generation}"


class Master:
    def __init__(
        self,
        cfg: config.Config,
        listeners: list[Listener],
        log_level: int = logging.INFO,
        old_pids: tuple[list[int], int] | None = None,
        inheritance: Inheritance | None = None,
    ) -> None:
        self.config = cfg
        self.listeners = listeners
        self.log_level = log_level
        self.old_pids = old_pids  # (-sf/-st pids, signal), told to stop once we are ready
        self.generation = 1
        self.workers: dict[int, WorkerHandle] = {}  # by pid
        self.crashes: dict[int, int] = {}  # worker index -> quick deaths in a row
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.stopping = False
        self.announced: set[int] = set()  # generations announced ready
        self.shared = Shared.create(cfg)
        self.tables = Tables(cfg, inheritance.tables if inheritance is not None else None)
        self.started = time.time()
        self.variables: dict[str, tuple[str, str]] = {}  # runtime variables: (type, value)
        # named maps: indexes in shared memory, changed at run time by edits on top
        self.maps = maps.load(cfg, inheritance.maps if inheritance is not None else {})
        self.stats_socket: StatsSocket | None = None
        self._asks: dict[int, dict[WorkerHandle, asyncio.Future[Any]]] = {}
        self._ready: dict[int, asyncio.Future[None]] = {}  # generations a reload waits for
        self._reload_lock = asyncio.Lock()
        self._heir = 0  # round-robin position for handed-over connections
        self.reloads = 0
        self._ask_ids = itertools.count(1)
        self.keeper = Keeper(cfg, self.shared, lambda handle, message: handle.channel.send(message))
        self.heirs: list[socket.socket] = []  # a newer pylb taking over: where connections go
        self.elders: dict[int, Elder] = {}  # the workers of the pylb we took over from
        self.inheritance = inheritance
        self.health: dict[str, int] | None = None
        if inheritance is not None and inheritance.state is not None:
            self._inherit(inheritance.state)
        if inheritance is not None and inheritance.heir is not None:
            for pid, held in inheritance.held.items():
                self.keeper.adopt_slots(self._elder(int(pid)), held)

    def _inherit(self, state: dict[str, Any]) -> None:
        """Start from the state of the pylb we take over from, as a reload would."""
        old, old_cfg = takeover.old_memory(state)
        reload.carry_state(old, old_cfg, self.shared, self.config)  # type: ignore[arg-type]
        self.variables = {name: (kind, value) for name, (kind, value) in state["vars"].items()}
        self.health = state["health"]

    def snapshot(self) -> dict[str, Any]:
        """Our runtime state, for a newer pylb taking over (`_getstate`)."""
        return {
            "config_path": self.config.path,
            "config_text": self.config.text,
            "words": list(self.shared.words),
            "vars": self.variables,
            "maps": maps.descriptors(self.maps)[0],  # edits; the indexes go by _getsocks
            "health": self.checker.health(),
        }

    # -- the loop -------------------------------------------------------------------

    def run(self) -> int:
        return uvloop.run(self._main())

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (
            signal.SIGTERM,
            signal.SIGINT,
            signal.SIGUSR1,
            signal.SIGUSR2,
            signal.SIGHUP,
            signal.SIGWINCH,
        ):
            loop.add_signal_handler(sig, self.events.put_nowait, ("signal", sig))
        for index in range(1, self.config.global_.workers + 1):
            self._spawn(index)
        self.checker = Checker(self.config, self.shared, self.health)
        self.checker.start()
        if self.inheritance is not None and self.inheritance.heir is not None:
            heir = takeover.LineReader(self.inheritance.heir, self.inheritance.early)
            heir.sock.setblocking(False)
            loop.add_reader(heir.sock, self._from_elder, heir)
            loop.call_soon(self._from_elder, heir)  # what came with the answer
        ticker = loop.create_task(self._tick())
        if self.config.global_.stats is not None:
            self.stats_socket = StatsSocket(self.config.global_.stats, self)
            await self.stats_socket.start()
        while True:
            kind, value = await self.events.get()
            if kind == "signal":
                self._on_signal(value)
            elif kind == "message":
                self._on_message(*value)
            elif kind == "exited":
                self._reap(value)
            elif kind == "respawn":
                if not self.stopping:
                    self._spawn(value)
            elif kind == "tick":
                self._housekeeping()
            if self.stopping and not self.workers:
                break
        ticker.cancel()
        if self.stats_socket is not None:
            self.stats_socket.close()
        log.info("exiting")
        return 0

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.events.put_nowait(("tick", None))

    def _housekeeping(self) -> None:
        """Periodic chores: queued requests may fit now that a server came back up or a
        limit was raised; expired stick-table entries go."""
        for backend, queue in self.keeper.queues.items():
            if queue or any(s.queue for s in self.keeper.by_backend[backend]):
                self.keeper.dispatch(backend)
        self.tables.housekeeping()

    def _on_signal(self, sig: int) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            log.info("%s: stopping now", _SIGNAL_NAMES[sig])
            self._stop(hard=True)
        elif sig == signal.SIGUSR1:
            log.info("SIGUSR1: soft stop, finishing what is in flight")
            self._stop(hard=False)
        elif sig == signal.SIGWINCH:
            log.info("SIGWINCH: reopening log files")
            self.broadcast({"op": "reopen-logs"})
        else:  # SIGUSR2, SIGHUP
            log.info("%s: reloading", _SIGNAL_NAMES[sig])
            asyncio.get_running_loop().create_task(self.reload())

    # -- workers --------------------------------------------------------------------

    def _free_slot(self) -> int:
        used = {h.slot for h in self.workers.values()}
        return next(s for s in range(MAX_SLOTS) if s not in used)

    def _spawn(self, index: int) -> None:
        slot = self._free_slot()
        ours, theirs = control.pair()
        env = dict(os.environ)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(lb.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        proc = subprocess.Popen(
            [sys.executable, "-m", "lb.worker", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=env,
        )
        theirs.close()
        pidfd = os.pidfd_open(proc.pid)
        names, tables = self.tables.descriptors()
        edits, indexes = maps.descriptors(self.maps)
        fds = [lst.sock.fileno() for lst in self.listeners] + tables + indexes
        control.send(ours, self._hello(index, slot, names, edits), fds + [self.shared.fd])
        channel = control.Channel(ours, lambda message, fds: None, lambda: None)
        handle = WorkerHandle(
            index, self.generation, self.config.global_.workers, proc, channel, pidfd, slot
        )
        channel._on_message = functools.partial(self._received, handle)
        self.workers[proc.pid] = handle
        asyncio.get_running_loop().add_reader(pidfd, self._exited, handle)
        log.info("%s started (pid %d)", handle, handle.pid)

    def _hello(
        self, index: int, slot: int, tables: list[str], edits: dict[str, Any]
    ) -> dict[str, Any]:
        """The first message to a new worker: who it is and what it serves."""
        return {
            "op": "hello",
            "generation": self.generation,
            "index": index,
            "slot": slot,
            "workers": self.config.global_.workers,
            "config_path": self.config.path,
            "config_text": self.config.text,
            "listeners": [[lst.frontend, lst.address] for lst in self.listeners],
            "log": self.config.global_.log,
            "log_level": self.log_level,
            "tables": tables,
            "maps": edits,
            "vars": {name: value for name, (_kind, value) in self.variables.items()},
        }

    async def reload(self) -> tuple[bool, str]:
        """Re-read the configuration and replace the workers by a new generation on the
        same listening sockets, carrying runtime state; the old generation hands over its
        idle connections and finishes the rest. (True, "") or (False, why): an invalid
        configuration changes nothing."""
        async with self._reload_lock:
            if self.stopping:
                return False, "stopping"
            systemd.notify("RELOADING=1", systemd.monotonic_usec(),
                           f"STATUS=reloading {self.config.path}")
            try:
                cfg = config.load(self.config.path)
                new_maps = await maps.reload(cfg, self.maps)
                listeners, stale = reload.listeners_for(cfg, self.listeners)
            except (config.ConfigError, OSError, ValueError) as err:
                log.error("reload failed, the running configuration stays: %s", err)
                systemd.notify("READY=1", f"STATUS=reload failed: {err}")
                return False, str(err)
            previous = (self.config, self.shared, self.listeners, self.checker, self.maps)
            shared = Shared.create(cfg)
            reload.carry_state(self.shared, self.config, shared, cfg)
            self._switch(cfg, shared, listeners, new_maps)
            old_generation, self.generation = self.generation, self.generation + 1
            ready = self._ready[self.generation] = asyncio.get_running_loop().create_future()
            for index in range(1, cfg.global_.workers + 1):
                self._spawn(index)
            try:
                await asyncio.wait_for(ready, RELOAD_TIMEOUT)
            except TimeoutError:
                log.error("reload failed: generation %d did not start", self.generation)
                for handle in self.workers.values():
                    if handle.generation == self.generation:
                        handle.stopping = True
                        _kill(handle.pid, signal.SIGKILL)
                self.generation = old_generation
                config_, shared_, listeners_, checker_, maps_ = previous
                self._switch(config_, shared_, listeners_, maps_, checker_)
                maps.release(new_maps, maps_)
                systemd.notify("READY=1", "STATUS=reload failed: the new workers did not start")
                return False, "the new workers did not start"
            for handle in self.workers.values():
                if handle.generation < self.generation and not handle.stopping:
                    handle.stopping = True
                    handle.channel.send({"op": "soft-stop", "handover": True})
            for listener in stale:
                listener.sock.close()  # old workers closed theirs on soft stop
            previous[1].close()
            maps.release(previous[4], new_maps)
            self.reloads += 1
            log.info("reload %d done: generation %d serves %s", self.reloads,
                     self.generation, cfg.path)
            return True, ""

    def _switch(
        self,
        cfg: config.Config,
        shared: Shared,
        listeners: list[Listener],
        named_maps: maps.Maps,
        checker: Checker | None = None,
    ) -> None:
        """Make `cfg` the configuration that new workers, checks and commands follow."""
        self.checker.stop()
        self.checker = checker or Checker(cfg, shared, self.checker.health())
        self.checker.start()
        self.config, self.shared, self.listeners = cfg, shared, listeners
        self.maps = named_maps
        self.keeper.reconfigure(cfg, shared)
        self.tables.configure(cfg)

    async def ask(self, what: str, timeout: float = 2.0, **args: Any) -> list[Any]:
        """Ask every running worker something (`lb.worker.Worker._answer`); the answers
        of those that replied within `timeout`."""
        return list((await self.ask_each(what, timeout, **args)).values())

    async def ask_each(
        self, what: str, timeout: float = 2.0, **args: Any
    ) -> dict[WorkerHandle, Any]:
        """`ask`, with each answer by the worker that gave it."""
        loop = asyncio.get_running_loop()
        ident = next(self._ask_ids)
        waiting = {h: loop.create_future() for h in self.workers.values() if h.ready}
        self._asks[ident] = waiting
        for handle in waiting:
            handle.channel.send({"op": "ask", "req": ident, "what": what, **args})
        try:
            if waiting:
                await asyncio.wait(waiting.values(), timeout=timeout)
        finally:
            del self._asks[ident]
        return {h: f.result() for h, f in waiting.items() if f.done() and not f.cancelled()}

    def broadcast(self, message: dict[str, Any]) -> None:
        """Send a message to every worker, of every generation."""
        for handle in self.workers.values():
            handle.channel.send(message)

    def _received(self, handle: WorkerHandle, message: dict[str, Any], fds: list[int]) -> None:
        op = message.get("op")
        if op == "handover":
            self._hand_over(message, fds)  # at once: the connections wait in no queue
            return
        for fd in fds:
            os.close(fd)
        self.events.put_nowait(("message", (handle, message)))

    def _hand_over(self, message: dict[str, Any], fds: list[int]) -> None:
        """Client connections an old worker lets go: to the newest generation's workers,
        in turn. Our copies of the descriptors close once they are on their way."""
        # The newest generation that accepts (a reload may be starting a newer one).
        able = [h for h in self.workers.values() if h.ready and not h.stopping]
        newest = max((h.generation for h in able), default=0)
        heirs = [h for h in able if h.generation == newest]
        try:
            if not heirs and self.heirs:  # a newer pylb is taking over
                self._pass_on(message, fds)
                return
            if not heirs:
                log.warning("no worker to take over %d connections: closing them", len(fds))
                return
            for position, (conn, fd) in enumerate(zip(message["conns"], fds, strict=True)):
                heir = heirs[(self._heir + position) % len(heirs)]
                heir.channel.send({"op": "adopt", "conns": [conn]}, [fd])
            self._heir += len(fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _pass_on(self, message: dict[str, Any], fds: list[int]) -> None:
        for heir in list(self.heirs):
            try:
                takeover.send_line(heir, {"conns": message["conns"]}, fds)
                return
            except OSError:
                self.heirs.remove(heir)
        log.warning("the pylb taking over is gone: closing %d connections", len(fds))

    def add_heir(self, sock: socket.socket) -> None:
        """A newer pylb takes over: from now on it keeps the server slots, ours included
        (what waits in our queues moves there), and takes our idle connections."""
        sock.setblocking(False)
        self.heirs.append(sock)
        for owner, message in self.keeper.waiting_of():
            takeover.send_line(sock, {"slot": message, "pid": owner.pid})
        asyncio.get_running_loop().add_reader(sock, self._from_heir, takeover.LineReader(sock))

    def _from_heir(self, reader: takeover.LineReader) -> None:
        """Grants from the pylb taking over, for our workers."""
        messages, ended = reader.read()
        for message, fds in messages:
            for fd in fds:
                os.close(fd)
            handle = self.workers.get(message.get("pid", 0))
            if handle is not None:
                handle.channel.send(message["slot"])
        if ended:
            asyncio.get_running_loop().remove_reader(reader.sock)
            if reader.sock in self.heirs:
                self.heirs.remove(reader.sock)

    def _elder(self, pid: int) -> Elder:
        elder = self.elders.get(pid)
        if elder is None:
            elder = self.elders[pid] = Elder(pid, self.inheritance.heir)  # type: ignore[union-attr]
        return elder

    def _from_elder(self, reader: takeover.LineReader) -> None:
        """From the pylb we took over from: its idle connections, for our workers, and
        its workers' slot requests, answered by our keeper."""
        messages, ended = reader.read()
        for message, fds in messages:
            if "conns" in message:
                self._hand_over(message, fds)
            elif "slot" in message:
                elder, slot = self._elder(message["pid"]), message["slot"]
                getattr(self.keeper, slot["op"])(elder, slot)
            elif "gone" in message:
                self.keeper.worker_gone(self._elder(message["gone"]))
        if ended:  # it exited: whatever its workers held is free
            asyncio.get_running_loop().remove_reader(reader.sock)
            reader.sock.close()
            for elder in self.elders.values():
                self.keeper.worker_gone(elder)
            self.elders.clear()

    def _on_message(self, handle: WorkerHandle, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op in ("acquire", "release", "cancel") and self.heirs:
            # A newer pylb keeps the slots now: ask it on this worker's behalf.
            takeover.send_line(self.heirs[0], {"slot": message, "pid": handle.pid})
        elif op == "acquire":
            self.keeper.acquire(handle, message)
        elif op == "release":
            self.keeper.release(handle, message)
        elif op == "cancel":
            self.keeper.cancel(handle, message)
        elif op == "reply":
            future = self._asks.get(message["req"], {}).get(handle)
            if future is not None and not future.done():
                future.set_result(message["data"])
        elif op == "ready":
            handle.ready = True
            self._announce_if_ready(handle.generation)

    def _announce_if_ready(self, generation: int) -> None:
        members = [h for h in self.workers.values() if h.generation == generation]
        if generation in self.announced or not all(h.ready for h in members):
            return
        self.announced.add(generation)
        log.info("generation %d ready: %d workers accepting", generation, len(members))
        waiter = self._ready.pop(generation, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        systemd.notify("READY=1", f"STATUS=generation {generation}: {len(members)} workers",
                       f"MAINPID={os.getpid()}")
        if self.old_pids:
            pids, sig = self.old_pids
            self.old_pids = None
            for pid in pids:
                try:
                    os.kill(pid, sig)
                    log.info("sent %s to old process %d", _SIGNAL_NAMES[sig], pid)
                except ProcessLookupError:
                    log.warning("old process %d is already gone", pid)

    def _exited(self, handle: WorkerHandle) -> None:
        asyncio.get_running_loop().remove_reader(handle.pidfd)
        self.events.put_nowait(("exited", handle))

    def _reap(self, handle: WorkerHandle) -> None:
        status = handle.proc.wait()
        del self.workers[handle.pid]
        handle.channel.close()
        os.close(handle.pidfd)
        self.keeper.worker_gone(handle)
        self.shared.clear_slot(handle.slot)  # what it counted is no longer open
        if self.heirs:
            try:
                takeover.send_line(self.heirs[0], {"gone": handle.pid})
            except OSError:
                pass
        for waiting in self._asks.values():  # it will not answer: nobody waits for it
            future = waiting.pop(handle, None)
            if future is not None and not future.done():
                future.cancel()
        how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
        if handle.stopping or self.stopping:
            log.info("%s (pid %d) exited: %s", handle, handle.pid, how)
            return
        log.warning("%s (pid %d) exited: %s", handle, handle.pid, how)
        self._schedule_respawn(handle)

    def _schedule_respawn(self, handle: WorkerHandle) -> None:
        if time.monotonic() - handle.started < QUICK_DEATH:
            crashes = self.crashes.get(handle.index, 0) + 1
        else:
            crashes = 0
        self.crashes[handle.index] = crashes
        # First replacement at once; a worker that keeps dying waits longer each time.
        delay = 0.0 if crashes <= 1 else min(0.25 * 2 ** (crashes - 1), RESPAWN_BACKOFF_MAX)
        if delay:
            log.warning("%s keeps dying: next start in %.1fs", handle, delay)
        asyncio.get_running_loop().call_later(
            delay, self.events.put_nowait, ("respawn", handle.index)
        )

    # -- stopping -------------------------------------------------------------------

    def _stop(self, hard: bool) -> None:
        self.stopping = True
        systemd.notify("STOPPING=1")
        self.checker.stop()
        for handle in self.workers.values():
            handle.stopping = True
            if hard:
                _kill(handle.pid, signal.SIGTERM)
            else:  # with a newer pylb up, idle connections go to it
                handle.channel.send({"op": "soft-stop", "handover": bool(self.heirs)})
        loop = asyncio.get_running_loop()
        if hard:
            loop.call_later(STOP_GRACE, self._kill_remaining)
        elif self.config.global_.hard_stop_after:
            loop.call_later(self.config.global_.hard_stop_after + STOP_GRACE, self._kill_remaining)

    def _kill_remaining(self) -> None:
        for handle in self.workers.values():
            log.warning("%s (pid %d) did not stop: killing it", handle, handle.pid)
            _kill(handle.pid, signal.SIGKILL)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
