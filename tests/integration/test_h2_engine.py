"""The frame-level engine (`H2Engine`, ADR 0009) behind real sidecars, grpcio at both ends.

Every sidecar here is built by the harness exactly as in the other integration tests,
except that `runtime.GrpcEngine` is swapped for `H2Engine` (the `h2` fixture), so the
whole call path above the engine seam is the real one: routers, policy, spans.

Sections: forwarding (every call kind, metadata, status, deadline, cancellation),
refusals (router reasons, message and metadata limits), transport identity (exact ID,
handshake), and lifecycle (rotation, connection age, revocation of an open stream).
Hostile peers speaking HTTP/2 by hand are in test_h2_abuse.py; shared helpers are in
h2_support.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509

import trustmesh_sidecar.runtime
from trustmesh.channels import MeshChannels
from trustmesh.limits import Limits
from trustmesh.spiffe_id import TrustDomain
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.v1 import registry_pb2_grpc as rgrpc
from trustmesh.x509svid import X509Svid
from trustmesh_sidecar.credentials import registry_id_for
from trustmesh_sidecar.h2 import H2Engine

from h2_support import (
    ALICE,
    BINARY,
    CAROL,
    CLIENT_OPTIONS,
    MIB,
    TARGET,
    WAIT,
    impostor,
    pair,
    spy_calls,
    start_nodes,
    still_serves,
    wait_set,
)
from harness import (
    ECHO,
    TD,
    Mesh,
    Node,
    agent,
    agent_id,
    blueprint,
    calls_across_rotations,
    policy,
    unary,
)
from raw_peer import dial, issue, mesh_bundles, mesh_ca, reason

# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def h2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sidecars built from here on run the frame-level engine."""
    monkeypatch.setattr(trustmesh_sidecar.runtime, "GrpcEngine", H2Engine)


@pytest.fixture
async def trio(h2: None, mesh: Mesh) -> Mesh:
    """As conftest's trio: alice -> bob allowed on Echo; carol registered, no policy."""
    await mesh.apply(
        blueprint("any"),
        agent("alice"),
        agent("bob"),
        agent("carol"),
        policy("alice-calls-bob", ["alice"], ["bob"], ["/test.Echo/*"]),
    )
    return await start_nodes(mesh, "alice", "bob", "carol")


# -- forwarding ---------------------------------------------------------------------------


async def _stream(messages: list[bytes]) -> AsyncIterator[bytes]:
    for m in messages:
        yield m


async def call_kind(
    outbound: str, kind: str, messages: list[bytes], timeout: float = 10.0
) -> list[bytes]:
    md = (TARGET,)
    async with grpc.aio.insecure_channel(outbound, options=CLIENT_OPTIONS) as ch:
        path = f"/{ECHO}/{kind}"
        if kind == "Unary":
            return [await ch.unary_unary(path)(messages[0], metadata=md, timeout=timeout)]
        if kind == "ClientStream":
            return [await ch.stream_unary(path)(_stream(messages), metadata=md, timeout=timeout)]
        if kind == "ServerStream":
            call = ch.unary_stream(path)(messages[0], metadata=md, timeout=timeout)
            return [m async for m in call]
        call = ch.stream_stream(path)(_stream(messages), metadata=md, timeout=timeout)
        return [m async for m in call]


CALL_KINDS = {
    "unary-text": ("Unary", [b"hello"], [b"hello"]),
    "unary-binary-nul": ("Unary", [BINARY], [BINARY]),
    "unary-1mib": ("Unary", [b"\x00" * MIB], [b"\x00" * MIB]),
    "unary-empty": ("Unary", [b""], [b""]),
    "client-stream-binary": (
        "ClientStream",
        [b"a", BINARY, b"c"],
        [b"|".join([b"a", BINARY, b"c"])],
    ),
    "client-stream-1mib": ("ClientStream", [b"x" * MIB, b"y"], [b"x" * MIB + b"|y"]),
    "server-stream-50": ("ServerStream", [b"50"], [str(i).encode() for i in range(50)]),
    "bidi-binary-nul": (
        "Bidi",
        [b"abc", BINARY, b"\x00z\x00"],
        [b"ABC", BINARY.upper(), b"\x00Z\x00"],
    ),
    "bidi-1mib": ("Bidi", [b"q" * MIB, b"w"], [b"Q" * MIB, b"W"]),
}


