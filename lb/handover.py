"""Tunnels and streamed answers moving to the next generation: what the next one accepts,
what each carries.

When a stopping worker hands over, each of its tunnels (TCP-mode sessions, HTTP after an
Upgrade) goes to a worker of the next generation with both descriptors and a state (a
plain dict, sent as JSON):

- the relay's own state (`lb.tunnel.Tunnel.detach`): bytes waiting in each direction,
  half-closes, byte counts, the time left before `timeout tunnel`;
- `mode`, `fe`, `be`, `srv` and `addr`: where it belongs; `slot`: whether it holds one of
  the server's `maxconn` slots (the master moves that slot with it); `pid`: who held it;
- `peer`, `begin` and the timings of its TCP log line.

An HTTP answer being relayed moves the same way (`leave_stream`, `send_stream`), once its
body can be taken up by a fresh parser: with the bytes left of a Content-Length, at a
chunk boundary, or up to the server's close; with it go the client's keep-alive state and
the request's log timings.

The next generation takes a tunnel only if its configuration still serves it the same
way: the frontend with the same mode (and, in TCP mode, the same default backend), and
the server with the same address. `accepts` tells the stopping workers what that is;
`refusal` says why a tunnel stays where it is (and `show proc` repeats it).

Nothing with a TLS side moves: its TLS state is in this process. A tunnel relayed by
`lb.streamtunnel.TransportTunnel` stays ("TLS tunnel") and ends where it is, and so does
a response relayed from or to a TLS connection ("TLS connection").
"""

from __future__ import annotations

import os
from typing import Any

from lb import config, h1
from lb.counters import BIN, BOUT
from lb.httplog import Times
from lb.streamtunnel import STAYS, TransportTunnel, is_tls
from lb.tunnel import Tunnel, take_socket

Accepts = dict[str, Any]


def accepts(cfg: config.Config) -> Accepts:
    """What a generation running `cfg` can take over."""
    return {
        "fe": {name: [fe.mode, fe.default_backend or ""] for name, fe in cfg.frontends.items()},
        "srv": {
            f"{name}/{server.name}": f"{server.address.host}:{server.address.port}"
            for name, backend in cfg.backends.items()
            for server in backend.servers
        },
    }


def refusal(accepted: Accepts | None, state: dict[str, Any]) -> str | None:
    """Why the next generation cannot take the tunnel described by `state` (None: it can)."""
    if accepted is None:
        return "no newer generation to take it"
    frontend = accepted["fe"].get(state["fe"])
    if frontend is None:
        return f"frontend {state['fe']} is gone"
    mode, default_backend = frontend
    if mode != state["mode"]:
        return f"frontend {state['fe']} is in {mode} mode now"
    if mode == "tcp" and default_backend != state["be"]:
        return f"frontend {state['fe']} uses backend {default_backend or '(none)'} now"
    address = accepted["srv"].get(f"{state['be']}/{state['srv']}")
    if address is None:
        return f"server {state['be']}/{state['srv']} is gone"
    if address != state["addr"]:
        return f"server {state['be']}/{state['srv']} has a new address"
    return None


def describe(state: dict[str, Any], session: Any) -> None:
    """Fill in the part of a tunnel's state that is the session's, from `session` (an
    HttpSession or TcpSession in its tunnel)."""
    server = session.server
    state.update(
        fe=session.frontend.name,
        be=server.backend.name,
        srv=server.name,
        addr=f"{server.host}:{server.port}",
        slot=session.slot is not None,
        begin=session.begin,
    )


def count_bytes(session: Any, tunnel: Tunnel | TransportTunnel) -> None:
    """Add to the proxy's byte counters what `session`'s tunnel relayed since they were
    last told (bytes in: from the client; out: from the server)."""
    client, server_end = tunnel.ends
    bytes_in, bytes_out = client.received - client.counted, server_end.received - server_end.counted
    client.counted, server_end.counted = client.received, server_end.received
    server = session.server
    for counters in (session.frontend.counters, server.counters):
        counters.w[BIN] += bytes_in
        counters.w[BOUT] += bytes_out


