"""Transparent forwarding: agent -> alice's outbound -> bob's inbound -> bob's app.

The sidecars forward raw bytes, so whatever the app and the caller exchange (message
bytes, metadata, status, deadline, cancellation) must come out the other end as it
went in; only the sidecar's own limits may refuse a call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from trustmesh.limits import Limits
from trustmesh_sidecar.engine import CallControl, CallStart, Forward, Reject

from harness import ECHO, Mesh, agent, blueprint, policy, unary

TARGET = ("trustmesh-target", "bob")
MIB = 1024 * 1024
BINARY = bytes(range(256)) * 4 + b"\x00\x00tail\x00"  # every byte value, NULs included
# Client options big enough that only the sidecar's limits can refuse a message.
CLIENT_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * MIB),
    ("grpc.max_send_message_length", 16 * MIB),
]


async def _stream(messages: list[bytes]) -> AsyncIterator[bytes]:
    for m in messages:
        yield m


async def call_kind(
    outbound: str, kind: str, messages: list[bytes], timeout: float = 10.0
) -> list[bytes]:
    """One call of `kind` through `outbound` to bob; returns every reply message."""
    md = (TARGET,)
    async with grpc.aio.insecure_channel(outbound, options=CLIENT_OPTIONS) as ch:
        if kind == "Unary":
            return [
                await ch.unary_unary(f"/{ECHO}/Unary")(messages[0], metadata=md, timeout=timeout)
            ]
        if kind == "ClientStream":
            call = ch.stream_unary(f"/{ECHO}/ClientStream")(
                _stream(messages), metadata=md, timeout=timeout
            )
            return [await call]
        if kind == "ServerStream":
            call = ch.unary_stream(f"/{ECHO}/ServerStream")(
                messages[0], metadata=md, timeout=timeout
            )
            return [m async for m in call]
        call = ch.stream_stream(f"/{ECHO}/Bidi")(_stream(messages), metadata=md, timeout=timeout)
        return [m async for m in call]


# (kind, request messages, expected replies): the Echo app's contract, see harness.EchoApp.
CALL_KINDS = [
    ("Unary", [b"hello"], [b"hello"]),
    ("Unary", [BINARY], [BINARY]),
    ("Unary", [b"\x00" * MIB], [b"\x00" * MIB]),
    ("Unary", [b""], [b""]),
    ("ClientStream", [b"a", BINARY, b"c"], [b"|".join([b"a", BINARY, b"c"])]),
    ("ClientStream", [b"x" * MIB, b"y"], [b"x" * MIB + b"|y"]),
    ("ServerStream", [b"50"], [str(i).encode() for i in range(50)]),
    ("Bidi", [b"abc", BINARY, b"\x00z\x00"], [b"ABC", BINARY.upper(), b"\x00Z\x00"]),
    ("Bidi", [b"q" * MIB, b"w"], [b"Q" * MIB, b"W"]),
]


@pytest.mark.parametrize(
    ("kind", "messages", "expected"),
    CALL_KINDS,
    ids=[
        "unary-text",
        "unary-binary-nul",
        "unary-1mib",
        "unary-empty",
        "client-stream-binary",
        "client-stream-1mib",
        "server-stream-50",
        "bidi-binary-nul",
        "bidi-1mib",
    ],
)
async def test_every_call_kind_carries_bytes_exactly(
    trio: Mesh, kind: str, messages: list[bytes], expected: list[bytes]
) -> None:
    replies = await call_kind(trio.nodes["alice"].outbound, kind, messages)
    assert replies == expected
    seen = trio.nodes["bob"].app.received[-1]
    assert seen["trustmesh-caller"] == str(trio.nodes["alice"].spiffe_id)


async def test_metadata_passes_both_ways(trio: Mesh) -> None:
    blob = b"\x00\xffbinary\x00"
    reply, call = await unary(
        trio.nodes["alice"].outbound,
        "bob",
        body=b"md",
        metadata=[("x-custom", "text value"), ("x-blob-bin", blob)],
    )
    assert reply == b"md"
    initial = dict(await call.initial_metadata())
    trailing = dict(await call.trailing_metadata())
    assert initial.get("x-initial") == "hello"
    assert trailing.get("x-trailing") == "bye"
    seen = trio.nodes["bob"].app.received[-1]
    assert seen["x-custom"] == "text value"
    assert seen["x-blob-bin"] == blob
    # The agent's routing header is consumed by its own sidecar, never shown to the callee.
    assert "trustmesh-target" not in seen


async def test_app_status_and_trailers_pass_through(trio: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await unary(trio.nodes["alice"].outbound, "bob", method=f"/{ECHO}/Fail")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == "app says no"
    assert dict(err.value.trailing_metadata() or ()).get("x-error-detail") == "quota"


def spy_calls(router: Any) -> list[CallStart]:
    """Record the CallStart each call reaches `router` with (the engine calls `route`)."""
    seen: list[CallStart] = []
    route: Callable[[CallStart, CallControl], Forward | Reject] = router.route

    def recording(call: CallStart, control: CallControl) -> Forward | Reject:
        seen.append(call)
        return route(call, control)

    router.route = recording
    return seen


async def wait_set(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True


async def test_deadline_propagates_to_the_app(trio: Mesh) -> None:
    bob = trio.nodes["bob"]
    inbound_calls = spy_calls(bob.sidecar.inbound)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await unary(
            trio.nodes["alice"].outbound, "bob", method=f"/{ECHO}/Sleep", body=b"10", timeout=0.5
        )
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert loop.time() - started < 2.0
    assert await wait_set(bob.app.cancelled, 2.0), "bob's app never saw its call end"
    # The deadline itself crossed the mesh hop, not just a cancellation.
    remaining = inbound_calls[-1].time_remaining
    assert remaining is not None and 0 < remaining <= 0.5


async def test_cancellation_propagates_to_the_app(trio: Mesh) -> None:
    bob = trio.nodes["bob"]
    async with grpc.aio.insecure_channel(trio.nodes["alice"].outbound) as ch:
        call = ch.unary_unary(f"/{ECHO}/Sleep")(b"10", metadata=(TARGET,), timeout=10)
        await asyncio.sleep(0.3)
        assert not call.done()
        assert bob.app.received, "the call never reached bob's app"
        call.cancel()
        assert await wait_set(bob.app.cancelled, 2.0), "bob's app never saw the cancellation"
        assert call.cancelled()


@pytest.fixture
async def small_limit_mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    mesh = await Mesh(tmp_path, limits=Limits(max_message_bytes=64 * 1024)).start()
    try:
        await mesh.apply(
            blueprint("any"),
            agent("alice"),
            agent("bob"),
            policy("alice-calls-bob", ["alice"], ["bob"], ["/test.Echo/*"]),
        )
        for name in ("alice", "bob"):
            await mesh.add(name)
        await mesh.wait_endpoints("alice", "bob")
        yield mesh
    finally:
        await mesh.stop()


OVER_LIMIT: list[tuple[str, list[bytes]]] = [
    ("Unary", [b"x" * (64 * 1024 + 1)]),
    ("Bidi", [b"ok", b"x" * (100 * 1024)]),
    # Each request fits; the app's joined reply (80 KiB) does not.
    ("ClientStream", [b"x" * (40 * 1024), b"y" * (40 * 1024)]),
]


@pytest.mark.parametrize(
    ("kind", "messages"), OVER_LIMIT, ids=["unary-request", "bidi-second-message", "reply"]
)
async def test_message_over_limit_is_refused_then_calls_still_work(
    small_limit_mesh: Mesh, kind: str, messages: list[bytes]
) -> None:
    outbound = small_limit_mesh.nodes["alice"].outbound
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call_kind(outbound, kind, messages, timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    just_under = b"z" * (60 * 1024)
    assert await call_kind(outbound, "Unary", [just_under], timeout=5) == [just_under]


async def test_sequential_calls_share_one_connection(trio: Mesh) -> None:
    alice, bob = trio.nodes["alice"], trio.nodes["bob"]
    inbound_calls = spy_calls(bob.sidecar.inbound)
    replies = [(await unary(alice.outbound, "bob", body=f"n{i}".encode()))[0] for i in range(20)]
    assert replies == [f"n{i}".encode() for i in range(20)]
    # bob's inbound sees the TCP peer (ip:port) of alice's connection: one connection,
    # one source port, however many calls.
    peers = {c.peer_address for c in inbound_calls}
    assert len(inbound_calls) == 20
    assert len(peers) == 1, peers
    assert len(alice.sidecar.peer_serials(bob.sidecar.inbound_address, bob.spiffe_id)) == 1
