"""Tests for lb.balance: every algorithm on real Backend objects over a real Shared segment,
as workers use them. Two Backend objects on one Shared with different slots stand for two
worker processes. No sockets needed."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lb import balance, h1
from lb.backend import Backend, Server
from lb.balance import Context, smooth_order
from lb.config import loads
from lb.shared import DOWN, DRAIN, MAINT, READY, SRV_ADMIN, SRV_OP, SRV_WEIGHT, UP, Shared

REPO = Path(__file__).resolve().parents[1]
ALGORITHMS = ["roundrobin", "static-rr", "leastconn", "source", "uri", "hdr(X-User)", "random"]


class Farm:
    """One configuration, its shared memory, and the master's hand on server states."""

    def __init__(self, balance_: str, servers: dict[str, str]) -> None:
        lines = [
            "frontends:",
            "  web: {bind: '127.0.0.1:8080', default_backend: app}",
            "backends:",
            "  app:",
            f"    balance: {balance_}",
            "    servers:",
        ]
        for port, (name, options) in enumerate(servers.items(), 9001):
            extra = f", {options}" if options else ""
            lines.append(f"      {name}: {{address: '127.0.0.1:{port}'{extra}}}")
        self.cfg = loads("\n".join(lines) + "\n")
        self.shared = Shared.create(self.cfg)

    def worker(self, slot: int = 0) -> Backend:
        return Backend(self.cfg.backends["app"], self.shared, slot)

    def set(self, name: str, *, op: int | None = None, admin: int | None = None,
            weight: int | None = None, notify: bool = True) -> None:
        """What the master does on a check result or a runtime command."""
        base = self.shared.layout.servers[("app", name)]
        words = self.shared.words
        if op is not None:
            words[base + SRV_OP] = op
        if admin is not None:
            words[base + SRV_ADMIN] = admin
        if weight is not None:
            words[base + SRV_WEIGHT] = weight
        if notify:
            self.shared.changed(base)


def server(backend: Backend, name: str) -> Server:
    return next(s for s in backend.servers if s.name == name)


def name_of(picked: Server | None) -> str:
    return "-" if picked is None else picked.name


def picks(backend: Backend, count: int, context: Context | None = None,
          exclude: Server | None = None) -> str:
    """The names of `count` successive picks, as one string (server names are letters)."""
    context = context or Context(b"10.0.0.1", b"/")
    return "".join(name_of(backend.pick(context, exclude)) for _ in range(count))


def request(*headers: bytes, target: bytes = b"/") -> h1.RequestHead:
    """A real request head, as the HTTP proxy hands it to the balancer."""
    data = b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n" + b"".join(h + b"\r\n" for h in headers)
    events = h1.RequestReader().feed(data + b"\r\n")
    kind, head = events[0]
    assert kind == h1.HEAD and isinstance(head, h1.RequestHead)
    return head


def nginx_reference(weights: list[int]) -> list[int]:
    """Smooth weighted round-robin spelled out step by step, to check the fast version."""
    total = sum(weights)
    current = [0] * len(weights)
    order = []
    for _ in range(total):
        current = [c + w for c, w in zip(current, weights, strict=True)]
        best = current.index(max(current))
        current[best] -= total
        order.append(best)
    return order


# -- roundrobin -------------------------------------------------------------------------------


def test_roundrobin_sequence_is_shared_by_two_workers() -> None:
    farm = Farm("roundrobin", {"a": "", "b": "", "c": ""})
    one, two = farm.worker(0), farm.worker(1)
    seq = "".join(name_of(w.pick(Context(b"1.1.1.1"))) for w in [one, two] * 6)
    assert seq == "abcabcabcabc"
    # each worker alone sees every other turn of the one shared sequence
    assert picks(one, 3) == "abc"
    assert picks(two, 2) + picks(one, 1) == "abc"


def test_roundrobin_smooth_weights() -> None:
    farm = Farm("roundrobin", {"a": "weight: 3", "b": "weight: 1"})
    assert picks(farm.worker(), 12) == "aaba" * 3
    farm = Farm("roundrobin", {"a": "weight: 5", "b": "", "c": ""})
    assert picks(farm.worker(), 14) == "aabacaa" * 2


