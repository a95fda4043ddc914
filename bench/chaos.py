#!/usr/bin/env python3
"""The long chaos run: tests/chaos's state machine for minutes, then a table.

One Hypothesis run, seeded with `--seed`: each example is a new world (pylb, three echo
backends, a counting server behind `maxconn: 2`, background clients of every kind) and up
to `--steps` random steps (reloads by every method with a configuration change, invalid
reloads, `-sf` takeovers, worker and master `kill -9`, stats socket commands, stalled
socket clients, a paused frontend), the invariants checked after each. Examples follow
one another until `--duration` seconds have passed (the world under way ends at its next
step then). Unlike the test, a broken invariant does not stop the run: it is counted and
the run goes on.

    .venv/bin/python bench/chaos.py --duration 120 --seed 7

Each world's steps go to stderr as it closes; the table goes to stdout. The same seed
draws the same steps (tests/chaos/machine.py's `plan` lists them without running
anything); tests/chaos/test_regressions.py replays failing sequences as plain tests.
Exit status: 0 nothing but allowed failures, 1 real failures or broken invariants, 130
interrupted.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # tests/backends.py, tests/chaos (before bench/)

from chaos.harness import Stats  # noqa: E402
from chaos.machine import RunOver, chaos_settings, machine_factory  # noqa: E402
from hypothesis.stateful import run_state_machine_as_test  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300.0,
                        help="seconds of chaos (default 300)")
    parser.add_argument("--seed", type=int, default=1, help="run seed (default 1)")
    parser.add_argument("--steps", type=int, default=30,
                        help="most steps per round (default 30)")
    parser.add_argument("--keep-tmp", action="store_true",
                        help="keep the working directories (logs, configurations)")
    return parser.parse_args(argv)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def report(stats: Stats, args: argparse.Namespace, elapsed: float) -> str:
    out = [f"chaos: seed {args.seed}, {elapsed:.0f} s, {stats.worlds} worlds (examples),"
           f" {sum(stats.steps.values())} steps of at most {args.steps} per world", ""]
    out.append(table(
        [[kind, str(n), f"{stats.step_time[kind] / n:.2f}"]
         for kind, n in sorted(stats.steps.items())],
        ["step", "count", "mean s"]))
    out.append("")
    failed: dict[str, list[int]] = {}  # client -> [allowed, real]
    for (_step, client, _reason, label), n in stats.failures.items():
        failed.setdefault(client, [0, 0])[label == "REAL"] += n
    rows = []
    for client in sorted(set(stats.ok) | set(failed)):
        f = failed.get(client, [0, 0])
        rows.append([client, stats.ok[client] + sum(f), stats.ok[client], *f])
    rows.append(["total", *(sum(r[i] for r in rows) for i in range(1, 5))])
    out.append(table([[str(c) for c in r] for r in rows],
                     ["requests", "sent", "answered", "failed (allowed)", "failed (REAL)"]))
    out.append("")
    if stats.failures:
        out.append(table(
            [[step, client, reason, label, str(n)]
             for (step, client, reason, label), n in sorted(stats.failures.items())],
            ["failures: during step", "client", "why", "allowed as", "count"]))
    else:
        out.append("failures: none")
    out.append("")
    if stats.violations:
        out.append(f"broken invariants: {len(stats.violations)}")
        seen: dict[str, int] = {}
        for v in stats.violations:
            first = re.sub(r"\d+", "N", v.splitlines()[0])
            seen[first] = seen.get(first, 0) + 1
            if seen[first] <= 3:  # the first few of each kind in full
                first_line, *rest = v.splitlines()
                out.append(f"  - {first_line}")
                out += [f"      {line}" for line in rest[:6]]
        out.append("")
        out.append(table([[str(n), text] for text, n in sorted(seen.items(), key=lambda i: -i[1])],
                         ["count", "broken invariant (numbers as N)"]))
    else:
        out.append("broken invariants: none")
    return "\n".join(out)


def _chain(exc: BaseException | None) -> list[BaseException]:
    found = []
    while exc is not None and len(found) < 20:
        found.append(exc)
        exc = exc.__cause__ or exc.__context__
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stats = Stats(echo=True)
    base = Path(tempfile.mkdtemp(prefix="pylb-chaos-"))
    started = time.monotonic()
    factory = machine_factory(base, args.seed, stats=stats, strict=False, max_takeovers=3,
                              max_master_kills=2, deadline=started + args.duration)
    try:
        run_state_machine_as_test(factory, settings=chaos_settings(1_000_000, args.steps,
                                                                   quiet=True))
    except RunOver:
        pass
    except Exception as exc:
        if not any(isinstance(e, RunOver) for e in _chain(exc)):
            stats.violations.append(f"the run stopped: {type(exc).__name__}: {exc}")
            traceback.print_exc()
        # else: Hypothesis replaying the example that ended the run, and seeing it end
        # at another point
    except KeyboardInterrupt:
        print(report(stats, args, time.monotonic() - started))
        return 130
    finally:
        if args.keep_tmp:
            print(f"working directories kept in {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(report(stats, args, time.monotonic() - started))
    real = sum(n for key, n in stats.failures.items() if key[3] == "REAL")
    return 1 if real or stats.violations else 0


if __name__ == "__main__":
    sys.exit(main())
