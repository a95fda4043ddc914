"""pylb configuration: YAML in, validated frozen dataclasses out.

    from lb.config import load, ConfigError
    cfg = load("conf/lb.cfg")       # raises ConfigError: "conf/lb.cfg:12: frontends.www.bnd: ..."

Modules: ``model`` (the dataclasses), ``yamltree`` (YAML nodes with line numbers),
``values`` (durations, sizes, addresses, validators), ``fields`` (the table machinery),
``schema`` (one table per section), ``loader`` (load/loads, defaults, cross checks).
"""

from .errors import ConfigError
from .loader import load, loads
from .model import (
    Address,
    Backend,
    Config,
    Cookie,
    Frontend,
    Global,
    HttpCheck,
    PrometheusPage,
    Server,
    StatsPage,
    StatsSocket,
    StickTable,
    Timeouts,
)
from .values import parse_bind_address, parse_duration, parse_server_address, parse_size

__all__ = [
    "Address",
    "Backend",
    "Config",
    "ConfigError",
    "Cookie",
    "Frontend",
    "Global",
    "HttpCheck",
    "Server",
    "PrometheusPage",
    "StatsPage",
    "StatsSocket",
    "StickTable",
    "Timeouts",
    "load",
    "loads",
    "parse_bind_address",
    "parse_duration",
    "parse_server_address",
    "parse_size",
]
