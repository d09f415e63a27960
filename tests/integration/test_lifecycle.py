"""A mesh over time: SVID rotation, revocation, registry outage and restart, health.

Revocation is the one timed assertion: every sidecar that takes part in a call with a
disabled agent must refuse it within 1 s of the operator's SetAgentState returning,
and a stream that is already open must end. The measured times are printed (run with
`pytest -s`) and kept in `MEASURED` for the closing note.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trustmesh.channels import MeshChannels
from trustmesh.limits import Limits
from trustmesh.spiffe_id import SpiffeId
from trustmesh_registry.server import RegistryServer, ServeConfig
from trustmesh_sidecar.engine import CallControl, CallStart, Forward, Reject
from trustmesh_sidecar.runtime import Sidecar, SidecarConfig

from harness import (
    ECHO,
    TD,
    Mesh,
    agent,
    agent_id,
    blueprint,
    calls_across_rotations,
    policy,
    unary,
)

REGISTRY_ID = SpiffeId.parse(f"spiffe://{TD}/trustmesh/registry")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# What the tests measured (revocation and restart times in seconds, rotation counts).
MEASURED: dict[str, float | int] = {}


async def start_mesh(
    mesh: Mesh, *extra: dict[str, Any], names: tuple[str, ...] = ("alice", "bob", "carol")
) -> Mesh:
    await mesh.start()
    await mesh.apply(
        blueprint("any"),
        *(agent(n) for n in names),
        policy("alice-calls-bob", ["alice"], ["bob"], ["/test.Echo/*"]),
        *extra,
    )
    for name in names:
        await mesh.add(name)
    await mesh.wait_endpoints(*names)
    return mesh


@pytest.fixture
async def stopper() -> AsyncIterator[list[Mesh]]:
    meshes: list[Mesh] = []
    yield meshes
    for m in meshes:
        await m.stop()


async def outcome(outbound: str, target: str, **kw: Any) -> tuple[grpc.StatusCode, str]:
    """A call's status code and details, never raising."""
    try:
        await unary(outbound, target, **kw)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


# -- rotation ---------------------------------------------------------------------------------


def spy_client_serials(router: Any) -> set[str]:
    """Serials of the client leaf certificates that bob's TLS layer handed to its router."""
    serials: set[str] = set()
    route: Callable[[CallStart, CallControl], Forward | Reject] = router.route

    def recording(call: CallStart, control: CallControl) -> Forward | Reject:
        if call.peer_chain:
            serials.add(
                format(x509.load_der_x509_certificate(call.peer_chain[0]).serial_number, "x")
            )
        return route(call, control)

    router.route = recording
    return serials


@pytest.mark.parametrize(
    "seconds",
    [
        pytest.param(5.0, id="first-renewal"),
        pytest.param(10.0, id="repeated-renewals"),
    ],
)
async def test_rotation_drops_no_calls(tmp_path: Path, stopper: list[Mesh], seconds: float) -> None:
    """SVID TTL 6 s (renewal about every 3 s), connection age 1 s: calls never notice."""
    mesh = Mesh(
        tmp_path,
        svid_ttl=timedelta(seconds=6),
        limits=Limits(max_connection_age_s=1.0, max_connection_age_grace_s=5.0),
    )
    stopper.append(mesh)
    await start_mesh(mesh)
    alice, bob = mesh.nodes["alice"], mesh.nodes["bob"]
    assert alice.sidecar.state is not None and bob.sidecar.state is not None
    first = {"alice": alice.sidecar.state.svid.serial_hex, "bob": bob.sidecar.state.svid.serial_hex}
    client_serials = spy_client_serials(bob.sidecar.inbound)

    run = await calls_across_rotations(alice, bob, seconds)
    calls, failures, bob_serials = run.calls, run.failures, run.callee_serials
    last = {"alice": run.caller_serial, "bob": run.callee_serial}
    MEASURED.update(
        {
            f"rotation {seconds:.0f}s calls": calls,
            f"rotation {seconds:.0f}s failed calls": len(failures),
            f"rotation {seconds:.0f}s bob serials seen by alice": len(bob_serials),
            f"rotation {seconds:.0f}s alice serials seen by bob": len(client_serials),
        }
    )
    print(
        f"\nrotation over {seconds:.0f}s: {calls} calls, {len(failures)} failed; "
        f"alice saw {len(bob_serials)} serials from bob, "
        f"bob saw {len(client_serials)} client serials from alice"
    )
    assert failures == [], failures[:3]
    assert calls > 10 * seconds
    assert last["alice"] != first["alice"] and last["bob"] != first["bob"]
    assert len(bob_serials) > 1 and bob_serials[-1] == last["bob"]
    assert {first["alice"], last["alice"]} <= client_serials


