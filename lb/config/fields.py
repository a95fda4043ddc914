"""Table-driven validation: a schema is a dict of YAML key -> Field.

Reading a mapping against a schema gives a :data:`Section`: only the keys the file sets,
each parsed and remembered with its location. :func:`resolve` then layers sections
(``defaults`` under a frontend, default-server under a server, ...) and fills in the
built-in defaults from the table.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .values import NAME_RE, Parser
from .yamltree import Value


@dataclass(frozen=True, slots=True)
class Field:
    """One key of a section.

    parse      validator: Value -> Python value (raises ConfigError)
    default    value when no layer sets the key (``factory`` computes it instead)
    required   the mapping must set the key itself
    attr       dataclass attribute; "" means the key with - turned into _; None means none
    merge      the value is a Section and layers merge key by key (timeout, default-server)
    inherit    the key may be set in ``defaults`` and is inherited from there
    """

    parse: Parser
    default: Any = None
    required: bool = False
    attr: str | None = ""
    merge: bool = False
    inherit: bool = False
    factory: Callable[[], Any] | None = None

    @property
    def may_be_none(self) -> bool:
        """None is a legal value (the default is none), so null in the file means none."""
        unset = self.default is None and self.factory is None
        return unset and not self.required and not self.merge

    def initial(self) -> Any:
        if self.factory is not None:
            return self.factory()
        return {} if self.merge and self.default is None else self.default


Schema = Mapping[str, Field]


@dataclass(frozen=True, slots=True)
class Given:
    """A parsed value and where it was written."""

    value: Any
    at: Value


Section = dict[str, Given]


def unknown_key(key: str, schema: Schema) -> str:
    close = difflib.get_close_matches(key, list(schema), n=1)
    return f"unknown key (did you mean {close[0]}?)" if close else "unknown key"


def read_section(v: Value, schema: Schema) -> Section:
    """The keys mapping ``v`` sets, validated against ``schema``."""
    section: Section = {}
    for key, child in v.items():
        field = schema.get(key)
        if field is None:
            raise child.error(unknown_key(key, schema), line=child.key_line)
        if child.is_null and field.may_be_none:
            section[key] = Given(None, child)  # explicit "none", overriding defaults
        else:
            section[key] = Given(field.parse(child), child)
    for key, field in schema.items():
        if field.required and key not in section:
            raise v.error(f"missing required key {key}", line=v.key_line)
    return section


def resolve(schema: Schema, *layers: Section) -> tuple[dict[str, Any], dict[str, Value]]:
    """Final values by YAML key (lowest layer first, last wins; merge fields merge key by
    key), and where each value that was set came from."""
    values: dict[str, Any] = {}
    origin: dict[str, Value] = {}
    for key, field in schema.items():
        value = field.initial()
        for layer in layers:
            if key in layer:
                given = layer[key]
                value = {**value, **given.value} if field.merge else given.value
                origin[key] = given.at
        values[key] = value
    return values, origin


def inherited(schema: Schema, defaults: Section) -> Section:
    """The part of the ``defaults`` section that applies to sections of ``schema``."""
    return {k: g for k, g in defaults.items() if k in schema and schema[k].inherit}


def attrs(schema: Schema, values: dict[str, Any]) -> dict[str, Any]:
    """Resolved values renamed to dataclass attributes (keys with attr=None dropped)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        attr = schema[key].attr
        if attr is not None:
            out[attr or key.replace("-", "_")] = value
    return out


def build(schema: Schema, cls: Callable[..., Any], *layers: Section) -> Any:
    """``cls`` made from the layered sections, all of whose keys map to attributes."""
    return cls(**attrs(schema, resolve(schema, *layers)[0]))


# -- parsers for nested mappings, used inside the tables ------------------------------------


def record(schema: Schema, cls: Callable[..., Any]) -> Parser:
    """A mapping that becomes one dataclass (stats, http-check, cookie)."""
    return lambda v: build(schema, cls, read_section(v, schema))


def partial(schema: Schema) -> Parser:
    """A mapping kept as a Section, to be layered later (timeout, default-server)."""
    return lambda v: read_section(v, schema)


@dataclass(frozen=True, slots=True)
class Named:
    """One entry of frontends/backends/servers: its section, and the Value of its mapping
    (``at.key_line`` is the line of the name)."""

    section: Section
    at: Value


def named(schema: Schema, what: str, *, at_least_one: bool = False) -> Parser:
    """A mapping of NAME -> section (frontends, backends, servers)."""

    def parse(v: Value) -> dict[str, Named]:
        out: dict[str, Named] = {}
        for key, child in v.items():
            if not NAME_RE.fullmatch(key):
                message = f"invalid {what} name (use letters, digits and - _ . :)"
                raise child.error(message, line=child.key_line)
            out[key] = Named(read_section(child, schema), child)
        if at_least_one and not out:
            raise v.error(f"at least one {what} is required", line=v.key_line)
        return out

    return parse

