"""pylb's HTTP rules: HAProxy's acl, tcp-request connection, http-request, use_backend,
monitor-uri and errorfile, with stick counters (track-sc, sc_* and src_* fetches).

    rules = FrontendRules.compile(cfg.frontends["www"], cfg.maps, backends=cfg.backends)
    accepted, counters = rules.connect(client_ip, runtime)   # per connection
    decision = rules.evaluate(request, runtime, counters)    # per request; no IO, no parsing

``syntax`` turns the configuration's strings into lb.config.model dataclasses at load time
(lb.config calls it, so errors carry file:line); ``engine`` compiles and evaluates them.
"""

from .engine import Decision, FrontendRules, Request, Runtime, StickCounters, Table, load_map

__all__ = ["Decision", "FrontendRules", "Request", "Runtime", "StickCounters", "Table",
           "load_map"]