# -- revocation -------------------------------------------------------------------------------


async def first_denial(
    probe: Callable[[], Awaitable[tuple[grpc.StatusCode, str]]], t0: float, *, timeout: float = 3.0
) -> tuple[float, str]:
    """Seconds from t0 until `probe` (a fresh call every ~20 ms) is denied, and the details."""
    loop = asyncio.get_running_loop()
    while loop.time() - t0 < timeout:
        code, details = await probe()
        if code is grpc.StatusCode.PERMISSION_DENIED:
            return loop.time() - t0, details
        assert code is grpc.StatusCode.OK, (code, details)
        await asyncio.sleep(0.02)
    raise AssertionError(f"still not denied after {timeout}s")


async def direct(channel: grpc.aio.Channel) -> tuple[grpc.StatusCode, str]:
    try:
        await channel.unary_unary(f"/{ECHO}/Unary")(b"direct", timeout=1)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


async def test_revocation_reaches_every_sidecar_within_1s(
    tmp_path: Path, stopper: list[Mesh]
) -> None:
    mesh = Mesh(tmp_path)
    stopper.append(mesh)
    await start_mesh(
        mesh,
        policy("carol-calls-bob", ["carol"], ["bob"], ["/test.Echo/*"]),
        policy("others-call-alice", ["bob", "carol"], ["alice"], ["/test.Echo/*"]),
    )
    alice, bob, carol = (mesh.nodes[n] for n in ("alice", "bob", "carol"))
    for caller, target in (
        ("alice", "bob"),
        ("carol", "bob"),
        ("bob", "alice"),
        ("carol", "alice"),
    ):
        assert await outcome(mesh.nodes[caller].outbound, target) == (grpc.StatusCode.OK, ""), (
            caller
        )

    async with grpc.aio.insecure_channel(alice.outbound) as ch:
        hold = ch.unary_stream(f"/{ECHO}/Hold")(
            b"", metadata=(("trustmesh-target", "bob"),), timeout=15
        )
        assert await asyncio.wait_for(hold.read(), 2) == b"0"

        async def hold_ended() -> tuple[float, grpc.StatusCode, str]:
            try:
                while await hold.read() is not grpc.aio.EOF:
                    pass
            except grpc.aio.AioRpcError as e:
                return asyncio.get_running_loop().time() - t0, e.code(), e.details() or ""
            return asyncio.get_running_loop().time() - t0, await hold.code(), await hold.details()

        # carol's SVID over mTLS straight to alice's inbound listener, skipping carol's sidecar.
        carol_state = carol.sidecar.state
        assert carol_state is not None
        carol_tls = MeshChannels(lambda: (carol_state.svid, carol_state.bundles))
        direct_channel = await carol_tls.get(alice.sidecar.inbound_address, alice.spiffe_id)
        assert await direct(direct_channel) == (grpc.StatusCode.OK, "")

        await mesh.disable("alice", reason="incident")
        t0 = asyncio.get_running_loop().time()
        stream_end = asyncio.ensure_future(asyncio.wait_for(hold_ended(), 3))
        probes = {
            # bob's inbound refuses alice as a caller (alice's own outbound forwards it).
            "bob inbound (alice->bob)": lambda: outcome(alice.outbound, "bob", timeout=1),
            # the outbound sidecars of alice's callers refuse alice as a target.
            "bob outbound (bob->alice)": lambda: outcome(bob.outbound, "alice", timeout=1),
            "carol outbound (carol->alice)": lambda: outcome(carol.outbound, "alice", timeout=1),
            # alice's inbound refuses calls to alice, even from a caller past its outbound.
            "alice inbound (carol direct)": lambda: direct(direct_channel),
        }
        try:
            denials = await asyncio.gather(*(first_denial(p, t0) for p in probes.values()))
            elapsed, code, details = await stream_end
        finally:
            await carol_tls.close()

    times = {name: seconds for name, (seconds, _) in zip(probes, denials, strict=True)}
    times["open Hold stream ended"] = elapsed
    MEASURED.update(times)
    print("\nrevocation (seconds from SetAgentState returning):")
    for name, seconds in times.items():
        print(f"  {name:<32} {seconds:.3f}")
    for name, (_, why) in zip(probes, denials, strict=True):
        assert why.startswith("trustmesh: agent_disabled: ") and "incident" in why, (name, why)
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert details.startswith("trustmesh: agent_disabled: "), details
    assert all(s < 1.0 for s in times.values()), times
    # carol is untouched by alice's revocation.
    assert await outcome(carol.outbound, "bob") == (grpc.StatusCode.OK, "")


