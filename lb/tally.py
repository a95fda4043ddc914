"""The master's sums of the traffic counters, kept whole across reloads, respawns and
takeovers.

Workers count in their generation's shared memory (lb.counters, lb.shared): a block per
frontend and server per worker slot, plus a master block that holds what was counted
before. A sum is the blocks added up, by name, over every segment still in use:

- A reload makes a new segment, whose master blocks start at 0; the old one *retires*:
  its workers finish there, and it is added in whole until the last of them exits. Then
  what it counted moves into the current master blocks, and the segment goes. Nothing is
  computed at the switch itself, so a reload costs no time here however many servers.
- A worker killed with `kill -9` loses nothing: its counts are in the segment, and its
  replacement takes its slot.
- A takeover (`-sf`/`-x`) starts from the old pylb's sums, taken when it hands over its
  state. What its workers count after that is not seen by the new pylb.
- `clear counters all` is a subtraction: the master blocks become minus what the workers
  counted (the master alone writes them), and retiring segments count from then on.

A backend's requests are counted on its servers: its sum is its servers' plus its own
master block, which keeps the share of servers a reload removed.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lb.counters import CTIME_MAX, HIGHEST, LASTSESS, QTIME_MAX, RTIME_MAX, TTIME_MAX, WORDS
from lb.shared import Shared

Key = tuple[str, str]  # ("fe", frontend) | ("be", backend) | ("srv", "backend/server")
Totals = dict[Key, list[int]]  # each in lb.counters order (zeros for fields not asked)
EVERY = range(WORDS)
GONE: Key = ("gone", "")  # frontends no longer configured, together (for a takeover)


def _block_sums(words: Any, first: int, blocks: int, fields: Iterable[int]) -> list[int]:
    """Counters summed over `blocks` consecutive blocks (maxima: the highest)."""
    end = first + blocks * WORDS
    sums = [0] * WORDS
    for index in fields:
        column = words[first + index : end : WORDS]
        sums[index] = max(column) if index in HIGHEST else sum(column)
    return sums


def _merge(into: list[int], values: list[int]) -> None:
    """Add `values` to `into`; maxima take the higher."""
    for index, value in enumerate(values):
        if index in HIGHEST:
            into[index] = max(into[index], value)
        else:
            into[index] += value


def _since(values: list[int], before: list[int]) -> list[int]:
    """What was counted from `before` to `values` (maxima: the latest)."""
    return [value if index in HIGHEST else value - before[index]
            for index, value in enumerate(values)]


def segment_totals(shared: Shared, fields: Iterable[int] = EVERY) -> Totals:
    """What a segment's workers counted, plus what its master blocks hold, by name."""
    words, layout = shared.words, shared.layout
    blocks = layout.slots + 1  # every worker's, then the master's
    fields = tuple(fields)
    totals: Totals = {}
    for name, first in layout.frontend_counters.items():
        totals[("fe", name)] = _block_sums(words, first, blocks, fields)
    for name, first in layout.backend_counters.items():
        totals[("be", name)] = _block_sums(words, first, 1, fields)
    for (backend, server), first in layout.server_counters.items():
        values = totals[("srv", f"{backend}/{server}")] = _block_sums(
            words, first, blocks, fields)
        _merge(totals[("be", backend)], values)  # a backend counts what its servers counted
    return totals


def _add(into: Totals, key: Key, values: list[int]) -> None:
    _merge(into.setdefault(key, [0] * WORDS), values)


def _master_block(shared: Shared, key: Key) -> int | None:
    """Where the master's block of `key` starts in `shared`, if it has one."""
    layout = shared.layout
    kind, name = key
    if kind == "be":
        return layout.backend_counters.get(name)
    if kind == "fe":
        first = layout.frontend_counters.get(name)
    elif kind != "srv":
        return None
    else:
        backend, _, server = name.partition("/")
        first = layout.server_counters.get((backend, server))
    return None if first is None else layout.block(first, layout.slots)


