"""Deadlines checked in slots: a call ends within one slot after its deadline, never
before it; an ended call is never expired; calls of one slot share one loop timer."""

from __future__ import annotations

import asyncio

import pytest

from trustmesh_sidecar.h2.deadlines import Deadlines

RES = 0.02


class _Call:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.expired_at: float | None = None

    def expired(self) -> None:
        assert self.expired_at is None, "expired twice"
        self.expired_at = self.loop.time()


# name: (deadlines in seconds from now, indexes removed before they expire)
CASES = {
    "one-call": ([0.05], []),
    "same-slot": ([0.041, 0.042, 0.043], []),
    "several-slots": ([0.01, 0.05, 0.11], []),
    "removed-never-expires": ([0.03, 0.03], [0]),
    "already-past": ([-0.5], []),
}


@pytest.mark.parametrize(("offsets", "removed"), list(CASES.values()), ids=list(CASES))
def test_calls_expire_within_one_slot_after_their_deadline(
    offsets: list[float], removed: list[int]
) -> None:
    async def run() -> tuple[float, list[tuple[float, _Call]]]:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop, RES)
        timers = 0
        call_at = loop.call_at

        def counting(when, callback, *args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal timers
            timers += getattr(callback, "__name__", "") == "_fire"
            return call_at(when, callback, *args, **kwargs)

        loop.call_at = counting  # type: ignore[method-assign]
        now = loop.time()
        calls = []
        for offset in offsets:
            call = _Call(loop)
            calls.append((now + offset, call, deadlines.add(now + offset, call)))
        for i in removed:
            deadlines.remove(calls[i][2], calls[i][1])
        slots = {slot for _, _, slot in calls}
        assert timers == len(slots)  # one timer per slot, not per call
        await asyncio.sleep(max(*offsets, 0) + 3 * RES)
        assert len(deadlines) == 0
        return now, [(when, call) for when, call, _ in calls]

    now, calls = asyncio.run(run())
    for i, (when, call) in enumerate(calls):
        if i in removed:
            assert call.expired_at is None
            continue
        assert call.expired_at is not None
        assert call.expired_at >= when - 1e-3  # never before its deadline (clock rounding)
        # Within a slot (a past deadline: of being added), plus slack for the loop.
        assert call.expired_at <= max(when, now) + RES + 0.05


def test_resolution_must_be_positive() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match="positive"):
            Deadlines(loop, 0)
    finally:
        loop.close()
