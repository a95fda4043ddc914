#!/usr/bin/env python3
"""Tunnel backends and tunnel clients for `bench/reload.py --tunnels` (one asyncio process
each; reload.py starts them, nothing here is meant to be run by hand).

`server --ws P1,P2 --tcp P3,P4` listens on 127.0.0.1 on every port given:

- a `--ws` port speaks HTTP/1.1: a request with `Upgrade: websocket` gets
  `HTTP/1.1 101 Switching Protocols` (with the `Sec-WebSocket-Accept` that its
  `Sec-WebSocket-Key` calls for: HAProxy checks it) and from then on every byte is
  echoed; `GET /stats` gets the server's counters as JSON; any other request gets
  `200 hello\\n` (keep-alive), which is what bench.py's readiness probe wants;
- a `--tcp` port echoes every byte from the start.

It prints `ready` on stdout once every port listens.

`clients --ws PORT --tcp PORT` drives tunnels through a proxy's HTTP frontend (WebSocket
upgrade, then echo) and TCP frontend (echo). Every tunnel sends a burst of numbered lines
(`ID:SEQ:padding\\n`) every `--interval` s (0.5 to 1.5 times, at random) and reads them
back: each must come back once and in order. A tunnel that gets EOF, a reset or no echo
within `--echo-timeout` is lost; a line other than the one expected is a message error (the
tunnel is then closed: what follows would only repeat the error). Commands, one per line on
stdin, each answered by one JSON line on stdout:

    open N      open N tunnels (N/2 WebSocket, the rest TCP), at most 32 at a time
    churn K     close K open tunnels chosen at random and open K new ones of the same kinds
    verify      wait until every open tunnel completed 2 more bursts (stuck ones are named)
    status      the counters so far
    stop        close every tunnel, answer the final counters and exit

EOF on stdin is `stop`. After `--max-seconds` the process stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"
OPEN_AT_ONCE = 32
OPEN_TIMEOUT = 10.0
VERIFY_BURSTS = 2
EXAMPLES = 10  # examples of each kind of problem kept
HELLO = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\r\nhello\n"
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455
UPGRADE = (
    b"GET /tunnel/%d HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


# --------------------------------------------------------------------------- server


class Server:
    def __init__(self) -> None:
        self.counts = {"upgrades": 0, "tcp": 0, "http_requests": 0, "open": 0, "bytes": 0}

    async def echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            self.counts["bytes"] += len(data)
            writer.write(data)
            await writer.drain()

    async def serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counts["tcp"] += 1
        self.counts["open"] += 1
        try:
            await self.echo(reader, writer)
        except (ConnectionError, OSError):
            pass
        finally:
            self.counts["open"] -= 1
            writer.close()

    async def serve_ws(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counts["open"] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.counts["http_requests"] += 1
                lines = head.decode("latin-1").split("\r\n")
                target = lines[0].split(" ")[1] if len(lines[0].split(" ")) > 1 else "/"
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                if headers.get("upgrade", "").lower() == "websocket":
                    self.counts["upgrades"] += 1
                    writer.write(SWITCH + accept(headers.get("sec-websocket-key")) + b"\r\n")
                    await self.echo(reader, writer)
                    return
                if target == "/stats":
                    body = json.dumps(self.counts).encode() + b"\n"
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                    )
                else:
                    writer.write(HELLO)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError):
            pass
        finally:
            self.counts["open"] -= 1
            writer.close()


def accept(key: str | None) -> bytes:
    """The `Sec-WebSocket-Accept` header line for `key` (HAProxy answers 502 to a 101
    without the right one)."""
    if not key:
        return b""
    digest = hashlib.sha1(key.encode() + WS_GUID).digest()
    return b"Sec-WebSocket-Accept: " + base64.b64encode(digest) + b"\r\n"


async def run_server(ws: list[int], tcp: list[int]) -> None:
    server = Server()
    listeners = [
        await asyncio.start_server(server.serve_ws, HOST, port, backlog=4096) for port in ws
    ]
    listeners += [
        await asyncio.start_server(server.serve_tcp, HOST, port, backlog=4096) for port in tcp
    ]
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in listeners))


# --------------------------------------------------------------------------- clients


@dataclass
class Tunnel:
    ident: int
    kind: str  # "ws" or "tcp"
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    bursts: int = 0  # bursts echoed completely
    seq: int = 0
    task: asyncio.Task[None] | None = None
    ended: str = ""  # why it ended ("" while open)


@dataclass
class Clients:
    ws_port: int
    tcp_port: int
    interval: float
    burst: int
    echo_timeout: float
    rng: random.Random
    tunnels: dict[int, Tunnel] = field(default_factory=dict)  # the open ones
    next_id: int = 0
    opened: dict[str, int] = field(default_factory=lambda: {"ws": 0, "tcp": 0})
    open_failed: int = 0
    closed_by_us: int = 0
    lost: dict[str, int] = field(default_factory=dict)  # reason: count
    lost_kind: dict[str, int] = field(default_factory=lambda: {"ws": 0, "tcp": 0})
    msg_errors: int = 0
    messages: int = 0  # lines echoed as expected
    latencies: list[float] = field(default_factory=list)  # s, write of a burst -> last echo
    examples: list[str] = field(default_factory=list)
    halt: bool = False

    # -- opening
    async def open_one(self, kind: str) -> Tunnel | None:
        ident = self.next_id
        self.next_id += 1
        port = self.ws_port if kind == "ws" else self.tcp_port
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(HOST, port, limit=1 << 20), OPEN_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            self.note(f"open {kind} #{ident}: connect: {exc!r}")
            return None
        if kind == "ws":
            try:
                writer.write(UPGRADE % ident)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), OPEN_TIMEOUT)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                self.note(f"open ws #{ident}: upgrade: {exc!r}")
                writer.close()
                return None
            if not head.startswith(b"HTTP/1.1 101"):
                self.note(f"open ws #{ident}: answer {head[:60]!r}")
                writer.close()
                return None
        tunnel = Tunnel(ident, kind, reader, writer)
        self.opened[kind] += 1
        self.tunnels[ident] = tunnel
        tunnel.task = asyncio.get_running_loop().create_task(self.talk(tunnel))
        return tunnel

    async def open_many(self, kinds: list[str]) -> dict[str, Any]:
        began = time.monotonic()
        gate = asyncio.Semaphore(OPEN_AT_ONCE)

        async def one(kind: str) -> bool:
            async with gate:
                return await self.open_one(kind) is not None

        done = await asyncio.gather(*(one(k) for k in kinds))
        failed = done.count(False)
        self.open_failed += failed
        return {
            "opened": done.count(True),
            "failed": failed,
            "seconds": round(time.monotonic() - began, 3),
        }

    # -- talking
    async def talk(self, t: Tunnel) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self.rng.uniform(0, self.interval))  # spread the bursts
        try:
            while not self.halt and not t.ended:
                expected = []
                for _ in range(self.burst):
                    t.seq += 1
                    pad = b"x" * (t.seq % 61)
                    expected.append(b"%d:%d:%s\n" % (t.ident, t.seq, pad))
                sent = loop.time()
                t.writer.write(b"".join(expected))
                for line in expected:
                    got = await asyncio.wait_for(t.reader.readline(), self.echo_timeout)
                    if not got:
                        self.end(t, "eof", f"seq {line.split(b':')[1].decode()}")
                        return
                    if got != line:
                        self.end(t, "", f"expected {line[:24]!r}, got {got[:40]!r}")
                        return
                    self.messages += 1
                self.latencies.append(loop.time() - sent)
                t.bursts += 1
                await asyncio.sleep(self.interval * self.rng.uniform(0.5, 1.5))
        except TimeoutError:
            self.end(t, "timeout", f"no echo within {self.echo_timeout:g}s (seq {t.seq})")
        except ConnectionResetError as exc:
            self.end(t, "reset", repr(exc))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.end(t, "other", repr(exc))

    def end(self, t: Tunnel, lost: str, detail: str) -> None:
        """A tunnel ended by itself (`lost` says how) or on a message error (`lost` "");
        nothing if we closed it ourselves."""
        if t.ended or self.halt:
            return
        t.ended = lost or "message error"
        self.tunnels.pop(t.ident, None)
        if lost:
            self.lost[lost] = self.lost.get(lost, 0) + 1
            self.lost_kind[t.kind] += 1
        else:
            self.msg_errors += 1
        self.note(f"{t.kind} #{t.ident} {t.ended} after {t.bursts} bursts: {detail}")
        t.writer.close()

    def note(self, text: str) -> None:
        if len(self.examples) < EXAMPLES * 3:
            now = time.time()
            stamp = (
                time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
            )
            self.examples.append(f"{stamp} {text}")

    async def close(self, t: Tunnel) -> None:
        self.tunnels.pop(t.ident, None)
        t.ended = "closed"
        if t.task is not None:
            t.task.cancel()
            # Python 3.11's wait_for can swallow a cancellation: never wait for ever (the
            # task ends at its next turn anyway, `ended` being set)
            await asyncio.wait({t.task}, timeout=2)
        t.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(t.writer.wait_closed(), 2)
        self.closed_by_us += 1

    # -- commands
    async def churn(self, count: int) -> dict[str, Any]:
        victims = self.rng.sample(sorted(self.tunnels), min(count, len(self.tunnels)))
        kinds = [self.tunnels[i].kind for i in victims]
        await asyncio.gather(*(self.close(self.tunnels[i]) for i in victims))
        return {"closed": len(victims), **await self.open_many(kinds)}

    async def verify(self, timeout: float) -> dict[str, Any]:
        began = time.monotonic()
        mark = {i: t.bursts for i, t in self.tunnels.items()}
        deadline = began + timeout
        while time.monotonic() < deadline:
            behind = [
                i
                for i, n in mark.items()
                if i in self.tunnels and self.tunnels[i].bursts < n + VERIFY_BURSTS
            ]
            if not behind:
                break
            await asyncio.sleep(0.05)
        stuck = [
            i
            for i, n in mark.items()
            if i in self.tunnels and self.tunnels[i].bursts < n + VERIFY_BURSTS
        ]
        return {
            "checked": len(mark),
            "stuck": len(stuck),
            "stuck_ids": stuck[:EXAMPLES],
            "seconds": round(time.monotonic() - began, 3),
        }

    def status(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "open": len(self.tunnels),
            "open_kinds": {
                k: sum(t.kind == k for t in self.tunnels.values()) for k in ("ws", "tcp")
            },
            "opened": self.opened,
            "open_failed": self.open_failed,
            "closed_by_us": self.closed_by_us,
            "lost": sum(self.lost.values()),
            "lost_by_reason": self.lost,
            "lost_by_kind": self.lost_kind,
            "msg_errors": self.msg_errors,
            "messages": self.messages,
            "bursts": len(lat),
            "echo_ms": {
                "p50": round(lat[len(lat) // 2] * 1000, 2) if lat else None,
                "p99": round(lat[min(len(lat) - 1, len(lat) * 99 // 100)] * 1000, 2)
                if lat
                else None,
                "max": round(lat[-1] * 1000, 2) if lat else None,
            },
            "examples": self.examples,
        }

    async def stop(self) -> dict[str, Any]:
        self.halt = True
        final = self.status()  # before our own closes: what was open at the end
        await asyncio.gather(*(self.close(t) for t in list(self.tunnels.values())))
        return final


def answer(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


async def run_clients(a: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    clients = Clients(a.ws, a.tcp, a.interval, a.burst, a.echo_timeout, random.Random(a.seed))
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    deadline = loop.time() + a.max_seconds
    while True:
        try:
            line = await asyncio.wait_for(stdin.readline(), max(0.1, deadline - loop.time()))
        except TimeoutError:
            answer({"op": "stop", "watchdog": True, **await clients.stop()})
            return
        words = line.decode().split()
        op = words[0] if words else "stop"
        if op == "open":
            n = int(words[1])
            kinds = ["ws"] * (n // 2) + ["tcp"] * (n - n // 2)
            answer({"op": op, **await clients.open_many(kinds)})
        elif op == "churn":
            answer({"op": op, **await clients.churn(int(words[1]))})
        elif op == "verify":
            answer({"op": op, **await clients.verify(a.echo_timeout + 2)})
        elif op == "status":
            answer({"op": op, **clients.status()})
        elif op == "stop":
            answer({"op": op, **await clients.stop()})
            return
        else:
            answer({"op": op, "error": f"unknown command {line!r}"})


def ports(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("server")
    s.add_argument("--ws", type=ports, default=[])
    s.add_argument("--tcp", type=ports, default=[])
    c = sub.add_parser("clients")
    c.add_argument("--ws", type=int, required=True)
    c.add_argument("--tcp", type=int, required=True)
    c.add_argument("--interval", type=float, default=0.5)
    c.add_argument("--burst", type=int, default=4)
    c.add_argument("--echo-timeout", type=float, default=10.0)
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--max-seconds", type=float, default=600.0)
    a = p.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        if a.what == "server":
            asyncio.run(run_server(a.ws, a.tcp))
        else:
            asyncio.run(run_clients(a))


if __name__ == "__main__":
    main()