# -- the registry away ------------------------------------------------------------------------


async def test_fail_static_while_registry_is_down(tmp_path: Path, stopper: list[Mesh]) -> None:
    mesh = Mesh(tmp_path)
    stopper.append(mesh)
    await start_mesh(mesh)
    alice, bob, carol = (mesh.nodes[n] for n in ("alice", "bob", "carol"))
    assert mesh.registry is not None
    await mesh.registry.stop(0)
    mesh.registry = None  # stopped; Mesh.stop must not stop it twice

    loop = asyncio.get_running_loop()
    start = loop.time()
    rounds = 0
    while loop.time() - start < 2.5:
        assert await outcome(alice.outbound, "bob", timeout=2) == (grpc.StatusCode.OK, "")
        code, details = await outcome(carol.outbound, "bob", timeout=2)
        assert code is grpc.StatusCode.PERMISSION_DENIED
        assert details.startswith("trustmesh: no_matching_policy: ")
        rounds += 1
        await asyncio.sleep(0.1)
    assert rounds >= 10
    # The outage was real: the sidecars noticed they lost the registry.
    assert bob.sidecar.state is not None and not bob.sidecar.state.registry_connected
    assert alice.sidecar.state is not None and not alice.sidecar.state.registry_connected


async def restart_registry(
    mesh: Mesh, outage: float = 0.3
) -> tuple[RegistryServer, RegistryServer]:
    """Stop the registry, then start a new one (new epoch) on the same data dir and ports."""
    old = mesh.registry
    assert old is not None
    await old.stop(0)
    mesh.registry = None
    await asyncio.sleep(outage)  # the sidecars notice and back off
    new = RegistryServer(
        ServeConfig(old.config.data_dir, listen=old.address, bootstrap_listen=old.bootstrap_address)
    )
    await new.start()
    mesh.registry = new
    assert new.state.epoch != old.state.epoch
    return old, new