def test_roundrobin_weights_reduced_by_common_divisor() -> None:
    farm = Farm("roundrobin", {"a": "weight: 20", "b": "weight: 10"})
    assert picks(farm.worker(), 6) == "aba" * 2


def test_smooth_order_matches_step_by_step_reference() -> None:
    rng = random.Random(42)
    for _ in range(300):
        weights = [rng.choice([0, 1, 1, 2, 3, 4, 5, 7, 10]) for _ in range(rng.randint(1, 7))]
        names = list(range(len(weights)))
        got = smooth_order(names, weights)  # type: ignore[arg-type]
        live = [i for i, w in enumerate(weights) if w > 0]
        if not live:
            assert got == []
            continue
        divisor = math.gcd(*(weights[i] for i in live))
        expected = [live[i] for i in nginx_reference([weights[i] // divisor for i in live])]
        assert got == expected, weights


def test_big_uneven_backend_order_stays_exact_and_spread() -> None:
    rng = random.Random(7)
    weights = [rng.randint(1, 256) for _ in range(120)]
    weights[0] = 3  # keep the gcd at 1
    weights[1] = 256
    assert sum(weights) * len(set(weights)) > balance.SMOOTH_BUDGET  # the sorted spread
    order = smooth_order(list(range(120)), weights)  # type: ignore[arg-type]
    total = sum(weights)
    assert Counter(order) == dict(enumerate(weights))
    for index, weight in enumerate(weights):
        turns = [i for i, s in enumerate(order) if s == index]
        gaps = [b - a for a, b in zip(turns, turns[1:] + [turns[0] + total], strict=True)]
        assert max(gaps) <= total / weight + len(weights), (index, weight)


def test_weight_zero_gets_no_new_clients() -> None:
    farm = Farm("roundrobin", {"a": "", "b": "weight: 0", "c": ""})
    assert picks(farm.worker(), 6) == "acacac"


@pytest.mark.parametrize(
    "change", [{"op": DOWN}, {"admin": MAINT}, {"admin": DRAIN}, {"weight": 0}],
    ids=["down", "maint", "drain", "weight0"],
)
def test_unselectable_server_skipped_without_skewing_the_others(change: dict[str, int]) -> None:
    farm = Farm("roundrobin", {"a": "", "b": "", "c": ""})
    backend = farm.worker()
    assert picks(backend, 3) == "abc"
    farm.set("b", **change)
    # the others keep equal shares: not a c c a c c (b's turns handed to its neighbour)
    assert Counter(picks(backend, 12)) == {"a": 6, "c": 6}
    farm.set("b", op=UP, admin=READY, weight=1)
    assert Counter(picks(backend, 12)) == {"a": 4, "b": 4, "c": 4}


def test_server_down_before_the_rebuild_is_still_skipped() -> None:
    farm = Farm("roundrobin", {"a": "", "b": "", "c": ""})
    backend = farm.worker()
    picks(backend, 1)
    farm.set("b", op=DOWN, notify=False)  # workers have not been told yet
    assert "b" not in picks(backend, 9)


def test_runtime_weight_change_is_picked_up_after_changed() -> None:
    farm = Farm("roundrobin", {"a": "", "b": ""})
    backend = farm.worker()
    assert picks(backend, 4) == "abab"
    farm.set("a", weight=3)
    assert Counter(picks(backend, 40)) == {"a": 30, "b": 10}


def test_backups_serve_only_when_no_active_server_can() -> None:
    farm = Farm("roundrobin", {"a": "", "b": "", "x": "backup: true", "y": "backup: true"})
    backend = farm.worker()
    assert picks(backend, 6) == "ababab"
    farm.set("a", op=DOWN)
    assert picks(backend, 4) == "bbbb"
    farm.set("b", admin=MAINT)
    assert Counter(picks(backend, 6)) == {"x": 3, "y": 3}
    farm.set("b", admin=READY)
    assert picks(backend, 3) == "bbb"


def test_backups_weighted_like_actives() -> None:
    farm = Farm("roundrobin", {"a": "", "x": "backup: true, weight: 3", "y": "backup: true"})
    backend = farm.worker()
    farm.set("a", op=DOWN)
    assert picks(backend, 8) == "xxyx" * 2


def test_exclude_goes_to_another_server() -> None:
    farm = Farm("roundrobin", {"a": "", "b": "", "x": "backup: true"})
    backend = farm.worker()
    a = server(backend, "a")
    assert picks(backend, 6, exclude=a) == "bbbbbb"
    # the only active server excluded (a redispatch): a backup rather than none
    farm.set("b", op=DOWN)
    assert picks(backend, 2, exclude=a) == "xx"


# -- static-rr --------------------------------------------------------------------------------


def test_static_rr_ignores_runtime_weights() -> None:
    farm = Farm("static-rr", {"a": "weight: 2", "b": ""})
    backend = farm.worker()
    assert picks(backend, 6) == "aba" * 2
    farm.set("b", weight=10)
    assert picks(backend, 6) == "aba" * 2
    farm.set("a", weight=0)  # weight 0 still means no new clients
    assert picks(backend, 3) == "bbb"
    farm.set("a", weight=7)
    farm.set("b", op=DOWN)
    assert picks(backend, 3) == "aaa"


def test_static_rr_shared_between_workers() -> None:
    farm = Farm("static-rr", {"a": "", "b": ""})
    one, two = farm.worker(0), farm.worker(1)
    assert "".join(name_of(w.pick(Context(b""), None)) for w in [one, one, two, two]) == "abab"


# -- leastconn --------------------------------------------------------------------------------


def test_leastconn_counts_connections_from_all_workers() -> None:
    farm = Farm("leastconn", {"a": "", "b": "", "c": ""})
    one, two = farm.worker(0), farm.worker(1)
    server(one, "a").opened()
    server(one, "a").opened()
    server(two, "b").opened()
    assert name_of(one.pick(Context(b""), None)) == "c"
    assert name_of(two.pick(Context(b""), None)) == "c"
    for _ in range(3):
        server(two, "c").opened()
    assert name_of(one.pick(Context(b""), None)) == "b"  # a 2, b 1, c 3
    server(one, "a").closed()
    server(one, "a").closed()
    assert name_of(two.pick(Context(b""), None)) == "a"


def test_leastconn_relative_to_weight() -> None:
    farm = Farm("leastconn", {"a": "weight: 3", "b": ""})
    backend = farm.worker()
    a, b = server(backend, "a"), server(backend, "b")
    for _ in range(2):
        a.opened()
    b.opened()
    assert picks(backend, 3) == "aaa"  # 2/3 < 1/1
    a.opened()
    a.opened()
    assert picks(backend, 2) == "bb"  # 4/3 > 1/1


def test_leastconn_ties_alternate_across_workers() -> None:
    farm = Farm("leastconn", {"a": "", "b": "", "c": ""})
    one, two = farm.worker(0), farm.worker(1)
    seq = "".join(name_of(w.pick(Context(b""), None)) for w in [one, two] * 3)
    assert seq == "abcabc"
    server(one, "c").opened()
    seq = "".join(name_of(w.pick(Context(b""), None)) for w in [two, one] * 2)
    assert seq == "abab"


def test_leastconn_skips_unselectable_and_uses_backups() -> None:
    farm = Farm("leastconn", {"a": "", "b": "", "x": "backup: true"})
    backend = farm.worker()
    server(backend, "b").opened()
    farm.set("a", admin=DRAIN)
    assert picks(backend, 3) == "bbb"  # the busier one, since a takes no new clients
    farm.set("b", weight=0)
    assert picks(backend, 2) == "xx"


# -- source, uri, hdr -------------------------------------------------------------------------


def spread(backend: Backend, contexts: list[Context]) -> dict[bytes, str]:
    return {key_of(c): name_of(backend.pick(c, None)) for c in contexts}


def key_of(context: Context) -> bytes:
    return context.client_ip + context.path


def ip_contexts(count: int = 1000) -> list[Context]:
    return [Context(f"10.{i // 250}.{i % 250}.7".encode()) for i in range(count)]


def test_source_is_stable_weighted_and_shared() -> None:
    farm = Farm("source", {"a": "", "b": "weight: 2", "c": ""})
    one, two = farm.worker(0), farm.worker(1)
    contexts = ip_contexts()
    first = spread(one, contexts)
    assert spread(one, contexts) == first
    assert spread(two, contexts) == first
    counts = Counter(first.values())
    assert 200 <= counts["a"] <= 300 and 200 <= counts["c"] <= 300, counts
    assert 430 <= counts["b"] <= 570, counts


def test_hash_is_the_same_in_every_process() -> None:
    """Python's hash() differs between processes; the balancer's must not."""
    farm = Farm("source", {"a": "", "b": "", "c": ""})
    here = spread(farm.worker(), ip_contexts(200))
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from lb.balance import key_hash\n"
        "keys = [f'10.{i // 250}.{i % 250}.7'.encode() for i in range(200)]\n"
        "print(json.dumps([key_hash(k) for k in keys]))\n"
    )
    results = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout
        results.append(json.loads(out))
    assert results[0] == results[1]
    assert results[0] == [balance.key_hash(key_of(c)) for c in ip_contexts(200)]
    assert set(here.values()) == {"a", "b", "c"}


def test_source_mapping_returns_when_the_server_set_does() -> None:
    farm = Farm("source", {"a": "", "b": "", "c": ""})
    backend = farm.worker()
    contexts = ip_contexts(300)
    before = spread(backend, contexts)
    farm.set("b", op=DOWN)
    during = spread(backend, contexts)
    assert "b" not in during.values()
    assert set(during.values()) == {"a", "c"}
    farm.set("b", op=UP)
    assert spread(backend, contexts) == before


def test_source_excluded_server_moves_only_its_own_keys() -> None:
    farm = Farm("source", {"a": "", "b": "", "c": ""})
    backend = farm.worker()
    contexts = ip_contexts(300)
    b = server(backend, "b")
    before = spread(backend, contexts)
    after = {key_of(c): name_of(backend.pick(c, b)) for c in contexts}
    assert "b" not in after.values()
    assert all(after[k] == v for k, v in before.items() if v != "b")


def test_uri_hashes_the_path() -> None:
    farm = Farm("uri", {"a": "", "b": "", "c": "weight: 2"})
    one, two = farm.worker(0), farm.worker(1)
    contexts = [Context(b"10.0.0.1", f"/static/img{i}.png".encode()) for i in range(1000)]
    first = spread(one, contexts)
    assert spread(two, contexts) == first
    counts = Counter(first.values())
    assert 200 <= counts["a"] <= 300 and 200 <= counts["b"] <= 300, counts
    # another client, same path: same server
    moved = [Context(b"192.168.1.9", c.path) for c in contexts[:50]]
    assert [name_of(one.pick(c, None)) for c in moved] == [first[key_of(c)] for c in
                                                          contexts[:50]]


def test_hdr_hashes_the_header_value() -> None:
    farm = Farm("hdr(X-User)", {"a": "", "b": ""})
    backend = farm.worker()
    users = [f"user{i}".encode() for i in range(1000)]
    first = {
        u: name_of(backend.pick(Context(b"10.0.0.1", b"/", request(b"X-User: " + u)), None))
        for u in users
    }
    counts = Counter(first.values())
    assert 430 <= counts["a"] <= 570, counts
    for u in reversed(users[:100]):  # same user, other client and path, any header case
        head = request(b"x-user: " + u, target=b"/other")
        context = Context(b"10.9.9.9", b"/other", head)
        assert picks(backend, 5, context) == first[u] * 5


@pytest.mark.parametrize(
    "head", [None, request(), request(b"X-User:"), request(b"X-Other: alice")],
    ids=["tcp", "absent", "empty", "other-header"],
)
def test_hdr_without_a_value_falls_back_to_roundrobin(head: h1.RequestHead | None) -> None:
    farm = Farm("hdr(X-User)", {"a": "", "b": "", "c": ""})
    one, two = farm.worker(0), farm.worker(1)
    context = Context(b"10.0.0.1", b"/", head)
    assert "".join(name_of(w.pick(context, None)) for w in [one, two] * 3) == "abcabc"


def test_hash_uses_backups_when_actives_are_out() -> None:
    farm = Farm("uri", {"a": "", "x": "backup: true", "y": "backup: true"})
    backend = farm.worker()
    contexts = [Context(b"", f"/{i}".encode()) for i in range(100)]
    assert set(spread(backend, contexts).values()) == {"a"}
    farm.set("a", admin=MAINT)
    assert set(spread(backend, contexts).values()) == {"x", "y"}


# -- random -----------------------------------------------------------------------------------


def seeded(backend: Backend, seed: int = 1) -> Backend:
    backend.balancer.random = random.Random(seed).random  # type: ignore[attr-defined]
    return backend


def test_random_two_choices_prefers_the_idle_server() -> None:
    farm = Farm("random", {"a": "", "b": ""})
    backend = seeded(farm.worker())
    server(backend, "a").opened()
    assert picks(backend, 200) == "b" * 200  # the two draws are two different servers


def test_random_two_choices_among_many() -> None:
    farm = Farm("random", {"a": "", "b": "", "c": "", "d": ""})
    one, two = seeded(farm.worker(0), 1), seeded(farm.worker(1), 2)
    for name in "abc":
        server(one, name).opened()
    server(two, "a").opened()
    counts = Counter(picks(one, 500) + picks(two, 500))
    # d is idle: it wins whenever drawn, i.e. in half of the pairs; a (2 conns) never
    assert counts["a"] == 0
    assert 430 <= counts["d"] <= 570, counts


def test_random_weighted_when_idle() -> None:
    farm = Farm("random", {"a": "weight: 3", "b": ""})
    backend = seeded(farm.worker())
    counts = Counter(picks(backend, 2000))
    assert 1400 <= counts["a"] <= 1600, counts  # the first draw (3/4 a) wins ties


def test_random_relative_to_weight() -> None:
    farm = Farm("random", {"a": "weight: 4", "b": ""})
    backend = seeded(farm.worker())
    a = server(backend, "a")
    for _ in range(3):
        a.opened()
    server(backend, "b").opened()
    assert picks(backend, 100) == "a" * 100  # 3/4 < 1/1


def test_random_skips_excluded_and_unselectable() -> None:
    farm = Farm("random", {"a": "", "b": "", "c": ""})
    backend = seeded(farm.worker())
    farm.set("b", admin=DRAIN)
    a = server(backend, "a")
    assert picks(backend, 100, exclude=a) == "c" * 100
    farm.set("c", op=DOWN, notify=False)  # not rebuilt yet: still never c
    assert picks(backend, 50) == "a" * 50


# -- every algorithm --------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_none_when_nothing_is_selectable(algorithm: str) -> None:
    farm = Farm(algorithm, {"a": "", "b": "weight: 0", "x": "backup: true"})
    backend = farm.worker()
    context = Context(b"10.0.0.1", b"/p", request(b"X-User: u"))
    assert name_of(backend.pick(context, None)) == "a"
    farm.set("a", op=DOWN)
    assert name_of(backend.pick(context, None)) == "x"
    assert backend.pick(context, server(backend, "x")) is None
    farm.set("x", admin=MAINT)
    assert backend.pick(context, None) is None


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_avoids_unselectable_servers(algorithm: str) -> None:
    farm = Farm(algorithm, {"a": "", "b": "", "c": "", "d": "", "e": "weight: 0",
                            "x": "backup: true"})
    farm.set("b", op=DOWN)
    farm.set("c", admin=DRAIN)
    farm.set("d", admin=MAINT)
    backend = farm.worker()
    got = {
        name_of(backend.pick(Context(f"10.0.0.{i}".encode(), f"/{i}".encode(),
                                     request(f"X-User: {i}".encode())), None))
        for i in range(100)
    }
    assert got == {"a"}


def test_make_rejects_unknown_algorithms() -> None:
    farm = Farm("roundrobin", {"a": ""})
    backend = farm.worker()
    with pytest.raises(ValueError):
        balance.make("first", None, backend)
    with pytest.raises(ValueError):
        balance.make("hdr", None, backend)
