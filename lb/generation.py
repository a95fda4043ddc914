"""Generations of workers: how pylb starts them, replaces them and retires them.

A *generation* is the set of workers started with one configuration and what is made from
it: shared memory, listening sockets, maps and stick tables (`Resources`). Every step of
its life is here:

- **spawn**: a worker is forked by the worker template (lb.template), or when the template
  cannot answer is a new `python -m lb.worker` process; its first control message carries
  the configuration and, by SCM_RIGHTS, every descriptor it needs;
- **ready**: a generation is ready when every one of its workers accepts;
- **reload**: the next generation's resources are prepared off to the side (an `Attempt`:
  configuration and map files read off the loop, new binds bound, new shared memory with
  the runtime state carried over, stick tables planned), then the master switches to them,
  spawns the workers and waits until they all accept;
- **retire**: the older generations are told to soft-stop, handing their idle connections
  and queued requests over to the new one;
- **rollback**: if anything fails (configuration, a bind, a worker that dies or does not
  start in time), the attempt's workers are killed and everything opened for it is
  closed: the running generation serves on as if nothing happened;
- **respawn** of a worker that died, and **stop** of them all.

lb/master.py keeps the loop, the signals and the dispatch of messages.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lb
from lb import config, control, handover, maps, reload, systemd, template, tls
from lb.log import log
from lb.shared import Shared
from lb.sock import Listener
from lb.sticktable import StickTable
from lb.template import Forked, Template

if TYPE_CHECKING:
    from lb.master import Master

RESPAWN_BACKOFF_MAX = 30.0
QUICK_DEATH = 5.0  # a worker dying sooner than this after its start counts as crashing
STOP_GRACE = 5.0  # how long stopping workers get before SIGKILL on a hard stop
RELOAD_TIMEOUT = 30.0  # how long a new generation gets to accept
UNREACHABLE_CHECK = 0.5  # after its channel ends, a worker still alive this long is killed
TEMPLATE_START = 5.0  # how long the first generation waits for the worker template


@dataclass(eq=False)
class WorkerHandle:
    index: int
    generation: int
    workers: int
    proc: subprocess.Popen[bytes] | Forked
    channel: control.Channel
    pidfd: int
    slot: int
    servers: frozenset[tuple[str, str]]  # (backend, server) of its configuration
    accepts: handover.Accepts  # the tunnels its configuration can take (lb.handover)
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    stopping: bool = False
    unreachable: bool = False  # its channel ended while it lived: killed by the master

    @property
    def pid(self) -> int:
        return self.proc.pid

    def knows(self, backend: str, server: str) -> bool:
        return (backend, server) in self.servers

    def __str__(self) -> str:
        return f"worker {self.index}/{self.workers} gen {self.generation}"


@dataclass
class Resources:
    """What a generation runs on."""

    config: config.Config
    shared: Shared
    listeners: list[Listener]
    maps: maps.Maps
    tables: dict[str, StickTable]


@dataclass
class Attempt:
    """The next generation's resources while it starts: kept if it comes up, closed if
    not. `fresh` are the binds bound for it, `stale` the current ones it no longer has."""

    resources: Resources
    fresh: list[Listener]
    stale: list[Listener]

    @classmethod
    async def prepare(cls, master: Master) -> Attempt:
        """Read and check the configuration and the map files (off the loop's thread),
        bind new addresses, make the shared memory with the runtime state carried over,
        and plan the stick tables. Raises config.ConfigError, OSError or ValueError, with
        everything opened on the way closed again."""
        cfg = await asyncio.to_thread(config.load, master.config.path)
        new_maps = await maps.reload(cfg, master.maps)
        try:
            listeners, stale = reload.listeners_for(cfg, master.listeners)
        except OSError:
            maps.release(new_maps, master.maps)
            raise
        current = {id(lst.sock) for lst in master.listeners}
        fresh = [lst for lst in listeners if id(lst.sock) not in current]
        try:
            shared = Shared.create(cfg)
            reload.carry_state(master.shared, master.config, shared, cfg)
            tables = master.tables.plan(cfg)
        except (OSError, ValueError):
            for listener in fresh:
                listener.sock.close()
            maps.release(new_maps, master.maps)
            raise
        return cls(Resources(cfg, shared, listeners, new_maps, tables), fresh, stale)

    def rollback(self, current: Resources, master: Master) -> None:
        """Close what was opened for this attempt and is not in use by `current`."""
        for listener in self.fresh:
            listener.sock.close()
        self.resources.shared.close()
        maps.release(self.resources.maps, current.maps)
        master.tables.release(self.resources.tables, current.tables)


class Generations:
    """Every worker of every generation, as the master watches them."""

    def __init__(self, master: Master) -> None:
        self.master = master
        self.number = 1  # the current generation
        self.workers: dict[int, WorkerHandle] = {}  # by pid
        self.crashes: dict[int, int] = {}  # worker index -> quick deaths in a row
        self.announced: set[int] = set()  # generations announced ready
        self.reloads = 0
        self._ready: dict[int, asyncio.Future[None]] = {}  # generations a reload waits for
        self._lock = asyncio.Lock()
        self.template: Template | None = None  # where workers are forked from

    async def start_template(self) -> None:
        """Start the worker template, so that workers are forked rather than started as
        new interpreters, and wait until it is ready (a few hundred milliseconds, about
        one interpreter start: the first workers are forked from it too). If it cannot
        be had, workers start as new interpreters."""
        try:
            template.become_subreaper()
            self.template = Template([sys.executable, "-m", "lb.template"], _worker_env())
            self.template.start()
        except OSError as err:
            log.warning("no worker template (%s): workers start as new interpreters", err)
            self.template = None
            return
        if not await self.template.wait_ready(TEMPLATE_START):
            log.warning("the worker template is not ready after %.0fs: the first workers "
                        "start as new interpreters", TEMPLATE_START)

    def housekeeping(self) -> None:
        """Replace a template that died; reap orphans re-parented to us that are not
        workers (one the template forked as the master gave up waiting for it)."""
        if self.template is not None:
            self.template.check(lambda: log.warning("worker template restarted"))
        known = set(self.workers)
        if self.template is not None and self.template.pid is not None:
            known.add(self.template.pid)
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid in known:
                return  # nothing, or one its own reaper will see to
            try:
                os.waitpid(info.si_pid, 0)
            except ChildProcessError:
                return
            log.warning("reaped a stray child (pid %d)", info.si_pid)

    def stop_template(self) -> None:
        if self.template is not None:
            self.template.stop()
            self.template = None

    def retire_segments(self) -> None:
        """Let go of the shared memory of older generations whose last worker exited."""
        tally = self.master.tally
        for number in tally.generations():
            if number != self.number and not self.of(number):
                tally.retired(number, self.master.shared)

    def of(self, number: int) -> list[WorkerHandle]:
        return [h for h in self.workers.values() if h.generation == number]

    def older(self) -> list[WorkerHandle]:
        return [h for h in self.workers.values() if h.generation < self.number]

    # -- spawn and ready --------------------------------------------------------------

    def spawn(self, index: int) -> WorkerHandle | None:
        """Start worker `index` of the current generation; None if it could not be."""
        master = self.master
        used = {h.slot for h in self.of(self.number)}
        slot = next(s for s in range(master.shared.layout.slots) if s not in used)
        ours, theirs = control.pair()
        proc: subprocess.Popen[bytes] | Forked | None = None
        if self.template is not None and self.template.available():
            proc = self.template.fork(theirs.fileno())
            if proc is None:  # a worker forked anyway gets an ended channel, and exits
                log.warning("the worker template failed: starting worker %d afresh", index)
                ours.close()
                theirs.close()
                ours, theirs = control.pair()
        try:
            if proc is None:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "lb.worker", str(theirs.fileno())],
                    pass_fds=[theirs.fileno()],
                    env=_worker_env(),
                )
        except OSError as err:
            log.error("cannot start worker %d: %s", index, err)
            ours.close()
            theirs.close()
            return None
        theirs.close()
        pidfd = os.pidfd_open(proc.pid)
        names, tables = master.tables.descriptors()
        edits, indexes = maps.descriptors(master.maps)
        fds = [lst.sock.fileno() for lst in master.listeners] + tables + indexes
        try:
            control.send(ours, self._hello(index, slot, names, edits), fds + [master.shared.fd])
        except OSError as err:  # it died at once: its exit is seen through the pidfd
            log.error("cannot send worker %d its configuration: %s", index, err)
        channel = control.Channel(ours, lambda message, fds: None, lambda: None)
        cfg = master.config
        servers = frozenset(
            (name, server.name) for name, backend in cfg.backends.items()
            for server in backend.servers
        )
        handle = WorkerHandle(
            index, self.number, cfg.global_.workers, proc, channel, pidfd, slot, servers,
            handover.accepts(cfg),
        )
        channel._on_message = functools.partial(master.received, handle)
        channel._on_close = functools.partial(self._unreachable, handle)
        self.workers[proc.pid] = handle
        asyncio.get_running_loop().add_reader(pidfd, self._exited, handle)
        how = "forked from the template" if isinstance(proc, Forked) else "new interpreter"
        log.info("%s started (pid %d, %s)", handle, handle.pid, how)
        return handle

    def _hello(
        self, index: int, slot: int, tables: list[str], edits: dict[str, Any]
    ) -> dict[str, Any]:
        """The first message to a new worker: who it is and what it serves."""
        master = self.master
        cfg = master.config
        return {
            "op": "hello",
            "generation": self.number,
            "index": index,
            "slot": slot,
            "workers": cfg.global_.workers,
            "master": os.getpid(),
            # parsed and checked once, by the master: the worker takes it as it is
            "config": base64.b64encode(pickle.dumps(cfg)).decode("ascii"),
            "listeners": [[lst.frontend, lst.address] for lst in master.listeners],
            "log": cfg.global_.log,
            "log_level": master.log_level,
            "tables": tables,
            "maps": edits,
            "vars": {name: value for name, (_kind, value) in master.variables.items()},
            "ticket_keys": master.ticket_keys.hex() if _has_tls(cfg) else [],
            "certs": tls.encode_certs(master.certs),
        }

    def _unreachable(self, handle: WorkerHandle) -> None:
        """A worker whose channel ended while it lives (it stopped reading it, or broke
        it) cannot be told anything any more: it goes, and is replaced."""
        # A process that dies closes its channel a moment before it is a zombie: look
        # again a little later, and only a worker still alive then is unreachable.
        asyncio.get_running_loop().call_later(UNREACHABLE_CHECK, self._kill_unreachable, handle)

    def _kill_unreachable(self, handle: WorkerHandle) -> None:
        if handle.proc.returncode is not None or handle.pid not in self.workers:
            return  # it died, and is reaped or being reaped
        try:  # exited but not reaped yet? (WNOWAIT leaves it for the reaper)
            if os.waitid(os.P_PID, handle.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                return
        except ChildProcessError:
            return
        handle.unreachable = True
        log.warning("%s (pid %d) no longer reads its control channel: killing it",
                    handle, handle.pid)
        _kill(handle.pid, signal.SIGKILL)

    def ready(self, handle: WorkerHandle) -> None:
        """A worker accepts; its generation is ready when all of them do."""
        handle.ready = True
        log.info("%s (pid %d) accepts, %.0f ms after its start", handle, handle.pid,
                 (time.monotonic() - handle.started) * 1000)
        number = handle.generation
        members = self.of(number)
        if number in self.announced or not all(h.ready for h in members):
            return
        # (only the newest matter: older ones are retired, or being rolled back)
        self.announced = {n for n in self.announced if n >= number - 1} | {number}
        log.info("generation %d ready: %d workers accepting", number, len(members))
        waiter = self._ready.pop(number, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        systemd.notify("READY=1", f"STATUS=generation {number}: {len(members)} workers",
                       f"MAINPID={os.getpid()}")
        self.master.generation_ready()

    # -- reload: prepare, switch, spawn, wait, retire or roll back ----------------------

    async def reload(self) -> tuple[bool, str]:
        """Replace the workers by a new generation on the same listening sockets, runtime
        state carried over; the older generations hand over and finish. (True, "") or
        (False, why): a failed reload changes nothing."""
        async with self._lock:
            master = self.master
            if master.stopping:
                return False, "stopping"
            began = time.monotonic()
            systemd.notify("RELOADING=1", systemd.monotonic_usec(),
                           f"STATUS=reloading {master.config.path}")
            try:
                attempt = await Attempt.prepare(master)
            except (config.ConfigError, OSError, ValueError) as err:
                log.error("reload failed, the running configuration stays: %s", err)
                systemd.notify("READY=1", f"STATUS=reload failed: {err}")
                return False, str(err)
            current = master.resources()
            master.switch(attempt.resources)
            master.tally.switch(current.shared, self.number)
            self.number += 1
            why = await self._start_generation(master.config.global_.workers)
            if why:
                log.error("reload failed: %s; generation %d serves on", why, self.number - 1)
                self._abandon(self.number)
                self.number -= 1
                master.tally.unswitch(current.shared)
                master.switch(current)
                attempt.rollback(current, master)
                self._fill()  # a worker that died meanwhile was not replaced: now it is
                self.retire_segments()  # an older generation whose last worker died meanwhile
                systemd.notify("READY=1", f"STATUS=reload failed: {why}")
                return False, why
            self._retire_older()
            self.retire_segments()  # an older generation whose workers all died meanwhile
            for listener in attempt.stale:
                listener.sock.close()  # the older workers closed theirs on soft stop
            # (current.shared stays open while its workers count in it: lb.tally)
            maps.release(current.maps, master.maps)
            master.tables.release(current.tables, master.tables.tables)
            self.reloads += 1
            master.reload_seconds.observe(time.monotonic() - began)
            log.info("reload %d done: generation %d serves %s", self.reloads, self.number,
                     master.config.path)
            return True, ""

    async def _start_generation(self, count: int) -> str:
        """Spawn the current generation's workers and wait until all accept; "" when
        they do, else why not (a worker died, or the time ran out)."""
        number = self.number
        ready = self._ready[number] = asyncio.get_running_loop().create_future()
        for index in range(1, count + 1):
            if self.spawn(index) is None:
                ready.set_result(None)
                return "a worker could not be started"
        try:
            await asyncio.wait_for(asyncio.shield(ready), RELOAD_TIMEOUT)
        except TimeoutError:
            return f"generation {number} did not start within {RELOAD_TIMEOUT:.0f}s"
        finally:
            self._ready.pop(number, None)
        if number not in self.announced:  # woken by a death, not by readiness
            return f"a worker of generation {number} exited before accepting"
        return ""

    def _fill(self) -> None:
        """Start the current generation's missing workers."""
        present = {h.index for h in self.of(self.number) if not h.stopping}
        for index in range(1, self.master.config.global_.workers + 1):
            if index not in present:
                self.spawn(index)

    def _abandon(self, number: int) -> None:
        for handle in self.of(number):
            handle.stopping = True
            _kill(handle.pid, signal.SIGKILL)

    def _retire_older(self) -> None:
        accepts = handover.accepts(self.master.config)
        for handle in self.older():
            if not handle.stopping:
                handle.stopping = True
                handle.channel.send({"op": "soft-stop", "handover": True, "accepts": accepts})
            else:  # stopping already: its tunnels now go to this generation, if it takes them
                handle.channel.send({"op": "accepts", "accepts": accepts})

    # -- exits ------------------------------------------------------------------------

    def _exited(self, handle: WorkerHandle) -> None:
        asyncio.get_running_loop().remove_reader(handle.pidfd)
        self.master.events.put_nowait(("exited", handle))

    def reap(self, handle: WorkerHandle) -> None:
        status = handle.proc.wait()
        handle.channel.drain()  # what it sent before exiting (connections handed over)
        del self.workers[handle.pid]
        handle.channel.close()
        os.close(handle.pidfd)
        master = self.master
        master.worker_gone(handle)
        if not self._ready:  # (a reload under way may yet go back to an older segment)
            self.retire_segments()
        if not self.older() and not master.elders:
            master.keeper.forget_retired()  # no older generation left to use them
        how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
        waiter = self._ready.get(handle.generation)
        if waiter is not None and not waiter.done() and not handle.ready:
            # a worker of a generation being started died before accepting: the reload
            # fails now rather than at its timeout
            log.warning("%s (pid %d) exited before accepting: %s", handle, handle.pid, how)
            waiter.set_result(None)
            return
        if handle.stopping or master.stopping:
            log.info("%s (pid %d) exited: %s", handle, handle.pid, how)
            return
        log.warning("%s (pid %d) exited: %s", handle, handle.pid, how)
        self._schedule_respawn(handle, status)

    def _schedule_respawn(self, handle: WorkerHandle, status: int) -> None:
        # A worker that dies soon after its start is crashing, unless it was killed from
        # outside (kill -9 or -TERM by an operator, the OOM killer): that is not a loop.
        killed = status in (-signal.SIGKILL, -signal.SIGTERM) and not handle.unreachable
        if time.monotonic() - handle.started < QUICK_DEATH and not killed:
            crashes = self.crashes.get(handle.index, 0) + 1
        else:
            crashes = 0
        self.crashes[handle.index] = crashes
        # First replacement at once; a worker that keeps dying waits longer each time.
        delay = 0.0 if crashes <= 1 else min(0.25 * 2 ** (crashes - 1), RESPAWN_BACKOFF_MAX)
        if delay:
            log.warning("%s keeps dying: next start in %.1fs", handle, delay)
        asyncio.get_running_loop().call_later(
            delay, self.master.events.put_nowait, ("respawn", (handle.generation, handle.index))
        )

    def respawn(self, generation: int, index: int) -> None:
        """Replace a worker that died, if its generation is still the current one (an
        older generation is on its way out: it is not replaced)."""
        if not self.master.stopping and generation == self.number:
            self.spawn(index)

    # -- stopping -------------------------------------------------------------------

    def stop(self, hard: bool, hand_over: bool, accepts: handover.Accepts | None) -> None:
        """Stop every worker: at once (`hard`), or after what is in flight (`hand_over`:
        idle connections and the tunnels `accepts` allows go to a newer pylb)."""
        for handle in self.workers.values():
            handle.stopping = True
            if hard:
                _kill(handle.pid, signal.SIGTERM)
            else:
                handle.channel.send(
                    {"op": "soft-stop", "handover": hand_over, "accepts": accepts}
                )
        loop = asyncio.get_running_loop()
        hard_stop_after = self.master.config.global_.hard_stop_after
        if hard:
            loop.call_later(STOP_GRACE, self._kill_remaining)
        elif hard_stop_after:
            loop.call_later(hard_stop_after + STOP_GRACE, self._kill_remaining)

    def _kill_remaining(self) -> None:
        for handle in self.workers.values():
            log.warning("%s (pid %d) did not stop: killing it", handle, handle.pid)
            _kill(handle.pid, signal.SIGKILL)


def _has_tls(cfg: config.Config) -> bool:
    return any(frontend.tls for frontend in cfg.frontends.values())


def _worker_env() -> dict[str, str]:
    """The environment of workers and the template: ours, with pylb's package importable."""
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(lb.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