async def test_restarted_registry_epoch_is_taken(tmp_path: Path, stopper: list[Mesh]) -> None:
    mesh = Mesh(tmp_path)
    stopper.append(mesh)
    await start_mesh(mesh)
    alice, bob = mesh.nodes["alice"], mesh.nodes["bob"]
    assert bob.sidecar.state is not None
    old_epoch = bob.sidecar.state.snapshot.epoch
    _, new = await restart_registry(mesh)
    await mesh.disable("alice", reason="after restart")

    loop = asyncio.get_running_loop()
    start = loop.time()
    unreachable = 0
    while True:
        code, details = await outcome(alice.outbound, "bob", timeout=2)
        if code is grpc.StatusCode.PERMISSION_DENIED:
            break
        if code is grpc.StatusCode.UNAVAILABLE and "no_endpoint" in details:
            unreachable += 1  # see test_registry_restart_keeps_live_routes
        else:
            assert code is grpc.StatusCode.OK, (code, details)
        assert loop.time() - start < 10, "bob never took the restarted registry's snapshot"
        await asyncio.sleep(0.05)
    MEASURED["restart: seconds until bob denied alice"] = loop.time() - start
    print(
        f"\nrestart: bob denied alice {loop.time() - start:.2f}s after the disable; "
        f"{unreachable} probes saw no_endpoint meanwhile"
    )
    assert details.startswith("trustmesh: agent_disabled: ") and "after restart" in details
    # The first denial may come from alice's own sidecar (revocation at the source);
    # bob, the callee, must take the new epoch and see alice disabled too.
    while True:
        seen = bob.sidecar.state.snapshot.agent_by_id(agent_id("alice"))
        if (
            bob.sidecar.state.snapshot.epoch == new.state.epoch
            and seen is not None
            and seen.disabled
        ):
            break
        assert loop.time() - start < 10, "bob never took the restarted registry's snapshot"
        await asyncio.sleep(0.05)
    assert bob.sidecar.state.snapshot.epoch == new.state.epoch != old_epoch


async def test_registry_restart_keeps_live_routes(tmp_path: Path, stopper: list[Mesh]) -> None:
    mesh = Mesh(tmp_path)
    stopper.append(mesh)
    await start_mesh(mesh, names=("alice", "bob"))
    peers = {"alice": agent_id("bob"), "bob": agent_id("alice")}
    # Per sidecar: for each snapshot of the new epoch applied, could it still route to its peer?
    routable: dict[str, list[bool]] = {"alice": [], "bob": []}
    epoch: list[str] = []

    def recorder(name: str) -> Callable[[], None]:
        state = mesh.nodes[name].sidecar.state
        assert state is not None

        def on_snapshot() -> None:
            if epoch and state.snapshot.epoch == epoch[0]:
                routable[name].append(bool(state.snapshot.endpoints(peers[name])))

        return on_snapshot

    for name in routable:
        state = mesh.nodes[name].sidecar.state
        assert state is not None
        state.on_snapshot(recorder(name))
    _, new = await restart_registry(mesh)
    epoch.append(new.state.epoch)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not all(r and r[-1] for r in routable.values()):
        assert loop.time() < deadline, routable
        await asyncio.sleep(0.02)
    assert all(all(r) for r in routable.values()), routable


# -- health -----------------------------------------------------------------------------------


async def health(
    address: str, *, channel: grpc.aio.Channel | None = None, service: str = ""
) -> int:
    if channel is not None:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(resp.status)
    async with grpc.aio.insecure_channel(address) as ch:
        return await health(address, channel=ch, service=service)


