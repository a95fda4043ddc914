"""YAML with line numbers: compose PyYAML's node tree and walk it ourselves.

A :class:`Value` is one node plus where it sits: the file, the dotted key path that leads to
it and the line of that key. Every error about a value is raised through it, so every
message carries ``file:line: key.path``.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import ConfigError

_TAG = "tag:yaml.org,2002:"
NULL_TAG = _TAG + "null"
STR_TAG = _TAG + "str"
MERGE_TAG = _TAG + "merge"
# Scalars whose Python value differs from their text; everything else is read as text.
_TYPED_TAGS = {NULL_TAG, _TAG + "bool", _TAG + "int", _TAG + "float"}


def compose(text: str, path: str) -> Node | None:
    """The node tree of one YAML document; syntax errors become ConfigError with a line."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        context_mark = exc.context_mark
        if exc.context and problem.startswith("but "):
            problem = f"{exc.context}, {problem}"
        elif exc.context and context_mark is not None and context_mark.line + 1 != line:
            problem += f" ({exc.context} on line {context_mark.line + 1})"
        if exc.context == "while scanning an alias":
            problem += '; quote values that start with *, like "*:80"'
        elif line is not None and re.search(r"\[[0-9A-Fa-f:.]*\]:", _line(text, line)):
            problem += '; quote values that start with [, like "[::1]:8080"'
        raise ConfigError(f"YAML syntax error: {problem}", path=path, line=line) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        message = f"YAML syntax error: unacceptable character #x{exc.character:04x}"
        raise ConfigError(message, path=path, line=line) from None
    except yaml.YAMLError as exc:  # pragma: no cover - PyYAML raises marked errors
        raise ConfigError(f"YAML syntax error: {exc}", path=path) from None


def _line(text: str, number: int) -> str:
    lines = text.splitlines()
    return lines[number - 1] if 0 < number <= len(lines) else ""


class Value:
    """A YAML node with its location, and the few questions validators ask of it."""

    __slots__ = ("node", "file", "keys", "key_line")

    def __init__(
        self, node: Node, file: str, keys: tuple[str, ...] = (), key_line: int | None = None
    ) -> None:
        self.node = node
        self.file = file
        self.keys = keys
        self.key_line = key_line if key_line is not None else self.line

    @property
    def line(self) -> int:
        """1-based line where the value starts."""
        return int(self.node.start_mark.line) + 1

    @property
    def dotted(self) -> str:
        return ".".join(self.keys)

    def error(self, message: str, *, line: int | None = None) -> ConfigError:
        """A ConfigError at this value (or at ``line``), for the caller to raise."""
        at = line if line is not None else self.line
        return ConfigError(message, path=self.file, line=at, key=self.dotted or None)

    # -- scalars -------------------------------------------------------------------------

    @property
    def is_scalar(self) -> bool:
        return isinstance(self.node, ScalarNode)

    @property
    def is_null(self) -> bool:
        return isinstance(self.node, ScalarNode) and self.node.tag == NULL_TAG

    @property
    def python(self) -> Any:
        """The scalar as YAML types it: None, bool, int, float, or else its text."""
        node = self.node
        if not isinstance(node, ScalarNode):
            raise TypeError("not a scalar")
        if node.tag not in _TYPED_TAGS:
            return node.value
        try:
            return SafeConstructor().construct_object(node)
        except (ValueError, yaml.YAMLError):
            raise self.error(f"invalid {node.tag.removeprefix(_TAG)} {node.value!r}") from None

    @property
    def text(self) -> str | None:
        """The scalar as written (after YAML quoting), None for null: for text-like keys,
        so ``cookie: 1`` means the string "1"."""
        if self.is_null:
            return None
        if not isinstance(self.node, ScalarNode):
            raise TypeError("not a scalar")
        return str(self.node.value)

    def describe(self) -> str:
        """How the value reads in an error message: 'fast', 5, true, null, a list, a mapping."""
        node = self.node
        if isinstance(node, MappingNode):
            return "a mapping"
        if isinstance(node, SequenceNode):
            return "a list"
        if node.tag == NULL_TAG:
            return "null"
        if node.tag == STR_TAG:
            return repr(node.value)
        return str(node.value)

    # -- collections ---------------------------------------------------------------------

    def elements(self) -> list[Value]:
        """Items of a list (same key path; each has its own line)."""
        if not isinstance(self.node, SequenceNode):
            raise self.error(f"expected a list, got {self.describe()}")
        return [Value(item, self.file, self.keys) for item in self.node.value]

    def items(self) -> list[tuple[str, Value]]:
        """Key/value pairs of a mapping in document order; null counts as an empty mapping.

        Duplicate keys are errors. YAML merge keys (``<<: *anchor``) are expanded, keys
        written in the mapping itself winning over merged ones.
        """
        if self.is_null:
            return []
        if not isinstance(self.node, MappingNode):
            raise self.error(f"expected a mapping, got {self.describe()}")
        return [
            (name, Value(value, self.file, (*self.keys, name), key.start_mark.line + 1))
            for name, key, value in self._pairs(self.node, {id(self.node)})
        ]

    def _pairs(self, node: MappingNode, active: set[int]) -> list[tuple[str, Node, Node]]:
        own: dict[str, Node] = {}
        for key, _ in node.value:
            if key.tag == MERGE_TAG:
                continue
            name = self._key_name(key)
            if name in own:
                first = own[name].start_mark.line + 1
                where = Value(key, self.file, (*self.keys, name))
                raise where.error(f"duplicate key (first set on line {first})")
            own[name] = key
        taken = set(own)
        pairs: list[tuple[str, Node, Node]] = []
        for key, value in node.value:
            if key.tag != MERGE_TAG:
                pairs.append((self._key_name(key), key, value))
                continue
            sources = value.value if isinstance(value, SequenceNode) else [value]
            for source in sources:
                if not isinstance(source, MappingNode) or id(source) in active:
                    raise Value(key, self.file, self.keys).error(
                        "<< must merge a mapping (or a list of them) that does not contain itself"
                    )
                for name, k, v in self._pairs(source, active | {id(source)}):
                    if name not in taken:
                        taken.add(name)
                        pairs.append((name, k, v))
        return pairs

    def _key_name(self, key: Node) -> str:
        if not isinstance(key, ScalarNode):
            raise Value(key, self.file, self.keys).error("mapping keys must be plain names")
        return str(key.value)