@pytest.mark.parametrize(
    ("kind", "messages", "expected"), CALL_KINDS.values(), ids=CALL_KINDS.keys()
)
async def test_every_call_kind_carries_bytes_exactly(
    trio: Mesh, kind: str, messages: list[bytes], expected: list[bytes]
) -> None:
    assert await call_kind(trio.nodes["alice"].outbound, kind, messages) == expected
    assert trio.nodes["bob"].app.received[-1]["trustmesh-caller"] == ALICE


async def test_metadata_passes_both_ways(trio: Mesh) -> None:
    blob = b"\x00\xffbinary\x00"
    reply, call = await unary(
        trio.nodes["alice"].outbound,
        "bob",
        body=b"md",
        metadata=[("x-custom", "text value"), ("x-blob-bin", blob)],
    )
    assert reply == b"md"
    assert dict(await call.initial_metadata()).get("x-initial") == "hello"
    assert dict(await call.trailing_metadata()).get("x-trailing") == "bye"
    seen = trio.nodes["bob"].app.received[-1]
    assert (seen["x-custom"], seen["x-blob-bin"]) == ("text value", blob)
    assert "trustmesh-target" not in seen


async def test_app_status_details_and_trailers_pass_through(trio: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await unary(trio.nodes["alice"].outbound, "bob", method=f"/{ECHO}/Fail")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == "app says no"
    assert dict(err.value.trailing_metadata() or ()).get("x-error-detail") == "quota"


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
    assert await wait_set(bob.app.cancelled), "bob's app never saw its call end"
    remaining = inbound_calls[-1].time_remaining
    assert remaining is not None and 0 < remaining <= 0.5


async def test_cancellation_propagates_to_the_app(trio: Mesh) -> None:
    bob = trio.nodes["bob"]
    async with grpc.aio.insecure_channel(trio.nodes["alice"].outbound) as ch:
        call = ch.unary_unary(f"/{ECHO}/Sleep")(b"10", metadata=(TARGET,), timeout=10)
        await asyncio.sleep(0.3)
        assert not call.done() and bob.app.received, "the call never reached bob's app"
        call.cancel()
        assert await wait_set(bob.app.cancelled), "bob's app never saw the cancellation"
    assert bob.sidecar.inbound is not None and bob.sidecar.inbound.open_calls == 0


async def test_calls_share_one_connection_and_multiplex(trio: Mesh) -> None:
    alice, bob = trio.nodes["alice"], trio.nodes["bob"]
    inbound_calls = spy_calls(bob.sidecar.inbound)
    for i in range(5):
        assert (await unary(alice.outbound, "bob", body=b"s%d" % i))[0] == b"s%d" % i
    async with grpc.aio.insecure_channel(alice.outbound) as ch:
        call = ch.unary_unary(f"/{ECHO}/Unary")
        replies = await asyncio.gather(
            *(call(b"c%d" % i, metadata=(TARGET,), timeout=WAIT) for i in range(32))
        )
    assert replies == [b"c%d" % i for i in range(32)]
    assert len(inbound_calls) == 37
    assert len({c.peer_address for c in inbound_calls}) == 1  # one TCP connection to bob
    assert len(alice.sidecar.peer_serials(bob.sidecar.inbound_address, bob.spiffe_id)) == 1


# -- refusals -----------------------------------------------------------------------------


REFUSALS = {
    "no-target": ([], f"/{ECHO}/Unary", grpc.StatusCode.INVALID_ARGUMENT, "missing_target"),
    "unknown-target": (
        [("trustmesh-target", "nobody")],
        f"/{ECHO}/Unary",
        grpc.StatusCode.PERMISSION_DENIED,
        "unknown_target",
    ),
    "bad-method": ([TARGET], "/no-such-method", grpc.StatusCode.INVALID_ARGUMENT, "bad_method"),
    "no-policy": (
        [("trustmesh-target", "carol")],
        f"/{ECHO}/Unary",
        grpc.StatusCode.PERMISSION_DENIED,
        "no_matching_policy",
    ),
}


@pytest.mark.parametrize(
    ("metadata", "method", "code", "why"), REFUSALS.values(), ids=REFUSALS.keys()
)
async def test_router_refusals_reach_the_caller_as_status(
    trio: Mesh, metadata: list[tuple[str, str]], method: str, code: grpc.StatusCode, why: str
) -> None:
    async with grpc.aio.insecure_channel(trio.nodes["alice"].outbound) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary(method)(b"x", metadata=metadata, timeout=WAIT)
    assert (err.value.code(), reason(err.value)) == (code, why), err.value.details()
    assert trio.nodes["carol"].app.received == [] and trio.nodes["bob"].app.received == []


OVER_LIMIT = {
    "unary-request": ("Unary", [b"x" * (64 * 1024 + 1)]),
    "bidi-second-message": ("Bidi", [b"ok", b"x" * (100 * 1024)]),
    "reply": ("ClientStream", [b"x" * (40 * 1024), b"y" * (40 * 1024)]),  # joined: 80 KiB
}


@pytest.mark.parametrize(("kind", "messages"), OVER_LIMIT.values(), ids=OVER_LIMIT.keys())
async def test_message_over_limit_is_refused_then_calls_still_work(
    h2: None, tmp_path: Path, kind: str, messages: list[bytes]
) -> None:
    async with pair(tmp_path, limits=Limits(max_message_bytes=64 * 1024)) as mesh:
        outbound = mesh.nodes["alice"].outbound
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call_kind(outbound, kind, messages, timeout=WAIT)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason(err.value) == "limit_exceeded"
        just_under = b"z" * (60 * 1024)
        assert await call_kind(outbound, "Unary", [just_under], timeout=WAIT) == [just_under]


async def roomy_app(node: Node) -> None:
    """Restart the app with a 1 MiB header limit: refusals then come from the sidecars."""
    app, roomy = node.app, MIB
    assert app.server is not None
    await app.server.stop(0)
    server = grpc.aio.server(
        options=[("grpc.max_metadata_size", roomy), ("grpc.absolute_max_metadata_size", roomy)]
    )
    handlers = {"Unary": grpc.unary_unary_rpc_method_handler(app._unary)}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(ECHO, handlers)])
    server.add_insecure_port(app.address)
    await server.start()
    app.server = server


