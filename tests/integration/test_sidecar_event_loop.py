"""`trustmesh sidecar run` processes on each event loop (ADR 0012): a call between two
sidecars goes through the mTLS listener's certificate hand-over on that loop."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import grpc
import pytest

from harness import TD, process_pair, unary

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None

CASES = {
    "auto": ("auto", "uvloop" if HAVE_UVLOOP else "asyncio"),
    "asyncio": ("asyncio", "asyncio"),
    "uvloop": ("uvloop", "uvloop"),
}


@pytest.mark.parametrize(("choice", "running"), list(CASES.values()), ids=list(CASES))
async def test_sidecars_serve_on_the_chosen_loop(tmp_path: Path, choice: str, running: str) -> None:
    if running == "uvloop" and not HAVE_UVLOOP:
        pytest.skip("uvloop is not installed")
    async with process_pair(tmp_path, extra_env={"TRUSTMESH_EVENT_LOOP": choice}) as pair:
        _, alice, bob, apps = pair
        assert (alice.event_loop, bob.event_loop) == (running, running)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while True:  # until alice's snapshot routes to bob
            try:
                reply, _ = await unary(alice.outbound, "bob", timeout=2)
                break
            except grpc.aio.AioRpcError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)
        assert reply == b"ping"
        assert apps["bob"].received[-1]["trustmesh-caller"] == f"spiffe://{TD}/agents/alice"
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await unary(bob.outbound, "alice", timeout=5)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
