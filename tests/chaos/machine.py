"""The Hypothesis state machine: random sequences of the World's steps, the invariants
checked after each one.

`machine_factory(base_dir, seed, ...)` gives a factory for
`hypothesis.stateful.run_state_machine_as_test`; every example runs in a new World (its own
pylb, backends and clients) under `base_dir`. The seed decides the steps: `plan(seed, ...)`
lists them without running anything.

There is one rule, `step`, whose first argument is the kind of step, drawn from a weighted
list: with one rule per kind, Hypothesis's swarm testing would leave most examples with a
few kinds only (a world of nothing but worker kills), where pylb's reloads are what the
suite is about.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, Phase, Verbosity, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from .harness import MUTATIONS, TYPOS, Stats, World

RELOAD_METHODS = ("SIGUSR2", "SIGHUP", "socket")
# Weights, out of 20: reloads are the common case; a takeover (a new process) and a
# master's kill -9 (a restart) are rarer, and bounded per world.
KINDS = (("reload",) * 8 + ("takeover",) + ("invalid-reload",) * 2 + ("kill-worker",) * 2
         + ("kill-master",) + ("stats",) * 3 + ("stall",) + ("pause",) * 2)


class RunOver(Exception):
    """The run's deadline has passed (raised as the next example starts)."""


class ChaosMachine(RuleBasedStateMachine):
    base_dir: Path
    stats: Stats
    strict = True
    max_takeovers = 2
    max_master_kills = 1
    deadline: float | None = None  # time.monotonic() after which the run is over
    counter = itertools.count()
    world_class: type = World

    def __init__(self) -> None:
        super().__init__()
        n = next(self.counter)
        self.world = self.world_class(self.base_dir / f"world{n}", seed=n, stats=self.stats,
                                      strict=self.strict)
        self.started = False
        self.skip = False

    @initialize(example=st.integers(0, 2**16 - 1))
    def start(self, example: int) -> None:
        """Hypothesis tries the simplest example first, whatever the seed (every choice
        the smallest: the same step again and again): skipped, so that a seed's examples
        are all random ones. The world itself starts with the first step."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise RunOver
        self.skip = example == 0

    @rule(kind=st.sampled_from(KINDS), method=st.sampled_from(RELOAD_METHODS),
          mutation=st.sampled_from(MUTATIONS), n=st.integers(0, 999), flag=st.booleans())
    def step(self, kind: str, method: str, mutation: str, n: int, flag: bool) -> None:
        """One step of `kind`; the other arguments are its details (`n` picks among the
        possibilities: a server, a typo, a command)."""
        if self.skip or (self.deadline is not None and time.monotonic() >= self.deadline):
            return  # the world under way ends with no more steps
        world = self.world
        if not self.started:
            self.started = True
            world.start()
        if kind == "takeover" and world.takeovers >= self.max_takeovers:
            kind = "reload"
        if kind == "kill-master" and world.master_kills >= self.max_master_kills:
            kind = "reload"
        if kind == "reload":
            world.step_reload(method, mutation, n)
        elif kind == "takeover":
            world.step_takeover(mutation, n)
        elif kind == "invalid-reload":
            world.step_invalid_reload(method, n % len(TYPOS))
        elif kind == "kill-worker":
            world.step_kill_worker(n % 2)
        elif kind == "kill-master":
            world.step_kill_master()
        elif kind == "stats":
            world.step_stats(World.STATS_COMMANDS[n % len(World.STATS_COMMANDS)], n)
        elif kind == "stall":
            world.step_stall("handover" if flag else "silent")
        else:
            world.step_pause(flag)

    @invariant()
    def invariants(self) -> None:
        if self.started:
            self.world.check()

    def teardown(self) -> None:
        if self.started:
            self.world.close()


def machine_factory(base_dir: Path, seed: int, *, stats: Stats | None = None,
                    strict: bool = True, max_takeovers: int = 2,
                    max_master_kills: int = 1,
                    deadline: float | None = None,
                    world_class: type = World) -> Callable[[], ChaosMachine]:
    """A factory for run_state_machine_as_test, seeded."""
    namespace = {"base_dir": base_dir, "stats": stats or Stats(), "strict": strict,
                 "max_takeovers": max_takeovers, "max_master_kills": max_master_kills,
                 "deadline": deadline, "counter": itertools.count(),
                 "world_class": world_class}
    machine = type("ChaosMachine", (ChaosMachine,), namespace)
    machine._hypothesis_internal_use_seed = seed  # type: ignore[attr-defined]
    return machine  # type: ignore[return-value]


def chaos_settings(examples: int, steps: int, *, quiet: bool = False) -> settings:
    """Real processes: no deadline, no shrinking (a replay takes the steps from the
    report), no example database; the seed alone decides the steps. `quiet`: Hypothesis
    prints nothing (the bench, whose run ends with an exception)."""
    return settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                    database=None, phases=(Phase.explicit, Phase.generate),
                    suppress_health_check=list(HealthCheck), print_blob=False,
                    report_multiple_bugs=False,
                    verbosity=Verbosity.quiet if quiet else Verbosity.normal)


class PlanWorld:
    """A world that only writes down the steps it is asked for: what a seed will do."""

    plans: list[list[str]] = []

    def __init__(self, workdir: Path, **_options: object) -> None:
        self.steps: list[str] = []
        self.takeovers = self.master_kills = 0

    def start(self) -> None:
        self.plans.append(self.steps)

    def check(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Callable[..., None]:
        if not name.startswith("step_"):
            raise AttributeError(name)

        def step(*args: object) -> None:
            self.steps.append(f"{name[5:]}{args}")
            if name == "step_takeover":
                self.takeovers += 1
            elif name == "step_kill_master":
                self.master_kills += 1

        return step


def plan(seed: int, examples: int, steps: int, **options: object) -> list[list[str]]:
    """The steps each example of `seed` draws, without running anything."""
    PlanWorld.plans = []
    factory = machine_factory(Path("/nonexistent"), seed, world_class=PlanWorld,
                              **options)  # type: ignore[arg-type]
    run_state_machine_as_test(factory, settings=chaos_settings(examples, steps))
    return PlanWorld.plans
