"""Call deadlines, checked in slots: one event-loop timer per slot of `resolution`
seconds, instead of one timer armed and cancelled per call.

A call whose deadline falls in a slot is ended when that slot's timer fires, at most
`resolution` after its deadline. The caller's own gRPC deadline fires on time anyway
(its client library keeps it); the sidecar's check is the backstop that frees the
upstream stream and answers DEADLINE_EXCEEDED if the caller is still waiting. A slot
whose calls all ended before it fires costs one empty callback.
"""

from __future__ import annotations

import asyncio
import math
from typing import Protocol

__all__ = ["DEFAULT_RESOLUTION", "Deadlines", "Expiring"]

DEFAULT_RESOLUTION = 0.05  # seconds


class Expiring(Protocol):
    def expired(self) -> None:
        """The deadline passed: end the call with DEADLINE_EXCEEDED."""
        ...


class Deadlines:
    __slots__ = ("_loop", "_slots", "resolution")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, resolution: float = DEFAULT_RESOLUTION
    ) -> None:
        if resolution <= 0:
            raise ValueError("the deadline resolution must be positive")
        self._loop = loop
        self.resolution = resolution
        self._slots: dict[int, dict[Expiring, None]] = {}

    def add(self, when: float, call: Expiring) -> int:
        """Check `call` at the end of the slot holding `when` (loop time); returns the
        slot, for `remove`."""
        slot = math.ceil(when / self.resolution)
        calls = self._slots.get(slot)
        if calls is None:
            calls = self._slots[slot] = {}
            self._loop.call_at(slot * self.resolution, self._fire, slot)
        calls[call] = None
        return slot

    def remove(self, slot: int, call: Expiring) -> None:
        calls = self._slots.get(slot)
        if calls is not None:
            calls.pop(call, None)

    def __len__(self) -> int:
        return sum(len(calls) for calls in self._slots.values())

    def _fire(self, slot: int) -> None:
        calls = self._slots.pop(slot, None)
        for call in list(calls or ()):
            call.expired()
