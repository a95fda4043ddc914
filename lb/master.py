"""The master: owns the listening sockets and the shared state, and runs one loop.

Like gunicorn's arbiter, signal handlers only enqueue; one loop (`_main`) takes events
off the queue and acts, and an error while acting on one event is logged, never fatal.
A worker's exit is seen through its pidfd (uvloop keeps SIGCHLD for itself). Starting,
replacing and retiring workers, reloads included, is lb/generation.py; this module
dispatches what workers, signals, the stats socket and a takeover peer send.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

import uvloop

from lb import config, handover, maps, privileges, reload, statsite, systemd, takeover, tally
from lb.check import Checker
from lb.generation import Generations, Resources, WorkerHandle
from lb.log import log
from lb.procload import ProcessLoad
from lb.promex import ReloadHistogram
from lb.queue import Keeper
from lb.rates import Rates
from lb.runtime.server import StatsSocket
from lb.shared import Shared
from lb.sock import Listener
from lb.tables import Tables
from lb.takeover import Inheritance
from lb.tally import GONE, Tally
from lb.tls.certs import Certificate
from lb.tls.keyring import KeyRing

TICK = 0.1  # period of the master's housekeeping

_SIGNAL_NAMES = {s.value: s.name for s in signal.Signals}
# What the pylb we took over from may ask our slot keeper on its workers' behalf.
_SLOT_OPS = {"acquire": Keeper.acquire, "release": Keeper.release, "cancel": Keeper.cancel}


@dataclass(eq=False)
class Elder:
    """A worker of the pylb we took over from, as our slot keeper sees it: its grants go
    back over the handover connection."""

    pid: int
    master: Master

    @property
    def channel(self) -> Elder:
        return self

    def knows(self, backend: str, server: str) -> bool:
        servers = self.master.elder_servers
        return servers is None or (backend, server) in servers

    def send(self, message: dict[str, Any]) -> None:
        writer = self.master.to_elder
        if writer is not None:  # else the old process is gone: nobody waits for this
            writer.send({"slot": message, "pid": self.pid})


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
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.stopping = False
        self.generations = Generations(self)
        self.shared = Shared.create(cfg)
        self.tables = Tables(cfg, inheritance.tables() if inheritance is not None else None)
        self.started = time.time()
        self.tally = Tally()  # the traffic counters' sums, whole across reloads
        self.rates = Rates()  # ... and the rates and request times measured from them
        self.reload_seconds = ReloadHistogram()  # how long reloads took (/metrics)
        self.stats_secret = os.urandom(32)  # signs the stats pages' admin forms
        self._web_tasks: set[asyncio.Task[None]] = set()
        self.load = ProcessLoad()  # the workers' CPU, for show info's Idle_pct
        self.variables: dict[str, tuple[str, str]] = {}  # runtime variables: (type, value)
        # named maps: indexes in shared memory, changed at run time by edits on top
        self.maps = maps.load(cfg, inheritance.maps() if inheritance is not None else {})
        self.stats_socket: StatsSocket | None = None
        self._asks: dict[int, dict[WorkerHandle, asyncio.Future[Any]]] = {}
        self._heir = 0  # round-robin position for handed-over connections
        self._ask_ids = itertools.count(1)
        self.keeper = Keeper(cfg, self.shared, lambda handle, message: handle.channel.send(message))
        self.heirs: list[takeover.LineWriter] = []  # a newer pylb taking over us
        # ... before it said it is ready: our keeper keeps the slots until then
        self.pending_heirs: list[takeover.LineWriter] = []
        # acquires asked of the heir and not answered yet: ours again if it goes
        self._forwarded: dict[tuple[int, int], tuple[WorkerHandle, dict[str, Any]]] = {}
        self.heir_accepts: handover.Accepts | None = None  # what that pylb can take
        self.to_elder: takeover.LineWriter | None = None  # the pylb we took over from
        self.elders: dict[int, Elder] = {}  # the workers of the pylb we took over from
        self.elder_servers: frozenset[tuple[str, str]] | None = None  # in its configuration
        self.inheritance = inheritance
        self.health: dict[str, int] | None = None
        self.ticket_keys = KeyRing(cfg.global_.tls_ticket_rotate)
        # certificates committed at run time (`commit ssl cert`), by file, until a reload
        # reads the files again; and those set but not committed yet
        self.certs: dict[str, Certificate] = {}
        self.cert_edits: dict[str, Certificate] = {}
        if inheritance is not None and inheritance.state is not None:
            self._inherit(inheritance.state)
        if inheritance is not None and inheritance.heir is not None:
            self._adopt_held(inheritance.held)  # an older pylb sends them with its answer

    def _inherit(self, state: dict[str, Any]) -> None:
        """Start from the state of the pylb we take over from, as a reload would."""
        old, old_cfg = takeover.old_memory(state)
        if len(old.words) == old.layout.entries:
            reload.carry_state(old, old_cfg, self.shared, self.config)  # type: ignore[arg-type]
        else:  # a pylb of another version, with another memory layout
            log.warning("the pylb taken over lays out its memory otherwise: server states "
                        "and limits start afresh")
        self.tally.keep(tally.add_to_master_blocks(self.shared, takeover.counters(state)))
        self.reload_seconds = ReloadHistogram.from_dict(state.get("reload_seconds"))
        reloads = state.get("reloads")
        if isinstance(reloads, int):
            self.generations.reloads = reloads + 1  # this takeover is a reload too
        # Its workers may ask for servers our configuration renamed or removed: the keeper
        # knows them, retired, as a reload leaves them for an older generation.
        self.keeper = Keeper(old_cfg, old, self.keeper.send)  # type: ignore[arg-type]
        self.elder_servers = frozenset(
            (name, server.name) for name, backend in old_cfg.backends.items()
            for server in backend.servers
        )
        self.keeper.reconfigure(self.config, self.shared)
        self.variables = {name: (kind, value) for name, (kind, value) in state["vars"].items()}
        self.health = state["health"]
        if state.get("ticket_keys"):  # sessions resume across the takeover
            self.ticket_keys = KeyRing(self.config.global_.tls_ticket_rotate,
                                       state["ticket_keys"])

    def _give_up_privileges(self) -> None:
        """Root that starts workers as `global.user` (or in `global.chroot`) needs little
        more from here on: keep only that (lb.privileges)."""
        g = self.config.global_
        if os.geteuid() != 0 or (g.user is None and g.group is None and g.chroot is None):
            return
        privileges.keep_only(set(privileges.MASTER_KEEPS))
        log.info("the master keeps %s; workers run as uid %s, gid %s%s",
                 ", ".join(privileges.MASTER_KEEPS.values()), *self._identity(),
                 f", in {g.chroot}" if g.chroot else "")

    def _identity(self) -> tuple[int, int]:
        g = self.config.global_
        who = privileges.identity(g.user, g.group)
        return (who.uid, who.gid) if who is not None else (os.getuid(), os.getgid())

    def snapshot(self) -> dict[str, Any]:
        """Our runtime state, for a newer pylb taking over (`_getstate`)."""
        return {
            "config_path": self.config.path,
            "config_text": self.config.text,
            "words": list(self.shared.words[: self.shared.layout.entries]),  # (no counters)
            "vars": self.variables,
            "maps": maps.descriptors(self.maps)[0],  # edits; the indexes go by _getsocks
            "health": self.checker.health(),
            "ticket_keys": self.ticket_keys.state(),
            # the traffic counters' sums, which the newer pylb carries on from
            "counters": [[*key, values] for key, values in [
                *self.tally.totals(self.shared).items(), (GONE, self.tally.gone)]],
            "reloads": self.reloads,
            "reload_seconds": self.reload_seconds.as_dict(),
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
        await self.generations.start_template()
        # the rates' first sample, before any worker counts: every rate counts from here
        # (a takeover's inherited sums included, so they make no rate)
        self.rates.sample(self.tally, self.shared)
        for index in range(1, self.config.global_.workers + 1):
            self.generations.spawn(index)
        self.checker = Checker(self.config, self.shared, self.health,
                               lambda backend: self.keeper.dispatch(backend))
        self.checker.start()
        if self.inheritance is not None and self.inheritance.heir is not None:
            heir = takeover.LineReader(self.inheritance.heir, self.inheritance.early)
            self.to_elder = takeover.LineWriter(heir.sock, lambda writer: None)
            loop.add_reader(heir.sock, self._from_elder, heir)
            loop.call_soon(self._from_elder, heir)  # what came with the answer
            # it may hand us its slots now, and the tunnels our configuration takes
            self.to_elder.send({"ready": True, "accepts": handover.accepts(self.config)})
        ticker = loop.create_task(self._tick())
        measurer = loop.create_task(self._measure())
        if self.config.global_.stats is not None:
            self.stats_socket = StatsSocket(self.config.global_.stats, self)
            await self.stats_socket.start()
        self._give_up_privileges()
        while True:
            kind, value = await self.events.get()
            try:
                self._act(kind, value)
            except Exception:  # one bad event must not end the loop that serves the rest
                log.exception("error while handling %s %.200r", kind, value)
            if self.stopping and not self.workers:
                break
        ticker.cancel()
        measurer.cancel()
        self.generations.stop_template()
        if self.stats_socket is not None:
            self.stats_socket.close()
        await self._flush_heirs()
        log.info("exiting")
        return 0

    async def _flush_heirs(self) -> None:
        """What we still have to send to a pylb taking over holds the only copies of the
        connections it hands over: wait until it has them (a stalled one, at most its
        writer's STALL_TIMEOUT)."""
        deadline = time.monotonic() + takeover.LineWriter.STALL_TIMEOUT
        while waiting := [heir for heir in self.heirs if heir.pending and not heir.closed]:
            if time.monotonic() > deadline:
                for heir in waiting:
                    heir.drop("it does not read what we send")
                return
            await asyncio.sleep(0.01)

    def _act(self, kind: str, value: Any) -> None:
        if kind == "signal":
            self._on_signal(value)
        elif kind == "message":
            self._on_message(*value)
        elif kind == "exited":
            self.generations.reap(value)
        elif kind == "respawn":
            self.generations.respawn(*value)
        elif kind == "tick":
            self._housekeeping()

    # -- what the rest of pylb asks of the master ------------------------------------

    @property
    def workers(self) -> dict[int, WorkerHandle]:
        return self.generations.workers

    @property
    def generation(self) -> int:
        return self.generations.number

    @property
    def reloads(self) -> int:
        return self.generations.reloads

    async def reload(self) -> tuple[bool, str]:
        return await self.generations.reload()

    def resources(self) -> Resources:
        """What the current generation runs on."""
        return Resources(self.config, self.shared, self.listeners, self.maps,
                         self.tables.tables)

    def switch(self, resources: Resources) -> None:
        """Make `resources` the ones that new workers, checks and commands follow."""
        cfg = resources.config
        self.checker.stop()
        self.checker = Checker(cfg, resources.shared, self.checker.health(),
                               lambda backend: self.keeper.dispatch(backend))
        self.checker.start()
        self.config, self.shared, self.listeners = cfg, resources.shared, resources.listeners
        self.maps = resources.maps
        self.certs.clear()  # the reload read the certificate files again
        self.ticket_keys.period = cfg.global_.tls_ticket_rotate
        self.tables.use(resources.tables)
        self.tables.set_expiry(cfg)
        self.keeper.reconfigure(cfg, resources.shared)

    def generation_ready(self) -> None:
        """A generation accepts: once, the processes we replace (-sf/-st) are told."""
        if not self.old_pids:
            return
        pids, sig = self.old_pids
        self.old_pids = None
        for pid in pids:
            try:
                os.kill(pid, sig)
                log.info("sent %s to old process %d", _SIGNAL_NAMES[sig], pid)
            except ProcessLookupError:
                log.warning("old process %d is already gone", pid)

    def worker_gone(self, handle: WorkerHandle) -> None:
        """What a worker held goes: its slots, its counters, the answers awaited."""
        self.keeper.worker_gone(handle)
        # what it had open is open no more (its traffic counters stay: lb.tally)
        if handle.generation == self.generation:
            self.shared.clear_slot(handle.slot)
        else:  # an older generation's, in the segment it still counts in
            segment = self.tally.segment(handle.generation)
            if segment is not None:
                segment.clear_slot(handle.slot)
        if self.heirs:
            self.heirs[0].send({"gone": handle.pid})
        for waiting in self._asks.values():  # it will not answer: nobody waits for it
            future = waiting.pop(handle, None)
            if future is not None and not future.done():
                future.cancel()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.events.put_nowait(("tick", None))

    async def _measure(self) -> None:
        """Rates and the workers' load, sampled on a timer of their own: a steady period
        makes a steady window (lb.rates)."""
        while True:
            await asyncio.sleep(self.rates.period)
            try:
                self.rates.sample(self.tally, self.shared)
                self.load.sample([h.pid for h in self.workers.values() if not h.stopping])
            except Exception:  # (a bug here must not end the sampling)
                log.exception("measuring rates failed")

    def _housekeeping(self) -> None:
        """Periodic chores: queued requests may fit now that a server came back up or a
        limit was raised; expired stick-table entries go."""
        for backend, queue in list(self.keeper.queues.items()):
            if queue or any(s.queue for s in self.keeper.group(backend)):
                self.keeper.dispatch(backend)
        self.keeper.expire_kept()  # slots kept for moved requests that never asked again
        self.tables.housekeeping()
        self.generations.housekeeping()
        if self.ticket_keys.due():
            self.ticket_keys.rotate()
            self.broadcast({"op": "ticket-keys", "keys": self.ticket_keys.hex()})
            log.info("TLS session ticket keys rotated")

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
            asyncio.get_running_loop().create_task(self.generations.reload())

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

    def received(self, handle: WorkerHandle, message: dict[str, Any], fds: list[int]) -> None:
        """A message from a worker (its channel's callback)."""
        try:
            self._received(handle, message, fds)
        except Exception:  # nothing a worker sends may stop the master
            log.exception("error on a message from %s: %.200r", handle, message)

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
        in turn, each with its descriptors (two for a tunnel, and the server slot it
        holds moves with it). Our copies of the descriptors close once on their way."""
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
            position = 0
            for conn in message["conns"]:
                heir = heirs[self._heir % len(heirs)]
                self._heir += 1
                count = conn.get("fds", 1)
                mine, position = fds[position : position + count], position + count
                tunnel = conn.get("tunnel")
                if tunnel is not None and handover.refusal(heir.accepts, tunnel) is not None:
                    self._send_back(conn, mine, heir.accepts)
                    continue
                heir.channel.send({"op": "adopt", "conns": [conn]}, mine)
                if conn.get("ticket"):  # a queued request: its place in the queue moves too
                    self.keeper.moved(conn["ticket"], heir)
                if tunnel is not None and tunnel["slot"]:
                    old = self.workers.get(tunnel["pid"]) or self.elders.get(tunnel["pid"])
                    self.keeper.transfer(old, heir, tunnel["be"], tunnel["srv"])
        finally:
            for fd in fds:
                os.close(fd)

    def _send_back(self, conn: dict[str, Any], fds: list[int], accepts: Any) -> None:
        """A tunnel the newest generation cannot take (its worker decided on what an
        older generation took): back to where it was, told what the newest takes, so
        that it stays there; or, that worker gone, to another that can take it."""
        tunnel = conn["tunnel"]
        owner = self.workers.get(tunnel["pid"])
        if owner is None:
            owner = next((h for h in sorted(self.workers.values(), key=lambda h: -h.generation)
                          if h.ready and handover.refusal(h.accepts, tunnel) is None), None)
            if owner is None:
                log.warning("no worker can take a tunnel of %s/%s: closing it",
                            tunnel["be"], tunnel["srv"])
                return
            if tunnel["slot"]:
                self.keeper.transfer(None, owner, tunnel["be"], tunnel["srv"])
        owner.channel.send({"op": "adopt", "conns": [conn], "accepts": accepts}, fds)

    def _pass_on(self, message: dict[str, Any], fds: list[int]) -> None:
        for heir in self.heirs:
            heir.send({"conns": message["conns"]}, fds)
            if not heir.closed:
                return
        log.warning("the pylb taking over is gone: closing %d connections", len(fds))

    def add_heir(self, sock: socket.socket, answer: dict[str, Any]) -> None:
        """A newer pylb takes over (`_handover`, answered with `answer`): from now on it
        keeps the server slots, ours included (what waits in our queues moves there), and
        takes our idle connections. Nothing sent to it ever blocks our loop."""
        heir = takeover.LineWriter(sock, self._heir_gone)
        self.pending_heirs.append(heir)
        heir.send(answer)
        asyncio.get_running_loop().add_reader(
            sock, self._from_heir, heir, takeover.LineReader(sock))

    def _heir_ready(self, heir: takeover.LineWriter) -> None:
        """The pylb taking over reads us and has started: from now on it keeps the slots,
        so it gets what ours hold and what waits in our queues. (A `_handover` client
        that never says so, stalled or not a pylb, never gets the slots.)"""
        if heir not in self.pending_heirs:
            return
        self.pending_heirs.remove(heir)
        self.heirs.append(heir)
        heir.send({"held": self.keeper.held_by_pid()})
        for owner, message in self.keeper.waiting_of():
            self._forward(heir, owner, message)

    def _forward(self, heir: takeover.LineWriter, handle: Any, message: dict[str, Any]) -> None:
        if message.get("op") == "acquire":
            self._forwarded[(handle.pid, message.get("id", 0))] = (handle, message)
        elif message.get("op") == "cancel":
            self._forwarded.pop((handle.pid, message.get("id", 0)), None)
        heir.send({"slot": message, "pid": handle.pid})

    def _heir_gone(self, heir: takeover.LineWriter) -> None:
        """The pylb taking over is gone (or dropped): the slots are ours again, and the
        requests that waited for its answer wait in our queues."""
        for group in (self.heirs, self.pending_heirs):
            if heir in group:
                group.remove(heir)
        asyncio.get_running_loop().remove_reader(heir.sock)
        heir.close()
        heir.sock.close()
        if not self.heirs:
            forwarded, self._forwarded = self._forwarded, {}
            for handle, message in forwarded.values():
                if handle.pid in self.workers:
                    self.keeper.acquire(handle, message)

    def _from_heir(self, heir: takeover.LineWriter, reader: takeover.LineReader) -> None:
        """From the pylb taking over: that it is ready, then grants for our workers."""
        messages, ended = reader.read()
        for message, fds in messages:
            for fd in fds:
                os.close(fd)
            if message.get("ready"):
                self.heir_accepts = message.get("accepts")
                self._heir_ready(heir)
                continue
            slot = message.get("slot")
            handle = self.workers.get(message.get("pid", 0))
            if handle is not None and isinstance(slot, dict):
                self._forwarded.pop((handle.pid, slot.get("id", 0)), None)
                handle.channel.send(slot)
        if ended:
            self._heir_gone(heir)

    def _elder(self, pid: int) -> Elder:
        elder = self.elders.get(pid)
        if elder is None:
            elder = self.elders[pid] = Elder(pid, self)
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
                handler = _SLOT_OPS.get(slot.get("op"))
                if handler is not None:
                    handler(self.keeper, elder, slot)
            elif "gone" in message:
                self.keeper.worker_gone(self._elder(message["gone"]))
            elif "held" in message:
                self._adopt_held(message["held"])
        if ended:  # it exited: whatever its workers held is free
            asyncio.get_running_loop().remove_reader(reader.sock)
            reader.sock.close()
            for elder in self.elders.values():
                self.keeper.worker_gone(elder)
            self.elders.clear()
            if not self.generations.older():
                self.keeper.forget_retired()

    def _adopt_held(self, held: dict[str, list[list[Any]]]) -> None:
        """Slots the workers of the pylb we took over from hold: counted here."""
        for pid, slots in held.items():
            self.keeper.adopt_slots(self._elder(int(pid)), slots)

    def _on_message(self, handle: WorkerHandle, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op in ("acquire", "release", "cancel") and self.heirs:
            # A newer pylb keeps the slots now: ask it on this worker's behalf.
            self._forward(self.heirs[0], handle, message)
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
            self.generations.ready(handle)
        elif op == "web":  # a request for a frontend's stats page or /metrics
            task = asyncio.get_running_loop().create_task(self._answer_web(handle, message))
            self._web_tasks.add(task)
            task.add_done_callback(self._web_tasks.discard)

    async def _answer_web(self, handle: WorkerHandle, message: dict[str, Any]) -> None:
        reply = await statsite.answer(self, message)
        if handle.pid in self.workers:
            handle.channel.send(reply)

    # -- stopping -------------------------------------------------------------------

    def _stop(self, hard: bool) -> None:
        self.stopping = True
        systemd.notify("STOPPING=1")
        self.checker.stop()
        # idle connections and tunnels: to the pylb taking over, if any
        self.generations.stop(hard, bool(self.heirs), self.heir_accepts)