@pytest.mark.parametrize("route", ["via-alice-outbound", "direct-to-bob-inbound"])
@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ([("x-big", "a" * 20 * 1024)], grpc.StatusCode.RESOURCE_EXHAUSTED),
        ([("x-big", "a" * 64 * 1024)], grpc.StatusCode.RESOURCE_EXHAUSTED),
        ([(f"x-k{i}", "v" * 16) for i in range(2000)], grpc.StatusCode.RESOURCE_EXHAUSTED),
        ([("x-fits", "a" * 12 * 1024)], grpc.StatusCode.OK),
    ],
    ids=["20KiB-value", "64KiB-value", "2000-keys", "control-12KiB"],
)
async def test_oversized_metadata_is_refused_not_hung(
    trio: Mesh, route: str, metadata: list[tuple[str, str]], code: grpc.StatusCode
) -> None:
    alice, bob = trio.nodes["alice"], trio.nodes["bob"]
    await roomy_app(bob)
    try:
        if route == "via-alice-outbound":
            async with grpc.aio.insecure_channel(alice.outbound, options=CLIENT_OPTIONS) as ch:
                await ch.unary_unary(f"/{ECHO}/Unary")(
                    b"m", metadata=[TARGET, *metadata], timeout=WAIT
                )
        else:
            await dial(trio, bob, issue(mesh_ca(trio), ALICE), metadata=tuple(metadata))
        got = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as e:
        got = e.code()
    assert got == code
    key = metadata[-1][0]
    assert [key in md for md in bob.app.received] == ([True] if code is grpc.StatusCode.OK else [])
    await still_serves(trio)


# -- transport identity ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("credential", "code"),
    [
        (lambda m: issue(mesh_ca(m), ALICE), grpc.StatusCode.OK),
        (impostor, grpc.StatusCode.UNAVAILABLE),
        (lambda m: None, grpc.StatusCode.UNAVAILABLE),
    ],
    ids=["control-mesh-svid", "foreign-ca-same-id", "no-client-cert"],
)
async def test_inbound_handshake_requires_a_mesh_svid(
    trio: Mesh, credential: Callable[[Mesh], X509Svid | None], code: grpc.StatusCode
) -> None:
    bob = trio.nodes["bob"]
    inbound_calls = spy_calls(bob.sidecar.inbound)
    try:
        await dial(trio, bob, credential(trio), body=b"hi")
        got = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as e:
        got = e.code()
    assert got == code
    if code is grpc.StatusCode.OK:
        assert bob.app.received[-1]["trustmesh-caller"] == ALICE
        # The router got the chain the handshake verified: alice's leaf, first.
        leaf = x509.load_der_x509_certificate(inbound_calls[-1].peer_chain[0])
        assert leaf.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.UniformResourceIdentifier) == [ALICE]
    else:
        assert inbound_calls == [] and bob.app.received == []
    await still_serves(trio)