class Blackhole:
    """A TCP listener that accepts and never answers: a TLS handshake to it hangs."""

    def __init__(self) -> None:
        self.held: list[asyncio.StreamWriter] = []
        self.server: asyncio.base_events.Server | None = None
        self.address = ""

    async def start(self) -> str:
        async def accept(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.held.append(w)

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self.address

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in self.held:
            w.close()


async def wait_health(address: str, want: int, timeout: float = 3.0) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            status = await health(address)
        except grpc.aio.AioRpcError:
            status = -1
        if status == want or loop.time() > deadline:
            return status
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    "stuck",
    ["bootstrap", "watch"],
    ids=["no-svid-yet", "svid-but-no-snapshot"],
)
async def test_sidecar_not_serving_until_it_has_svid_and_snapshot(
    tmp_path: Path, stopper: list[Mesh], stuck: str
) -> None:
    mesh = Mesh(tmp_path)
    stopper.append(mesh)
    await start_mesh(mesh, names=("alice",))
    assert mesh.registry is not None
    hole = Blackhole()
    hole_address = await hole.start()
    sid = agent_id("alice")
    config = SidecarConfig(
        spiffe_id=sid,
        registry=hole_address if stuck == "watch" else mesh.registry.address,
        registry_bootstrap=hole_address
        if stuck == "bootstrap"
        else mesh.registry.bootstrap_address,
        join_token=await mesh.token(sid),
        trust_bundle=mesh.bundle_path,
        app="127.0.0.1:9",
        outbound="127.0.0.1:0",
        inbound="127.0.0.1:0",
        admin="127.0.0.1:0",
        data_dir=tmp_path / "stuck",
    )
    sidecar = Sidecar(config)
    starting = asyncio.ensure_future(sidecar.start())
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not sidecar.admin_address:
            assert loop.time() < deadline, "admin listener never came up"
            await asyncio.sleep(0.01)
        if stuck == "watch":
            await asyncio.wait_for(starting, 5)  # the SVID came from the real bootstrap
            assert sidecar.state is not None and sidecar.state.svid.spiffe_id == sid
        else:
            assert not starting.done()
        await asyncio.sleep(0.3)
        assert await health(sidecar.admin_address) == NOT_SERVING
        assert await health(sidecar.admin_address, service="trustmesh.v1.Sidecar") == NOT_SERVING
    finally:
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await sidecar.stop(0)
        hole.close()
    # The same mesh's healthy sidecar, for contrast: SVID and snapshot -> SERVING.
    assert await wait_health(mesh.nodes["alice"].sidecar.admin_address, SERVING) == SERVING


async def test_registry_health_on_both_listeners(tmp_path: Path, stopper: list[Mesh]) -> None:
    mesh = Mesh(tmp_path)
    stopper.append(mesh)
    await start_mesh(mesh, names=("alice",))
    state = mesh.nodes["alice"].sidecar.state
    assert mesh.registry is not None and state is not None
    listeners = {
        # mTLS: a client certificate is required, so dial with alice's SVID.
        "mtls": (mesh.registry.address, MeshChannels(lambda: (state.svid, state.bundles))),
        # bootstrap: server TLS only; no client certificate.
        "bootstrap": (mesh.registry.bootstrap_address, MeshChannels(lambda: (None, state.bundles))),
    }
    try:
        for name, (address, channels) in listeners.items():
            channel = await channels.get(address, REGISTRY_ID)
            for service in ("", "trustmesh.v1.Registry"):
                assert await health(address, channel=channel, service=service) == SERVING, (
                    name,
                    service,
                )
    finally:
        for _, channels in listeners.values():
            await channels.close()


async def test_health_turns_not_serving_when_the_svid_expires_quietly(
    tmp_path: Path, stopper: list[Mesh]
) -> None:
    """Nothing else happens (no snapshot, no renewal): the timer alone must notice."""
    mesh = Mesh(tmp_path)
    stopper.append(mesh)
    await mesh.start()
    await mesh.apply(blueprint("any"), agent("alice"))
    node = await mesh.add("alice")
    state = node.sidecar.state
    assert state is not None

    async def status() -> int:
        async with grpc.aio.insecure_channel(node.sidecar.admin_address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
            return int(reply.status)

    assert await status() == health_pb2.HealthCheckResponse.SERVING
    expired_at = state.svid.not_after
    state.clock = lambda: expired_at + timedelta(seconds=1)  # the SVID is now past its end
    deadline = asyncio.get_running_loop().time() + 6
    while await status() != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert asyncio.get_running_loop().time() < deadline, "health never noticed the expiry"
        await asyncio.sleep(0.1)
