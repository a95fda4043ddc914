"""The master's stick tables: one shared-memory table per proxy that declares one.

A table is named after its proxy (a backend's `stick-table` for `stick-on`, a frontend's
or a backend's for `track-sc`). The master creates each table's memory once; a reload, a
respawned worker and a process taking over get the same descriptor, so entries stay
where they are whatever their number. Only a change of the table's shape (key type or
length, size, stored data) needs a new table: the entries then migrate into it.
"""

from __future__ import annotations

from collections.abc import Iterator

from lb import config
from lb.log import log
from lb.sticktable import Shape, StickTable

PURGE_STRIPES = 64  # stripes swept for expired entries per housekeeping tick and table
RECOUNT_EVERY = 50  # housekeeping ticks between two recounts of the entries in use


def declared(cfg: config.Config) -> dict[str, tuple[config.StickTable, list[str]]]:
    """Every table the configuration declares: its settings and its servers' names."""
    out: dict[str, tuple[config.StickTable, list[str]]] = {}
    for name, frontend in cfg.frontends.items():
        if frontend.stick_table is not None:
            out[name] = (frontend.stick_table, [])
    for name, backend in cfg.backends.items():
        if backend.stick_table is not None:
            out[name] = (backend.stick_table, [s.name for s in backend.servers])
    return out


class Tables:
    """The tables of the running configuration, as the master holds them."""

    def __init__(self, cfg: config.Config, inherited: dict[str, StickTable] | None = None):
        self.tables: dict[str, StickTable] = dict(inherited or {})
        self._ticks = 0
        planned = self.plan(cfg)
        self.release(self.tables, planned)  # inherited tables this configuration lacks
        self.use(planned)
        self.set_expiry(cfg)

    def plan(self, cfg: config.Config) -> dict[str, StickTable]:
        """The tables `cfg` needs, changing nothing in use: a table whose shape is
        unchanged is the very same; one whose shape changed is a new table holding its
        entries (the old one stays until `release`); one new in `cfg` is created."""
        planned: dict[str, StickTable] = {}
        for name, (settings, servers) in declared(cfg).items():
            table = self.tables.get(name)
            if table is not None and table.shape != Shape.of(settings):
                table = self._migrate(name, table, settings, servers)
            elif table is None:
                table = StickTable.create(name, settings)
            table.register(servers)
            planned[name] = table
        return planned

    def use(self, planned: dict[str, StickTable]) -> None:
        """Make `planned` (from `plan`) the tables in force, closing nothing: a reload
        that fails goes back to the previous ones."""
        self.tables = planned

    @staticmethod
    def release(old: dict[str, StickTable], kept: dict[str, StickTable]) -> None:
        """Close the tables of `old` that `kept` does not have (workers keep their own
        mapping): the previous ones after a reload, the planned ones after a failed one."""
        in_use = {id(t) for t in kept.values()}
        for table in old.values():
            if id(table) not in in_use:
                table.close()

    def set_expiry(self, cfg: config.Config) -> None:
        """Expiry is not part of a table's shape: each process follows its configuration."""
        for name, (settings, _servers) in declared(cfg).items():
            table = self.tables.get(name)
            if table is not None:
                table.expire_ms = int(settings.expire * 1000) if settings.expire else 0

    @staticmethod
    def _migrate(
        name: str, old: StickTable, settings: config.StickTable, servers: list[str]
    ) -> StickTable:
        table = StickTable.create(name, settings)
        table.register(servers)
        moved = table.migrate_from(old)
        log.info("stick table %s changed shape (%s -> %s): %d entries moved", name,
                 _describe(old.shape), _describe(table.shape), moved)
        return table

    def get(self, name: str) -> StickTable | None:
        return self.tables.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tables)

    def descriptors(self) -> tuple[list[str], list[int]]:
        """Names and descriptors, in the same order, for a worker or a new process."""
        return list(self.tables), [t.fd for t in self.tables.values()]

    def housekeeping(self) -> None:
        """Expired entries give their room back, a few stripes at a time; now and then
        the count of entries in use is checked against the stripes'."""
        self._ticks += 1
        for table in self.tables.values():
            table.purge(PURGE_STRIPES)
            if self._ticks % RECOUNT_EVERY == 0:
                table.recount()


def _describe(shape: Shape) -> str:
    stored = ",".join(name for name, _ in shape.store) or "no data"
    return f"type {shape.type} len {shape.key_len} size {shape.size} {stored}"


def open_inherited(names: list[str], fds: list[int]) -> dict[str, StickTable]:
    """Tables handed over by the process we take over from; ones that do not open (not a
    pylb table of this version) are dropped with a warning."""
    out: dict[str, StickTable] = {}
    for name, fd in zip(names, fds, strict=True):
        try:
            out[name] = StickTable(fd, name)
        except (ValueError, OSError) as err:
            log.warning("stick table %s from the old process is not usable: %s", name, err)
    return out
