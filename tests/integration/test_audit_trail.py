"""The audit trail of `trustmesh sidecar run` processes (ADR 0013): a denial's line is
written at once, an allowed call's line waits for its batch, and a sidecar that stops
writes every line still waiting."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from harness import TD, process_pair, unary

ALICE, BOB = f"spiffe://{TD}/agents/alice", f"spiffe://{TD}/agents/bob"


def _lines(log: Path) -> list[dict[str, object]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        _, word, rest = [*line.split(" ", 2), "", ""][:3]
        if word == "audit":
            out.append(json.loads(rest))
    return out


def _seen(log: Path, caller: str, decision: str) -> bool:
    return any(
        (a["side"], a["caller"], a["decision"]) == ("inbound", caller, decision)
        for a in _lines(log)
    )


async def test_denials_at_once_allowed_calls_batched_all_written_at_stop(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    # An interval far longer than the test: the allowed line can only come from the stop.
    env = {"TRUSTMESH_AUDIT_FLUSH_MS": "10000"}
    async with process_pair(tmp_path, extra_env=env, log_dir=logs) as (_, alice, bob, _apps):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while True:  # until alice's snapshot routes to bob
            try:
                await unary(alice.outbound, "bob", timeout=2)
                break
            except grpc.aio.AioRpcError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await unary(bob.outbound, "alice", timeout=5)  # no policy lets bob call alice
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # The denial is in alice's trail right away (the write follows the reply within
        # the same loop iteration; 2 s is slack for a slow machine, not a batch).
        deadline = loop.time() + 2
        while not _seen(logs / "alice.log", BOB, "deny") and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert _seen(logs / "alice.log", BOB, "deny")
        assert not _seen(logs / "bob.log", ALICE, "allow")  # waiting for its batch
    assert _seen(logs / "bob.log", ALICE, "allow")  # SIGTERM: the stop wrote it
    assert (logs / "bob.log").stat().st_mode & 0o777 == 0o600
