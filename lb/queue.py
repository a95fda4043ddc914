"""Server slots and queues: a server's `maxconn` holds for pylb as a whole.

The master keeps the count of busy slots per server and the queues of requests waiting for
one; workers ask for a slot over their control channel and are answered when one is theirs.
Only servers with a limit go through the master: the others are used at once.

A request that persistence sends to a given server waits in that server's queue; any other
waits in its backend's queue, for whichever server frees a slot first. Queues are served
in arrival order (the oldest of the server's and the backend's queue first).

A backend with `hold-when-down` also keeps here the requests that found no usable server
(an acquire with srv null): they wait in the backend's queue, in arrival order, and are
granted a server (counted like a slot) as soon as one is usable again.

Messages (worker -> master): acquire {id, be, srv, persist}, cancel {id}, release {be, srv};
(master -> worker): grant {id, srv} where srv is null when the request cannot be queued.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lb import config
from lb.shared import (
    BE_HOLD,
    MAINT,
    READY,
    SRV_ADMIN,
    SRV_MAXCONN,
    SRV_OP,
    SRV_WEIGHT,
    UP,
    Shared,
)

if TYPE_CHECKING:
    from lb.backend import Backend, Server

Send = Callable[[Any, dict[str, Any]], None]
TURN_KEPT = 10.0  # seconds a moved request's place waits for it in a new generation
SLOT_KEPT = 1.0  # seconds a slot given to a request on its way to a new generation waits for it


@dataclass(eq=False)
class _Waiting:
    owner: Any  # the worker's handle in the master
    id: int
    seq: int
    backend: str
    hold: bool = False  # found no usable server: waits for any (hold-when-down)
    # Handed over to `owner`, a worker of a newer generation, which has not asked for it
    # yet: the ticket (old pid, old id) it will ask with (`id` is then 0, nobody's).
    ticket: tuple[int, int] | None = None


@dataclass(eq=False)
class _ServerSlots:
    backend: str
    name: str
    base: int
    maxqueue: int
    backup: bool = False
    used: int = 0
    queue: deque[_Waiting] = field(default_factory=deque)
    # A server a reload removed: an older generation may still send it requests (it is
    # still there on the network). Its limit is the last one it had; 0: none.
    retired_limit: int | None = None


class Keeper:
    """The master's side: slots in use and the queues, per server and per backend."""

    def __init__(self, cfg: config.Config, shared: Shared, send: Send) -> None:
        self.send = self._send = send
        self._seq = itertools.count()
        self.servers: dict[tuple[str, str], _ServerSlots] = {}
        self.by_backend: dict[str, list[_ServerSlots]] = {}
        self.queues: dict[str, deque[_Waiting]] = {}
        self.held: dict[Any, dict[tuple[str, str], int]] = {}  # slots per worker
        self.turns: dict[tuple[Any, int], tuple[int, float]] = {}  # places of moved requests
        # slots whose turn came while their request was moving, by ticket: (server, turn, when)
        self.kept: dict[tuple[int, int], tuple[tuple[str, str], int, float]] = {}
        self.retired: dict[str, list[_ServerSlots]] = {}  # per backend, removed servers
        self.maxqueue: dict[str, int] = {}  # per backend, for its own queue (0: no limit)
        self.hold_base: dict[str, int] = {}  # per backend, where its hold-when-down flag is
        # the longest each queue was (qmax): per (backend, server), None for the backend's
        self.qmax: dict[tuple[str, str | None], int] = {}
        self._words: Any = None
        self.reconfigure(cfg, shared)

    def reconfigure(self, cfg: config.Config, shared: Shared) -> None:
        """Follow a (re)loaded configuration. Servers and backends that remain keep their
        busy slots and waiting requests: the limits count every generation together."""
        old_servers, old_queues, old_words = self.servers, self.queues, self._words
        self._words = shared.words
        self.servers, self.by_backend, self.queues = {}, {}, {}
        self.maxqueue = {name: backend.maxqueue for name, backend in cfg.backends.items()}
        self.hold_base = {name: shared.layout.backends[name] + BE_HOLD for name in cfg.backends}
        for name, backend in cfg.backends.items():
            self.queues[name] = old_queues.pop(name, deque())
            self.by_backend[name] = []
            for server in backend.servers:
                key = (name, server.name)
                slots = _ServerSlots(name, server.name, shared.layout.servers[key],
                                     server.maxqueue, server.backup)
                previous = old_servers.get(key)
                if previous is not None:
                    slots.used, slots.queue = previous.used, previous.queue
                self.servers[key] = slots
                self.by_backend[name].append(slots)
        for name, group in list(self.retired.items()):  # back in the configuration
            group[:] = [r for r in group if (r.backend, r.name) not in self.servers]
            if not group:
                del self.retired[name]
        # Servers and backends the new configuration lacks stay known, retired, while an
        # older generation may still use them: its requests finish where they were meant.
        for key, previous in old_servers.items():
            if key in self.servers:
                continue
            if previous.retired_limit is None:
                previous.retired_limit = old_words[previous.base + SRV_MAXCONN]
                self.retired.setdefault(previous.backend, []).append(previous)
            self.servers[key] = previous
        self.queues.update(old_queues)  # of retired backends
        for name in self.queues:
            self.dispatch(name)

    def forget_retired(self) -> None:
        """No older generation is left: retired servers and backends go."""
        for slots in [s for group in self.retired.values() for s in group]:
            del self.servers[(slots.backend, slots.name)]
        for name in [b for b in self.retired if b not in self.by_backend]:
            self.queues.pop(name, None)
        self.retired.clear()

    # -- state of a server --------------------------------------------------------------

    def _room(self, slots: _ServerSlots) -> bool:
        limit = slots.retired_limit
        if limit is None:
            limit = self._words[slots.base + SRV_MAXCONN]
        return limit <= 0 or slots.used < limit

    def _selectable(self, slots: _ServerSlots) -> bool:
        if slots.retired_limit is not None:
            return True  # no state is kept for it any more: the old generation trusts it
        words, base = self._words, slots.base
        return words[base + SRV_OP] == UP and words[base + SRV_ADMIN] == READY and (
            words[base + SRV_WEIGHT] > 0
        )

    def _takes_queued(self, slots: _ServerSlots) -> bool:
        """May `slots` serve a request of its backend's queue? A selectable server; a
        backup one only while no active server of the backend is."""
        if not self._selectable(slots):
            return False
        if not slots.backup:
            return True
        return not any(self._selectable(s) for s in self.by_backend.get(slots.backend, ())
                       if not s.backup)

    def holds(self, backend: str) -> bool:
        """Is hold-when-down on for `backend` (as configured or set at run time)?"""
        base = self.hold_base.get(backend)
        return base is not None and self._words[base] != 0

    def _backend_full(self, backend: str) -> bool:
        limit = self.maxqueue.get(backend, 0)
        return limit > 0 and len(self.queues.get(backend, ())) >= limit

    def _persistable(self, slots: _ServerSlots) -> bool:
        if slots.retired_limit is not None:
            return True
        words, base = self._words, slots.base
        return words[base + SRV_OP] == UP and words[base + SRV_ADMIN] != MAINT

    def group(self, backend: str) -> list[_ServerSlots]:
        """A backend's servers, current and retired."""
        return self.by_backend.get(backend, []) + self.retired.get(backend, [])

    def queued_max(self, backend: str, server: str | None = None) -> int:
        """The most requests that waited at once, as `queued` counts them, since pylb
        started or `clear counters`."""
        return self.qmax.get((backend, server), 0)

    def _enqueue(self, key: tuple[str, str | None], queue: deque[_Waiting],
                 waiting: _Waiting) -> None:
        _enqueue(queue, waiting)
        if len(queue) > self.qmax.get(key, 0):
            self.qmax[key] = len(queue)

    def queued(self, backend: str, server: str | None = None) -> int:
        """Requests waiting: in a server's queue, or in the backend's own."""
        if server is None:
            return len(self.queues.get(backend, ()))
        slots = self.servers.get((backend, server))
        return len(slots.queue) if slots is not None else 0

    # -- messages -----------------------------------------------------------------------

    def acquire(self, owner: Any, message: dict[str, Any]) -> None:
        if self._claim(owner, message):
            return
        backend = message["be"]
        seq = self._resume(message["resume"]) if message.get("resume") else None
        waiting = _Waiting(owner, message["id"], next(self._seq) if seq is None else seq, backend)
        if message["srv"] is None:
            self._hold(waiting)
            return
        wanted = self.servers.get((backend, message["srv"]))
        if wanted is None:  # a server this pylb has never known: nothing to wait for
            self._refuse(waiting)
            return
        if message.get("persist"):
            if self._room(wanted):
                self._grant(waiting, wanted)
            elif wanted.maxqueue and len(wanted.queue) >= wanted.maxqueue:
                self._refuse(waiting)
            else:
                self._enqueue((backend, wanted.name), wanted.queue, waiting)
            return
        if self._room(wanted) and self._selectable(wanted):
            self._grant(waiting, wanted)
            return
        for other in self.group(backend):
            if (other is not wanted and self._room(other) and self._selectable(other)
                    and _knows(owner, other)):
                self._grant(waiting, other)
                return
        if self._backend_full(backend):
            self._refuse(waiting)
            return
        self._enqueue((backend, None), self.queues.setdefault(backend, deque()), waiting)

    def _hold(self, waiting: _Waiting) -> None:
        """A request that found no usable server (hold-when-down): any server now usable
        takes it, else it waits in the backend's queue for one."""
        backend = waiting.backend
        waiting.hold = True
        for slots in self.group(backend):
            if self._room(slots) and self._takes_queued(slots) and _knows(waiting.owner, slots):
                self._grant(waiting, slots)
                return
        if not self.holds(backend) or self._backend_full(backend) or backend not in self.queues:
            self._refuse(waiting)
            return
        self._enqueue((backend, None), self.queues[backend], waiting)

    def stop_holding(self, backend: str) -> None:
        """hold-when-down was switched off: the requests it holds get their 503 now."""
        queue = self.queues.get(backend)
        for waiting in [w for w in queue or () if w.hold]:
            queue.remove(waiting)  # type: ignore[union-attr]
            self._refuse(waiting)

    def _refuse(self, waiting: _Waiting) -> None:
        self._send(waiting.owner, {"op": "grant", "id": waiting.id, "be": waiting.backend,
                                   "srv": None})

    def moved(self, ticket: list[int], heir: Any) -> None:
        """The master handed a queued request over to `heir` with the ticket of its place.
        The old worker let it go (lb.httpproxy close_if_idle): a slot granted to it there
        would only come back, and the request would lose its turn (seen as a request
        served after later ones when a slot freed before `heir` asked again). Its place
        is the heir's from now on, and a slot its turn brings waits for it (`_grant`)."""
        pid, ident = ticket
        for queue in self._all_queues():
            for waiting in queue:
                if getattr(waiting.owner, "pid", None) == pid and waiting.id == ident:
                    waiting.owner, waiting.id, waiting.ticket = heir, 0, (pid, ident)
                    return

    def _claim(self, owner: Any, message: dict[str, Any]) -> bool:
        """A moved request asks again (acquire with `resume`) and its turn came meanwhile:
        the slot kept for it is its own. Asking now for something the slot is not for (the
        new configuration sends it elsewhere), it gives the slot back and keeps its turn."""
        ticket = message.get("resume")
        kept = self.kept.pop((ticket[0], ticket[1]), None) if ticket else None
        if kept is None:
            return False
        key, seq, _ = kept
        slots = self.servers.get(key)
        if slots is not None and key[0] == message["be"] and _knows(owner, slots) and (
            key[1] == message["srv"] or not message.get("persist")
        ):
            held = self.held.setdefault(owner, {})
            held[key] = held.get(key, 0) + 1
            self._send(owner, {"op": "grant", "id": message["id"], "be": key[0], "srv": key[1]})
            return True
        self.turns[(ticket[0], ticket[1])] = (seq, time.monotonic())
        self.acquire(owner, message)  # queued at its turn first, then the slot frees
        if slots is not None:
            slots.used -= 1
            self.dispatch(key[0])
        return True

    def expire_kept(self) -> None:
        """Slots kept for moved requests that did not ask again within SLOT_KEPT (the
        client left on the way, the new generation held or routed it elsewhere) are free
        again; such a request asking later still has its turn."""
        now = time.monotonic()
        for ticket, (key, seq, when) in list(self.kept.items()):
            if now - when > SLOT_KEPT:
                del self.kept[ticket]
                self.turns[ticket] = (seq, now)
                slots = self.servers.get(key)
                if slots is not None:
                    slots.used -= 1
                    self.dispatch(key[0])

    def _resume(self, ticket: list[int]) -> int | None:
        """A request moved to a new generation takes back its place in the queue: the
        turn (sequence number) its old entry had, which goes."""
        pid, ident = ticket
        for queue in self._all_queues():
            for waiting in queue:
                if waiting.ticket == (pid, ident) or (
                    getattr(waiting.owner, "pid", None) == pid and waiting.id == ident
                ):
                    queue.remove(waiting)
                    return waiting.seq
        turn = self.turns.pop((pid, ident), None)  # its old worker already exited
        return turn[0] if turn is not None else None

    def cancel(self, owner: Any, message: dict[str, Any]) -> None:
        ident = message["id"]
        for queue in self._all_queues():
            for waiting in queue:
                if waiting.owner is owner and waiting.id == ident:
                    queue.remove(waiting)
                    return

    def release(self, owner: Any, message: dict[str, Any]) -> None:
        key = (message["be"], message["srv"])
        held = self.held.get(owner, {})
        if held.get(key, 0) <= 0:
            return
        held[key] -= 1
        slots = self.servers.get(key)
        if slots is not None:  # else gone with a reload: nothing left to free
            slots.used -= 1
            self.dispatch(message["be"])

    def transfer(self, old: Any | None, new: Any, backend: str, server: str) -> None:
        """A slot moves from worker `old` to worker `new` with the tunnel that holds it
        (lb.handover): still busy, never free in between. With `old` gone (its slots
        freed) or unknown, the slot is counted again."""
        key = (backend, server)
        held = self.held.get(old, {}) if old is not None else {}
        if held.get(key, 0) > 0:
            held[key] -= 1
        elif key in self.servers:
            self.servers[key].used += 1
        mine = self.held.setdefault(new, {})
        mine[key] = mine.get(key, 0) + 1

    def held_by_pid(self) -> dict[str, list[list[Any]]]:
        """Slots in use and requests waiting, by worker pid, for a process taking over."""
        result: dict[str, list[list[Any]]] = {}
        for owner, keys in self.held.items():
            result[str(owner.pid)] = [[b, s, n] for (b, s), n in keys.items() if n > 0]
        return result

    def adopt_slots(self, owner: Any, held: list[list[Any]]) -> None:
        """Slots another process's worker holds: counted here until it releases them."""
        mine = self.held.setdefault(owner, {})
        for backend, server, count in held:
            slots = self.servers.get((backend, server))
            if slots is not None:
                slots.used += count
                mine[(backend, server)] = mine.get((backend, server), 0) + count

    def waiting_of(self) -> list[tuple[Any, dict[str, Any]]]:
        """Every waiting request as the acquire that would queue it again (oldest first)."""
        found: list[tuple[int, Any, dict[str, Any]]] = []
        for slots in self.servers.values():
            for w in slots.queue:
                found.append((w.seq, w.owner, {"op": "acquire", "id": w.id, "be": w.backend,
                                               "srv": slots.name, "persist": True}))
        for backend, queue in self.queues.items():
            group = self.group(backend)
            if not group:
                continue
            first = group[0].name
            for w in queue:
                found.append((w.seq, w.owner, {"op": "acquire", "id": w.id, "be": backend,
                                               "srv": None if w.hold else first,
                                               "persist": False}))
            queue.clear()
        for slots in self.servers.values():
            slots.queue.clear()
        return [(owner, message) for _, owner, message in sorted(found, key=lambda f: f[0])]

    def worker_gone(self, owner: Any) -> None:
        """A worker exited: its slots are free and its waiting requests gone."""
        for key, count in self.held.pop(owner, {}).items():
            if key in self.servers:
                self.servers[key].used -= count
        now = time.monotonic()
        for queue in self._all_queues():
            for waiting in [w for w in queue if w.owner is owner]:
                queue.remove(waiting)
                # Its request may be on its way to a new generation: keep its turn a while.
                self.turns[(getattr(owner, "pid", None), waiting.id)] = (waiting.seq, now)
        for key in [k for k, (_, when) in self.turns.items() if now - when > TURN_KEPT]:
            del self.turns[key]
        for backend in list(self.queues):
            self.dispatch(backend)

    def dispatch(self, backend: str) -> None:
        """Give free slots to waiting requests, oldest first; call after any change
        (a slot released, a limit raised, a server back up)."""
        shared_queue = self.queues.get(backend)
        if shared_queue is None:
            return
        progress = True
        while progress:
            progress = False
            for slots in self.group(backend):
                if not self._room(slots):
                    continue
                candidates = []
                if slots.queue and self._persistable(slots):
                    candidates.append((slots.queue[0], slots.queue))
                if shared_queue and self._takes_queued(slots):
                    # the oldest request whose worker knows this server (a server a
                    # reload added is unknown to the older generation, a retired one to
                    # the newer)
                    first = next((w for w in shared_queue if _knows(w.owner, slots)), None)
                    if first is not None:
                        candidates.append((first, shared_queue))
                if not candidates:
                    continue
                waiting, queue = min(candidates, key=lambda c: c[0].seq)
                queue.remove(waiting)
                self._grant(waiting, slots)
                progress = True
        self._requeue_stranded(backend)

    def _requeue_stranded(self, backend: str) -> None:
        """Requests waiting for a server that is no longer usable join the backend's queue
        (HAProxy's redispatch of queued requests)."""
        moved = False
        for slots in self.by_backend.get(backend, []):
            if slots.queue and not self._persistable(slots):
                self.queues[backend].extend(slots.queue)
                slots.queue.clear()
                moved = True
        if moved:
            queue = self.queues[backend]
            ordered = sorted(queue, key=lambda w: w.seq)
            queue.clear()
            queue.extend(ordered)
            self.dispatch(backend)

    def _grant(self, waiting: _Waiting, slots: _ServerSlots) -> None:
        slots.used += 1
        key = (slots.backend, slots.name)
        if waiting.ticket is not None:  # on its way to a new generation: the slot waits
            self.kept[waiting.ticket] = (key, waiting.seq, time.monotonic())
            return
        held = self.held.setdefault(waiting.owner, {})
        held[key] = held.get(key, 0) + 1
        self._send(
            waiting.owner,
            {"op": "grant", "id": waiting.id, "be": slots.backend, "srv": slots.name},
        )

    def _all_queues(self) -> list[deque[_Waiting]]:
        return [*self.queues.values(), *(s.queue for s in self.servers.values())]


