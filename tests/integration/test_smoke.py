from __future__ import annotations

import grpc
import pytest

from harness import Mesh, unary


async def test_allowed_call_reaches_app_with_verified_caller(trio: Mesh) -> None:
    reply, _ = await unary(trio.nodes["alice"].outbound, "bob", body=b"hi")
    assert reply == b"hi"
    seen = trio.nodes["bob"].app.received[-1]
    assert seen["trustmesh-caller"] == "spiffe://test.local/agents/alice"


@pytest.mark.parametrize(
    ("caller", "target", "code", "reason"),
    [
        ("carol", "bob", grpc.StatusCode.PERMISSION_DENIED, "no_matching_policy"),
        ("bob", "alice", grpc.StatusCode.PERMISSION_DENIED, "no_matching_policy"),
        ("alice", "nobody", grpc.StatusCode.PERMISSION_DENIED, "unknown_target"),
    ],
    ids=["registered-no-policy", "reverse-direction", "unknown-target"],
)
async def test_denials_name_the_reason(
    trio: Mesh, caller: str, target: str, code: grpc.StatusCode, reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await unary(trio.nodes[caller].outbound, target)
    assert err.value.code() == code
    assert (err.value.details() or "").startswith(f"trustmesh: {reason}: ")
