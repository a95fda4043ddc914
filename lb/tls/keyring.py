"""The master's session ticket keys, rotated on a schedule.

Workers encrypt new tickets with the first key and decrypt with any (lb.tls.tickets). The
ring holds the current key, the next one and the previous ones: the next key is known to
every worker one period before it starts encrypting, so a ticket made by a worker that
rotated first still resumes on one that has not yet; the previous keys keep tickets made
before a rotation valid for KEEP periods more. A newer pylb taking over (`-x`) gets the
ring with the rest of the state: sessions resume across takeovers as across reloads.
"""

from __future__ import annotations

import time
from typing import Any

from lb.tls.tickets import new_key

KEEP = 2  # previous keys still accepted


class KeyRing:
    def __init__(self, period: float, state: dict[str, Any] | None = None) -> None:
        self.period = period
        if state:
            self._keys = [bytes.fromhex(key) for key in state["keys"]]
            self.rotated = float(state["rotated"])
        else:
            self._keys = [new_key(), new_key()]  # current, next
            self.rotated = time.time()

    @property
    def keys(self) -> list[bytes]:
        """Current, next, then previous keys: the order workers take them in."""
        return list(self._keys)

    def hex(self) -> list[str]:
        return [key.hex() for key in self._keys]

    def due(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) - self.rotated >= self.period

    def rotate(self) -> None:
        current, following, *previous = self._keys
        self._keys = [following, new_key(), current, *previous][: 2 + KEEP]
        self.rotated = time.time()

    def state(self) -> dict[str, Any]:
        """For a newer pylb taking over (JSON)."""
        return {"keys": self.hex(), "rotated": self.rotated}
