"""pylb's HTTP rules: HAProxy's acl, http-request, use_backend, monitor-uri and errorfile.

    rules = FrontendRules.compile(cfg.frontends["www"], cfg.maps, backends=cfg.backends)
    decision = rules.evaluate(request, runtime)   # per request; no IO, no parsing

``syntax`` turns the configuration's strings into lb.config.model dataclasses at load time
(lb.config calls it, so errors carry file:line); ``engine`` compiles and evaluates them.
"""

from .engine import Decision, FrontendRules, Request, Runtime, load_map

__all__ = ["Decision", "FrontendRules", "Request", "Runtime", "load_map"]