def leave(session: Any, mode: str, extra: dict[str, Any]) -> bool:
    """Hand `session`'s tunnel to the next generation, if it will take it: True once it
    is on its way (the session is over here); else `session.stays` says why not."""
    frontend = session.frontend
    worker = frontend.worker
    if not worker.handing_over:
        return False
    if isinstance(session.tunnel, TransportTunnel):  # TLS: it cannot move (no detach)
        session.stays = STAYS
        return False
    state: dict[str, Any] = {"mode": mode, **extra}
    describe(state, session)
    why = refusal(worker.accepts, state)
    if why is not None:
        session.stays = why
        return False
    count_bytes(session, session.tunnel)
    relay, fds = session.tunnel.detach()
    state.update(relay, pid=os.getpid())
    session.server.closed()
    session.slot = None  # it goes with the tunnel: the master gives it to the next owner
    worker.send_away({"fe": frontend.name, "fds": len(fds), "tunnel": state}, fds)
    frontend.closed(session)
    return True


# -- responses being relayed -----------------------------------------------------------


def leave_stream(session: Any) -> None:
    """Move a response being relayed (its head sent, its body streaming) with its client
    connection, once its parser state is simple enough to start again elsewhere; until
    then `session.stays` says what it waits for. The client gets everything written to
    it here first (`send_stream` runs once it has)."""
    if session.moving is not None:
        return
    why = _stream_stuck(session)
    state: dict[str, Any] = {"mode": "http", "kind": "stream"}
    if why is None:
        describe(state, session)
        why = refusal(session.frontend.worker.accepts, state)
    if why is not None:
        session.stays = why
        return
    session.moving = state
    session.conn.transport.pause_reading()
    session.transport.pause_reading()
    if session.transport.get_write_buffer_size():
        session.transport.set_write_buffer_limits(high=0, low=0)  # resume_writing once empty
        return
    send_stream(session)


def _stream_stuck(session: Any) -> str | None:
    """What keeps a relayed response from moving now (None: nothing)."""
    conn = session.conn
    if is_tls(session.transport) or (conn is not None and is_tls(conn.transport)):
        return "TLS connection"  # its TLS state is in this process: it ends here
    if conn is None or session.interim:
        return "response in flight"
    if not session.req_done or conn.transport.get_write_buffer_size():
        return "request still being sent"
    if session.pending is not None or session.reader.in_head:
        return "next request already read"
    reader = conn.reader
    if reader.head.framing == h1.CHUNKED and not reader.at_chunk_boundary():
        return "response in the middle of a chunk"
    return None


def send_stream(session: Any) -> None:
    """Hand the response over: both connections, and where the body stands."""
    state, session.moving = session.moving, None
    conn = session.conn
    if (
        state is None or conn is None
        or session.transport.is_closing() or conn.transport.is_closing()
    ):
        # It ended meanwhile (the server closed an until-close body): the connection
        # goes on here, so it reads its client again.
        if not session.transport.is_closing() and not session.paused:
            session.transport.resume_reading()
        return
    frontend = session.frontend
    head = session.head
    peer = session.transport.get_extra_info("peername") or ("", 0)
    times = session.times
    state.update(
        framing=conn.reader.head.framing, left=session.resp_left,
        client_framing=session.resp_framing, keep_alive=session.server_keep_alive,
        until_close=session.server_until_close, close_after=session.close_after,
        server_close=session.server_close, peer=[peer[0], peer[1]], pid=os.getpid(),
        request=[head.method.decode("latin-1"), head.target.decode("latin-1"), head.version],
        times=None if times is None else [getattr(times, name) for name in Times.__slots__],
    )
    fds = [take_socket(session.transport).detach(), take_socket(conn.transport).detach()]
    session.conn = conn.session = None
    session.server.closed()
    session.slot = None  # it goes with the response: the master gives it to the next owner
    session.times = None  # its log line is written where it ends
    session.let_go()
    frontend.worker.send_away({"fe": frontend.name, "fds": 2, "tunnel": state}, fds)
    frontend.closed(session)


def times_from(values: list[Any]) -> Times:
    """The log timings a moved response carried (`send_stream`)."""
    times = Times(values[1])
    for name, value in zip(Times.__slots__, values, strict=True):
        setattr(times, name, value)
    return times
