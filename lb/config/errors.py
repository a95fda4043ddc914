"""The one exception the configuration subsystem raises."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem, worded for the operator.

    ``str(err)`` is one line: ``<path>:<line>: <dotted key path>: <message>``, for example
    ``conf/lb.cfg:12: frontends.www.bnd: unknown key (did you mean bind?)``. Parts that do
    not apply are left out: a missing file has no line, a YAML syntax error has no key.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.line = line
        self.key = key

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = self.path if self.line is None else f"{self.path}:{self.line}"
        elif self.line is not None:
            where = f"line {self.line}"
        parts = [part for part in (where, self.key) if part]
        return ": ".join([*parts, self.message])
