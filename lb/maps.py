"""The master's maps: each map file indexed once in shared memory, edits on top.

A map's file is indexed by the master into a memfd (`lb.mapstore.MapIndex`) that every
worker maps read-only; what operators change at run time (`add/set/del/clear map`) is a
small overlay that travels as edits. A new worker, a new generation or a process taking
over gets the descriptor and the edits: its start costs the same for ten lines or a
million. A reload keeps a map whose file is unchanged, edits included; a file that changed
is read again and, as in HAProxy, replaces the map and its runtime edits.
"""

from __future__ import annotations

import asyncio
from typing import Any

from lb import config
from lb.log import log
from lb.mapstore import MapIndex, SharedMap

Maps = dict[str, SharedMap]


def load(cfg: config.Config, inherited: dict[str, tuple[MapIndex, dict[str, Any]]]) -> Maps:
    """The maps of `cfg` at start; those a process we take over from hands us are kept
    when their file is unchanged."""
    out: Maps = {}
    for name, path in cfg.maps.items():
        given = inherited.pop(name, None)
        if given is not None and given[0].matches_file(path):
            out[name] = SharedMap.with_edits(given[0], given[1])
            continue
        if given is not None:
            given[0].close()
        out[name] = SharedMap(MapIndex.build(path))
    for index, _edits in inherited.values():
        index.close()
    return out


async def reload(cfg: config.Config, current: Maps) -> Maps:
    """The maps of a new configuration: a current map whose file is unchanged as it is,
    the others (re)read off the loop's thread. Raises OSError or ValueError."""
    out: Maps = {}
    for name, path in cfg.maps.items():
        known = current.get(name)
        base = known.base if known is not None else None
        if base is not None and base.matches_file(path):
            out[name] = known  # type: ignore[assignment]
            continue
        index = await asyncio.to_thread(MapIndex.build, path)
        if known is not None:
            log.info("map %s: %s changed, read again (%d entries)", name, path, len(index))
        out[name] = SharedMap(index)
    return out


def release(old: Maps, kept: Maps) -> None:
    """Close the indexes of `old` that `kept` no longer uses (workers keep their own)."""
    in_use = {id(m.base) for m in kept.values()}
    for shared in old.values():
        if shared.base is not None and id(shared.base) not in in_use:
            shared.base.close()


def descriptors(maps: Maps) -> tuple[dict[str, dict[str, Any]], list[int]]:
    """Each map's edits, and its index's descriptor in the same order (every map the
    master holds has an index)."""
    edits = {name: shared.edits() for name, shared in maps.items()}
    return edits, [shared.base.fd for shared in maps.values()]  # type: ignore[union-attr]


def opened(edits: dict[str, dict[str, Any]], fds: list[int]) -> Maps:
    """The maps a worker (or a process taking over) received."""
    return {
        name: SharedMap.with_edits(MapIndex.open(fd), changes)
        for (name, changes), fd in zip(edits.items(), fds, strict=True)
    }


def edit(shared: SharedMap, message: dict[str, Any]) -> bool:
    """Apply one runtime edit (`map-edit` message); False if the key was not there."""
    kind, key, value = message["kind"], message.get("key", ""), message.get("value", "")
    if kind == "add":
        shared.add(key, value)
        return True
    if kind == "set":
        return shared.set(key, value)
    if kind == "del":
        return shared.delete(key)
    shared.clear()
    return True