async def test_caller_refuses_a_callee_with_another_identity(trio: Mesh) -> None:
    """A rogue bob instance advertises carol's address: alice's engine must see carol's ID."""
    alice, carol = trio.nodes["alice"], trio.nodes["carol"]
    await trio.apply(policy("alice-calls-carol", ["alice"], ["carol"], ["/test.Echo/*"]))
    assert trio.registry is not None
    svid = issue(mesh_ca(trio), agent_id("bob"))
    channels = MeshChannels(lambda: (svid, mesh_bundles(trio)))
    stub = rgrpc.RegistryStub(
        await channels.get(trio.registry.address, registry_id_for(TrustDomain.parse(TD)))
    )
    watch = stub.Watch(
        rpb.WatchRequest(instance_id="rogue", inbound_address=carol.sidecar.inbound_address)
    )
    try:
        async with asyncio.timeout(WAIT):
            await watch.read()
            state = alice.sidecar.state
            assert state is not None
            while len(state.snapshot.endpoints(agent_id("bob"))) < 2:
                await asyncio.sleep(0.02)
        outcomes = []
        for _ in range(2):  # round robin: one call to each bob endpoint
            try:
                await unary(alice.outbound, "bob")
                outcomes.append("ok")
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e.details()
                assert e.details() == (
                    f"trustmesh: peer_identity_mismatch: expected spiffe://test.local/agents/bob"
                    f" at {carol.sidecar.inbound_address}, peer presented {CAROL}"
                )
                outcomes.append(reason(e))
    finally:
        watch.cancel()
        await channels.close()
    assert sorted(o or "" for o in outcomes) == ["ok", "peer_identity_mismatch"]
    assert carol.app.received == []


# -- lifecycle ------------------------------------------------------------------------------


async def test_rotation_reaches_new_handshakes_and_drops_no_calls(h2: None, tmp_path: Path) -> None:
    """SVID TTL 6 s (renewal about every 3 s), connection age 1 s, calls for 5 s."""
    limits = Limits(max_connection_age_s=1.0, max_connection_age_grace_s=5.0)
    async with pair(tmp_path, svid_ttl=timedelta(seconds=6), limits=limits) as mesh:
        alice, bob = mesh.nodes["alice"], mesh.nodes["bob"]
        assert alice.sidecar.state is not None and bob.sidecar.state is not None
        first = {
            "alice": alice.sidecar.state.svid.serial_hex,
            "bob": bob.sidecar.state.svid.serial_hex,
        }
        inbound_calls = spy_calls(bob.sidecar.inbound)
        run = await calls_across_rotations(alice, bob, 5.0)
        calls, failures, bob_serials = run.calls, run.failures, run.callee_serials
        last = {"alice": run.caller_serial, "bob": run.callee_serial}
        client_serials = {
            format(x509.load_der_x509_certificate(c.peer_chain[0]).serial_number, "x")
            for c in inbound_calls
        }
    assert failures == [], failures[:3]
    assert calls > 50
    assert last["alice"] != first["alice"] and last["bob"] != first["bob"]
    assert len(bob_serials) > 1 and bob_serials[-1] == last["bob"]
    assert {first["alice"], last["alice"]} <= client_serials
    # Connection age: bob's inbound saw several connections (source ports) from alice.
    assert len({c.peer_address for c in inbound_calls}) > 2


async def test_revocation_ends_an_open_stream(trio: Mesh) -> None:
    bob = trio.nodes["bob"]
    async with grpc.aio.insecure_channel(trio.nodes["alice"].outbound) as ch:
        call = ch.unary_stream(f"/{ECHO}/Hold")(b"", metadata=(TARGET,), timeout=10)
        got = [await call.read() for _ in range(3)]
        assert got == [b"0", b"1", b"2"]
        assert bob.sidecar.inbound is not None and bob.sidecar.inbound.open_calls == 1
        await trio.disable("alice", reason="compromised")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async with asyncio.timeout(WAIT):
                while True:
                    message = await call.read()
                    assert message is not grpc.aio.EOF, "the stream ended without a status"
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason(err.value) == "agent_disabled"
    assert bob.sidecar.inbound.open_calls == 0
