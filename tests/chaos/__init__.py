"""Chaos suite: random reloads, faults and peers under mixed load; the master stays up.

- harness.py: the world (backends, pylb processes, the configuration grammar, the load, the
  steps and the invariants), usable without Hypothesis;
- machine.py: the Hypothesis state machine that draws the steps;
- test_chaos.py: the short, deterministic run that `make test` includes;
- test_regressions.py: every failing sequence found, replayed step by step with its seed.

bench/chaos.py is the long run (`--duration`, `--seed`) that prints a table.
"""
