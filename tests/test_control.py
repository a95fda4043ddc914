"""The control channel carries messages of any size, with their descriptors."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from lb import control


def big_state(megabytes: int) -> dict[str, Any]:
    row = "x" * 1000
    return {"op": "state", "rows": [f"{n}:{row}" for n in range(megabytes * 1000)]}


def test_a_50_mb_message_and_its_descriptors_cross_in_one_piece():
    ours, theirs = control.pair()
    message = big_state(50)
    r, w = os.pipe()
    try:
        # The socket's buffer holds far less than 50 MB: send from another thread while
        # this one receives, as two processes would.
        loop = asyncio.new_event_loop()
        sending = loop.run_in_executor(None, control.send, ours, message, [w])
        received, fds = control.receive(theirs)
        loop.run_until_complete(sending)
        loop.close()
        assert received == message
        assert len(fds) == 1
        os.write(fds[0], b"ok")  # the very pipe we sent
        assert os.read(r, 2) == b"ok"
        os.close(fds[0])
    finally:
        for fd in (r, w):
            os.close(fd)
        ours.close()
        theirs.close()


def test_small_messages_stay_inline():
    ours, theirs = control.pair()
    with ours, theirs:
        control.send(ours, {"op": "ping"})
        data = theirs.recv(control.MAX_PACKET)
        assert data == b'{"op":"ping"}'


def test_channel_queues_big_messages_in_order_when_the_peer_is_slow():
    async def run() -> list[Any]:
        ours, theirs = control.pair()
        got: list[Any] = []
        done = asyncio.get_running_loop().create_future()

        def on_message(message: dict[str, Any], fds: list[int]) -> None:
            got.append(message["n"])
            for fd in fds:
                os.close(fd)
            if len(got) == 6 and not done.done():
                done.set_result(None)

        sender = control.Channel(ours, lambda m, f: None, lambda: None)
        # Queue several messages, small and large, before the other end reads any.
        r, w = os.pipe()
        for n in range(6):
            payload = "y" * (3_000_000 if n % 2 else 10)
            sender.send({"op": "m", "n": n, "payload": payload}, [w] if n == 3 else None)
        os.close(w)
        os.close(r)
        receiver = control.Channel(theirs, on_message, lambda: None)
        await asyncio.wait_for(done, 20)
        sender.close()
        receiver.close()
        return got

    assert asyncio.run(run()) == [0, 1, 2, 3, 4, 5]


def test_a_truncated_bulk_message_is_an_error_not_a_hang():
    ours, theirs = control.pair()
    with ours, theirs:
        bulk = os.memfd_create("short")
        os.write(bulk, b'{"op":')
        socket.send_fds(ours, [b'{"op":"bulk","size":100}'], [bulk])
        os.close(bulk)
        try:
            control.receive(theirs)
        except ValueError as err:
            assert "shorter" in str(err)
        else:
            raise AssertionError("a short bulk message was accepted")
