"""The master's queue keeper holding requests for a backend with no usable server
(hold-when-down), without sockets: arrival order, sharing among servers that come back,
backups, maxqueue, switching the option off, and the hand-over to a takeover."""

from __future__ import annotations

from typing import Any

from test_faults import Owner

from lb import config
from lb.queue import Keeper
from lb.shared import BE_HOLD, DOWN, SRV_OP, UP, Shared

HOLDING = """
backends:
  app:
    hold-when-down: true
    maxqueue: 3
    servers:
      s1: {address: "127.0.0.1:1"}
      s2: {address: "127.0.0.1:2"}
      b1: {address: "127.0.0.1:3", backup: true}
frontends: {www: {bind: "127.0.0.1:1", default_backend: app}}
"""
SERVERS = {("app", "s1"), ("app", "s2"), ("app", "b1")}


def holding() -> tuple[Keeper, Shared, Owner]:
    cfg = config.loads(HOLDING)
    shared = Shared.create(cfg)
    keeper = Keeper(cfg, shared, lambda owner, message: owner.grants.append(message))
    return keeper, shared, Owner(1, SERVERS)


def set_state(shared: Shared, server: str, state: int) -> None:
    shared.words[shared.layout.servers[("app", server)] + SRV_OP] = state


def hold(keeper: Keeper, owner: Owner, ident: int) -> None:
    keeper.acquire(owner, {"id": ident, "be": "app", "srv": None, "persist": False})


def granted(owner: Owner) -> list[tuple[int, Any]]:
    return [(g["id"], g["srv"]) for g in owner.grants]


def test_a_usable_server_takes_a_held_request_at_once():
    keeper, _, owner = holding()
    hold(keeper, owner, 1)
    assert granted(owner) == [(1, "s1")]


def test_held_requests_wait_in_order_and_share_the_servers_that_come_back():
    keeper, shared, owner = holding()
    for server in ("s1", "s2", "b1"):
        set_state(shared, server, DOWN)
    for ident in (1, 2, 3):
        hold(keeper, owner, ident)
    assert owner.grants == [] and keeper.queued("app") == 3
    hold(keeper, owner, 4)  # maxqueue 3: refused at once
    assert granted(owner) == [(4, None)]
    set_state(shared, "s1", UP)
    set_state(shared, "s2", UP)
    keeper.dispatch("app")
    assert granted(owner)[1:] == [(1, "s1"), (2, "s2"), (3, "s1")]
    assert keeper.queued("app") == 0
    for server in ("s1", "s2", "s1"):  # the grants count as slots until released
        keeper.release(owner, {"be": "app", "srv": server})
    assert all(slots.used == 0 for slots in keeper.servers.values())


def test_a_backup_server_takes_held_requests_only_while_no_active_server_is_usable():
    keeper, shared, owner = holding()
    set_state(shared, "s1", DOWN)
    set_state(shared, "s2", DOWN)
    hold(keeper, owner, 1)
    assert granted(owner) == [(1, "b1")]
    set_state(shared, "s2", UP)
    hold(keeper, owner, 2)
    assert granted(owner)[-1] == (2, "s2")


def test_switching_hold_off_answers_the_held_requests():
    keeper, shared, owner = holding()
    for server in ("s1", "s2", "b1"):
        set_state(shared, server, DOWN)
    hold(keeper, owner, 1)
    hold(keeper, owner, 2)
    shared.words[shared.layout.backends["app"] + BE_HOLD] = 0
    keeper.stop_holding("app")
    assert granted(owner) == [(1, None), (2, None)]
    hold(keeper, owner, 3)  # off: no waiting
    assert granted(owner)[-1] == (3, None)


def test_held_requests_are_handed_to_a_takeover_as_holds_in_their_order():
    keeper, shared, owner = holding()
    for server in ("s1", "s2", "b1"):
        set_state(shared, server, DOWN)
    hold(keeper, owner, 5)
    hold(keeper, owner, 6)
    moved = keeper.waiting_of()
    assert [(m["id"], m["srv"]) for _, m in moved] == [(5, None), (6, None)]
    assert keeper.queued("app") == 0


def test_a_cancelled_hold_leaves_the_queue():
    keeper, shared, owner = holding()
    for server in ("s1", "s2", "b1"):
        set_state(shared, server, DOWN)
    hold(keeper, owner, 1)
    keeper.cancel(owner, {"id": 1})
    set_state(shared, "s1", UP)
    keeper.dispatch("app")
    assert owner.grants == []