def add_to_master_blocks(shared: Shared, totals: Totals) -> Totals:
    """Add `totals` to the master blocks of `shared`, by name; what has no place there (a
    frontend, backend or server the configuration no longer has) is returned. A backend's
    own block takes what its sum has beyond what its servers' blocks take, so that a
    server gone from the configuration still counts in its backend."""
    words = shared.words
    own = {key: list(values) for key, values in totals.items() if key[0] == "be"}
    for (backend, server) in shared.layout.server_counters:
        values, share = totals.get(("srv", f"{backend}/{server}")), own.get(("be", backend))
        if values is not None and share is not None:
            for index, value in enumerate(values):
                if index not in HIGHEST:  # (a backend's maxima are its servers' anyway)
                    share[index] -= value
    others = [(key, values) for key, values in totals.items() if key[0] != "be"]
    unplaced: Totals = {}
    for key, values in [*others, *own.items()]:
        first = _master_block(shared, key)
        if first is None:
            unplaced[key] = values
            continue
        block = list(words[first : first + WORDS])
        _merge(block, values)
        words[first : first + WORDS] = memoryview(array("q", block))
    return unplaced


@dataclass
class _Retiring:
    generation: int
    shared: Shared
    since: Totals | None = None  # its sums when counters were cleared; None: all counts


@dataclass
class Tally:
    retiring: list[_Retiring] = field(default_factory=list)
    # what frontends a reload removed had counted: still pylb's (show info's CumConns...)
    gone: list[int] = field(default_factory=lambda: [0] * WORDS)

    def process(self, totals: Totals) -> list[int]:
        """pylb's sums as a whole: its frontends', and those of frontends it had."""
        process = list(self.gone)
        for key, values in totals.items():
            if key[0] == "fe":
                _merge(process, values)
        return process

    def keep(self, unplaced: Totals) -> None:
        """What frontends no longer configured counted stays in pylb's own sums."""
        for key, values in unplaced.items():
            if key[0] == "fe" or key == GONE:
                _merge(self.gone, values)

    def totals(self, current: Shared, fields: Iterable[int] = EVERY) -> Totals:
        """Everything counted so far, by name (only `fields`, the others 0)."""
        fields = tuple(fields)
        totals = segment_totals(current, fields)
        for old in self.retiring:
            for key, values in segment_totals(old.shared, fields).items():
                if old.since is None:
                    _add(totals, key, values)
                elif key in old.since:
                    _add(totals, key, _since(values, old.since[key]))
        return totals

    def segments(self, current: Shared) -> list[Shared]:
        """Every segment whose workers may still have connections open."""
        return [current, *(old.shared for old in self.retiring)]

    def generations(self) -> list[int]:
        """The generations whose segments are retiring."""
        return [old.generation for old in self.retiring]

    def segment(self, generation: int) -> Shared | None:
        return next((old.shared for old in self.retiring if old.generation == generation), None)

    # -- reloads ----------------------------------------------------------------------

    def switch(self, old: Shared, old_generation: int) -> None:
        """A reload made a new segment current: `old` retires."""
        self.retiring.append(_Retiring(old_generation, old))

    def unswitch(self, old: Shared) -> None:
        """The reload failed before its workers served: `old` is current again."""
        self.retiring = [r for r in self.retiring if r.shared is not old]

    def retired(self, generation: int, current: Shared) -> None:
        """The last worker of `generation` exited: what its segment counted moves into the
        current one, and the segment goes."""
        for old in [r for r in self.retiring if r.generation == generation]:
            totals = segment_totals(old.shared)
            if old.since is not None:
                totals = {key: _since(values, old.since[key])
                          for key, values in totals.items() if key in old.since}
            self.keep(add_to_master_blocks(current, totals))
            self.retiring.remove(old)
            old.shared.close()

    # -- clear counters -----------------------------------------------------------------

    def clear(self, current: Shared) -> None:
        """`clear counters all`: every sum starts again from 0."""
        totals = segment_totals(current)
        for values in totals.values():
            for index in EVERY:
                values[index] = 0 if index in HIGHEST else -values[index]
        add_to_master_blocks(current, totals)
        for old in self.retiring:
            old.since = segment_totals(old.shared)
        self.gone = [0] * WORDS
        self.clear_max(current, LASTSESS)

    def clear_max(self, current: Shared, *also: int) -> None:
        """`clear counters`: the longest times seen start again (a worker writing a new
        maximum at that instant may keep its value)."""
        for shared in self.segments(current):
            words, layout = shared.words, shared.layout
            blocks = [(first, layout.slots + 1) for first in
                      [*layout.frontend_counters.values(), *layout.server_counters.values()]]
            blocks += [(first, 1) for first in layout.backend_counters.values()]
            for first, count in blocks:
                for index in (QTIME_MAX, CTIME_MAX, RTIME_MAX, TTIME_MAX, *also):
                    for at in range(first + index, first + count * WORDS, WORDS):
                        words[at] = 0
