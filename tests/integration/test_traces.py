"""Spans: one per call and side, with the decision, and W3C trace context kept.

The in-process tests read each sidecar's in-memory exporter; the last one runs real
sidecar processes that export over OTLP/gRPC to a receiver, as they would to a
collector.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from trustmesh.demo.otlp_receiver import OtlpReceiver, ReceivedSpan

from harness import ECHO, Mesh, agent_id, process_pair, unary

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
AGENT_SPAN_ID = "00f067aa0ba902b7"
T = TypeVar("T")


async def wait_for(find: Callable[[], T | None], what: str, timeout: float = 5.0) -> T:
    """Poll until `find()` returns something (spans end just after the reply is sent)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (found := find()) is None:
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return found


def one_span(spans: Sequence[ReadableSpan], kind: SpanKind, caller: str) -> ReadableSpan | None:
    matching = [
        s
        for s in spans
        if s.kind == kind
        and s.attributes
        and s.attributes.get("trustmesh.caller.spiffe_id") == caller
    ]
    assert len(matching) <= 1, matching
    return matching[0] if matching else None


# (caller, exporter owner, kind, decision, reason, policy)
SPANS = [
    ("alice", "alice", SpanKind.CLIENT, "allow", "allowed", None),
    ("alice", "bob", SpanKind.SERVER, "allow", "allowed", "alice-calls-bob"),
    ("carol", "carol", SpanKind.CLIENT, "deny", "no_matching_policy", None),
    ("carol", "bob", SpanKind.SERVER, "deny", "no_matching_policy", None),
]


@pytest.mark.parametrize(
    ("caller", "owner", "kind", "decision", "reason", "policy_name"),
    SPANS,
    ids=["allowed-client", "allowed-server", "denied-client", "denied-server"],
)
async def test_span_attributes(
    trio: Mesh,
    caller: str,
    owner: str,
    kind: SpanKind,
    decision: str,
    reason: str,
    policy_name: str | None,
) -> None:
    await unary(trio.nodes["alice"].outbound, "bob")
    with pytest.raises(grpc.aio.AioRpcError):
        await unary(trio.nodes["carol"].outbound, "bob")
    caller_id = str(agent_id(caller))
    exporter = trio.nodes[owner].spans
    span = await wait_for(
        lambda: one_span(exporter.get_finished_spans(), kind, caller_id),
        f"{kind.name} span of {caller}'s call at {owner}",
    )
    attrs = dict(span.attributes or {})
    expected = {
        "rpc.system": "grpc",
        "rpc.service": ECHO,
        "rpc.method": "Unary",
        "trustmesh.caller.spiffe_id": caller_id,
        "trustmesh.callee.spiffe_id": str(agent_id("bob")),
        "trustmesh.decision": decision,
        "trustmesh.reason": reason,
    }
    assert {k: attrs.get(k) for k in expected} == expected
    assert attrs.get("trustmesh.policy") == policy_name
    assert attrs.get("rpc.grpc.status_code") == (0 if decision == "allow" else 7)
    # The peer is the TCP peer grpc saw: the agent on the outbound side, alice's
    # sidecar on the inbound side (loopback in both cases).
    assert "127.0.0.1" in str(attrs.get("network.peer.address", ""))
    assert span.name == f"{ECHO}/Unary"


async def test_trace_context_is_honoured_and_passed_on(trio: Mesh) -> None:
    traceparent = f"00-{TRACE_ID}-{AGENT_SPAN_ID}-01"
    await unary(trio.nodes["alice"].outbound, "bob", metadata=[("traceparent", traceparent)])
    alice_id = str(agent_id("alice"))
    client = await wait_for(
        lambda: one_span(trio.nodes["alice"].spans.get_finished_spans(), SpanKind.CLIENT, alice_id),
        "alice's CLIENT span",
    )
    server = await wait_for(
        lambda: one_span(trio.nodes["bob"].spans.get_finished_spans(), SpanKind.SERVER, alice_id),
        "bob's SERVER span",
    )
    assert format(client.context.trace_id, "032x") == TRACE_ID
    assert client.parent is not None and format(client.parent.span_id, "016x") == AGENT_SPAN_ID
    assert client.parent.is_remote
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    # bob's app gets the trace continued from bob's SERVER span, and only one traceparent.
    seen = trio.nodes["bob"].app.received[-1]
    version, trace_id, parent_id, flags = str(seen["traceparent"]).split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert parent_id == format(server.context.span_id, "016x")


# -- real processes, real OTLP -----------------------------------------------------------------


def received(spans: list[ReceivedSpan], service: str, kind: str) -> ReceivedSpan | None:
    matching = [
        s
        for s in spans
        if s.service == service and s.kind == kind and s.attributes.get("rpc.method") == "Unary"
    ]
    assert len(matching) <= 1, matching
    return matching[0] if matching else None


async def wait_routes(alice: str, bob: str, timeout: float = 5.0) -> None:
    """Until each sidecar routes to the other (probes use ServerStream, not Unary)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    probe = f"/{ECHO}/ServerStream"
    while True:
        results = []
        for outbound, target in ((alice, "bob"), (bob, "alice")):
            async with grpc.aio.insecure_channel(outbound) as ch:
                call = ch.unary_stream(probe)(
                    b"1", metadata=(("trustmesh-target", target),), timeout=2
                )
                try:
                    _ = [m async for m in call]
                    results.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as e:
                    results.append(e.code())
        if results == [grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED]:
            return
        assert loop.time() < deadline, f"routes not ready: {results}"
        await asyncio.sleep(0.05)


async def test_sidecar_processes_export_spans_over_otlp(tmp_path: Path) -> None:
    receiver = OtlpReceiver()
    await receiver.start()
    try:
        async with process_pair(tmp_path, otlp_endpoint=receiver.endpoint) as (_, alice, bob, _):
            await wait_routes(alice.outbound, bob.outbound)
            reply, _ = await unary(alice.outbound, "bob", timeout=5)
            assert reply == b"ping"
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await unary(bob.outbound, "alice", timeout=5)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await receiver.stop()

    spans = receiver.spans
    expected = [
        ("sidecar-alice", "CLIENT", "allow", "allowed", "alice", "bob"),
        ("sidecar-bob", "SERVER", "allow", "allowed", "alice", "bob"),
        ("sidecar-bob", "CLIENT", "deny", "no_matching_policy", "bob", "alice"),
        ("sidecar-alice", "SERVER", "deny", "no_matching_policy", "bob", "alice"),
    ]
    for service, kind, decision, reason, caller, callee in expected:
        span = received(spans, service, kind)
        assert span is not None, (service, kind, sorted({(s.service, s.kind) for s in spans}))
        got = {
            k: span.attributes.get(k)
            for k in (
                "trustmesh.decision",
                "trustmesh.reason",
                "trustmesh.caller.spiffe_id",
                "trustmesh.callee.spiffe_id",
            )
        }
        assert got == {
            "trustmesh.decision": decision,
            "trustmesh.reason": reason,
            "trustmesh.caller.spiffe_id": str(agent_id(caller)),
            "trustmesh.callee.spiffe_id": str(agent_id(callee)),
        }, (service, kind)
    client = received(spans, "sidecar-alice", "CLIENT")
    server = received(spans, "sidecar-bob", "SERVER")
    assert client is not None and server is not None
    assert server.trace_id == client.trace_id and server.parent_span_id == client.span_id