def _knows(owner: Any, slots: _ServerSlots) -> bool:
    """Whether the worker `owner` has this server in its configuration (workers of
    another process taking over are trusted to)."""
    knows = getattr(owner, "knows", None)
    return knows is None or knows(slots.backend, slots.name)


def _enqueue(queue: deque[_Waiting], waiting: _Waiting) -> None:
    """Into `queue` at its turn: at the end, unless it resumes an older place."""
    if not queue or queue[-1].seq < waiting.seq:
        queue.append(waiting)
        return
    position = next(i for i, other in enumerate(queue) if other.seq > waiting.seq)
    queue.insert(position, waiting)


class Queue:
    """A worker's side: asks the master for slots on limited servers."""

    def __init__(self, send: Callable[[dict[str, Any]], None]) -> None:
        self._send = send
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[Server | None, Callable[[Server | None], None]]] = {}
        self.alone = False  # the master is gone: nobody keeps the slots any more

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def acquire(
        self,
        backend: Backend,
        server: Server | None,
        persist: bool,
        granted: Callable[[Server | None], None],
        resume: list[int] | None = None,
    ) -> int:
        """Ask for a slot on `server` (or, unless `persist`, any server of the backend; with
        `server` None, the first server of the backend to be usable: hold-when-down);
        `granted` is called with the server given, or None if it cannot even be queued.
        `resume`: the ticket of this request's place in an older generation's queue."""
        ident = next(self._ids)
        if self.alone:  # what is left is finished as it comes: no count to keep
            asyncio.get_running_loop().call_soon(granted, server)
            return ident
        self._waiting[ident] = (server, granted)
        self._send(
            {"op": "acquire", "id": ident, "be": backend.name,
             "srv": server.name if server is not None else None,
             "persist": persist, "resume": resume}
        )
        return ident

    def master_gone(self) -> None:
        """The master died: nobody will answer. The requests waiting are in flight, and
        in flight is what this worker finishes: each goes to the server it asked for."""
        self.alone = True
        waiting, self._waiting = self._waiting, {}
        for server, granted in waiting.values():
            granted(server)

    def forget(self, ident: int) -> None:
        """Stop waiting for `ident` here, leaving its place for its next owner to resume."""
        self._waiting.pop(ident, None)

    def cancel(self, ident: int) -> None:
        if self._waiting.pop(ident, None) is not None:
            self._send({"op": "cancel", "id": ident})

    def release(self, server: Server) -> None:
        self.release_named(server.backend.name, server.name)

    def release_named(self, backend: str, server: str) -> None:
        self._send({"op": "release", "be": backend, "srv": server})

    def on_grant(self, message: dict[str, Any], backends: dict[str, Backend]) -> None:
        entry = self._waiting.pop(message["id"], None)
        name = message["srv"]
        backend = backends.get(message["be"])
        servers = backend.servers if backend is not None else ()
        server = next((s for s in servers if s.name == name), None)
        if entry is None:
            if server is not None:  # granted after we gave up: hand the slot straight back
                self.release(server)
            return
        entry[1](server)
