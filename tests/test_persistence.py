"""Cookie persistence (insert, rewrite, prefix) and connection retries with and without
redispatch, through real pylb processes with 4 workers. Every request is made on a new
connection, so that any worker may take it: persistence must not depend on the worker."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from backends import HOST, EchoBackend, HttpConn, Response, free_port

INSERT = {"name": "SERVERID", "mode": "insert", "indirect": True, "nocache": True}


def lb_config(servers: dict[str, dict[str, Any]], *, workers: int = 4,
              **backend: Any) -> tuple[dict[str, Any], int]:
    port = free_port()
    return {
        "global": {"workers": workers},
        "defaults": {"mode": "http"},
        "frontends": {"www": {"bind": f"{HOST}:{port}", "default_backend": "app"}},
        "backends": {"app": {**backend, "servers": servers}},
    }, port


def get(port: int, target: str = "/", cookie: str | None = None) -> Response:
    """One request on a new connection."""
    with HttpConn(port) as conn:
        return conn.request("GET", target, headers={"Cookie": cookie} if cookie else None)


def seen_cookies(response: Response) -> list[str]:
    """The Cookie headers the echo backend received."""
    return [v for n, v in response.json()["headers"] if n.lower() == "cookie"]


def set_cookie_target(value: str) -> str:
    """A target asking the echo backend to answer with `Set-Cookie: <value>`."""
    return "/?setcookie=" + quote(value, safe="")


def two_servers(s1: EchoBackend, s2: EchoBackend, **options: Any) -> dict[str, Any]:
    return {"s1": {"address": s1.address, "cookie": "s1", **options},
            "s2": {"address": s2.address, "cookie": "s2", **options}}


# -- insert mode --------------------------------------------------------------------------


def test_insert_mode_sticks_to_the_server_the_cookie_names(pylb, backends):
    s1, s2 = backends.echo("s1"), backends.echo("s2")
    by_name = {"s1": s1, "s2": s2}
    cfg, port = lb_config(two_servers(s1, s2), cookie=INSERT)
    pylb(cfg)

    # without a cookie, balancing spreads the requests
    assert {get(port).header("X-Server") for _ in range(4)} == {"s1", "s2"}

    first = get(port)
    assert first.status == 200
    name = first.header("X-Server")
    assert name in by_name
    assert first.header_all("Set-Cookie") == [f"SERVERID={name}; path=/"]
    assert first.header_all("Cache-Control") == ["private"]
    chosen, other = by_name[name], by_name["s2" if name == "s1" else "s1"]
    before_chosen, before_other = len(chosen.requests), len(other.requests)

    answers = [get(port, f"/n{i}", cookie=f"SERVERID={name}") for i in range(20)]
    assert [a.status for a in answers] == [200] * 20
    assert [a.header("X-Server") for a in answers] == [name] * 20
    assert len(chosen.requests) - before_chosen == 20
    assert len(other.requests) == before_other
    for answer in answers:
        # a client that has the right cookie is not given it again
        assert answer.header_all("Set-Cookie") == []
        assert answer.header_all("Cache-Control") == []
        # indirect: the persistence cookie is pylb's, the server never sees it
        assert seen_cookies(answer) == []


def test_indirect_removes_only_the_persistence_cookie(pylb, backends):
    s1, s2 = backends.echo("s1"), backends.echo("s2")
    cfg, port = lb_config(two_servers(s1, s2), cookie=INSERT)
    pylb(cfg)
    for name in ("s1", "s2", "s1", "s2"):
        answer = get(port, cookie=f"a=1; SERVERID={name}; b=2")
        assert answer.status == 200
        assert answer.header("X-Server") == name
        assert seen_cookies(answer) == ["a=1; b=2"]
        assert answer.header_all("Set-Cookie") == []
    other = get(port, cookie="a=1; b=2")  # no persistence cookie: left alone
    assert seen_cookies(other) == ["a=1; b=2"]
    assert other.header_all("Set-Cookie") == [f"SERVERID={other.header('X-Server')}; path=/"]


def test_a_cookie_naming_an_unknown_server_is_balanced_and_replaced(pylb, backends):
    s1, s2 = backends.echo("s1"), backends.echo("s2")
    cfg, port = lb_config(two_servers(s1, s2), cookie=INSERT)
    pylb(cfg)
    names = set()
    for _ in range(6):
        answer = get(port, cookie="SERVERID=s9")
        assert answer.status == 200
        name = answer.header("X-Server")
        names.add(name)
        assert answer.header_all("Set-Cookie") == [f"SERVERID={name}; path=/"]
        assert answer.header_all("Cache-Control") == ["private"]
    assert names == {"s1", "s2"}  # balanced as if there were no cookie


def test_a_cookie_naming_a_down_server_goes_to_a_working_one(pylb, backends):
    s1, s2 = backends.echo("s1"), backends.echo("s2")
    cfg, port = lb_config(two_servers(s1, s2, check=True, inter="100ms", fall=1),
                          cookie=INSERT, timeout={"check": "500ms"})
    lb = pylb(cfg)
    assert get(port, cookie="SERVERID=s1").header("X-Server") == "s1"
    s1.stop()
    lb.wait_log(r"Server app/s1 is DOWN", 5)
    for _ in range(6):
        answer = get(port, cookie="SERVERID=s1")
        assert answer.status == 200
        assert answer.header("X-Server") == "s2"
        assert answer.header_all("Set-Cookie") == ["SERVERID=s2; path=/"]
        assert answer.header_all("Cache-Control") == ["private"]
    kept = get(port, cookie="SERVERID=s2")
    assert kept.header("X-Server") == "s2"
    assert kept.header_all("Set-Cookie") == []


# -- rewrite and prefix modes ----------------------------------------------------------


def test_rewrite_mode_replaces_the_value_the_server_sets(pylb, backends):
    s1, s2 = backends.echo("s1"), backends.echo("s2")
    cfg, port = lb_config(two_servers(s1, s2), cookie={"name": "SERVERID", "mode": "rewrite"})
    pylb(cfg)
    target = set_cookie_target("SERVERID=xyz; Path=/")
    names = set()
    for _ in range(4):
        answer = get(port, target)
        assert answer.status == 200
        name = answer.header("X-Server")
        names.add(name)
        assert answer.header_all("Set-Cookie") == [f"SERVERID={name}; Path=/"]
    assert names == {"s1", "s2"}
    # a response that sets no such cookie is left alone
    assert get(port).header_all("Set-Cookie") == []
    # and the rewritten cookie brings the client back to its server
    for name in ("s1", "s2"):
        answers = [get(port, cookie=f"SERVERID={name}") for _ in range(5)]
        assert [a.header("X-Server") for a in answers] == [name] * 5


def test_prefix_mode_prefixes_the_server_cookie_and_strips_it_on_the_way_in(pylb, backends):
    s1, s2 = backends.echo("s1"), backends.echo("s2")
    cfg, port = lb_config(two_servers(s1, s2), cookie={"name": "JSESSIONID", "mode": "prefix"})
    pylb(cfg)
    target = set_cookie_target("JSESSIONID=abc")
    names = set()
    for _ in range(4):
        answer = get(port, target)
        assert answer.status == 200
        name = answer.header("X-Server")
        names.add(name)
        assert answer.header_all("Set-Cookie") == [f"JSESSIONID={name}~abc"]
    assert names == {"s1", "s2"}
    for name, value in (("s1", "abc"), ("s2", "def")):
        answers = [get(port, cookie=f"JSESSIONID={name}~{value}") for _ in range(5)]
        assert [a.status for a in answers] == [200] * 5
        assert [a.header("X-Server") for a in answers] == [name] * 5
        assert [seen_cookies(a) for a in answers] == [[f"JSESSIONID={value}"]] * 5
    # the other cookies of the request reach the server untouched
    answer = get(port, cookie="a=1; JSESSIONID=s2~xyz; b=2")
    assert answer.header("X-Server") == "s2"
    assert seen_cookies(answer) == ["a=1; JSESSIONID=xyz; b=2"]


# -- retries and redispatch ---------------------------------------------------------------


def dead_and_alive(backends: Any) -> tuple[dict[str, Any], EchoBackend]:
    s2 = backends.echo("s2")
    return {"s1": {"address": f"{HOST}:{free_port()}"},  # nothing listens there
            "s2": {"address": s2.address}}, s2


def test_redispatch_moves_the_last_retry_to_another_server(pylb, backends):
    servers, s2 = dead_and_alive(backends)
    cfg, port = lb_config(servers, balance="roundrobin", retries=2, redispatch=True)
    pylb(cfg)
    answers = [get(port, f"/r{i}") for i in range(10)]
    assert [a.status for a in answers] == [200] * 10
    assert [a.header("X-Server") for a in answers] == ["s2"] * 10
    assert len(s2.requests) == 10


def test_without_redispatch_a_dead_server_gives_503_after_its_retries(pylb, backends):
    servers, s2 = dead_and_alive(backends)
    # a short connect timeout: the retries' turnaround is min(timeout connect, 1 s)
    cfg, port = lb_config(servers, balance="roundrobin", retries=2, redispatch=False,
                          timeout={"connect": "200ms"})
    pylb(cfg)
    answers = [get(port, f"/r{i}") for i in range(10)]
    statuses = [a.status for a in answers]
    assert sorted(set(statuses)) == [200, 503], statuses
    # round robin alternates: every other request was sent to the dead s1
    assert statuses.count(503) == 5, statuses
    assert [a.header("X-Server") for a in answers if a.status == 200] == ["s2"] * 5
    assert len(s2.requests) == 5
