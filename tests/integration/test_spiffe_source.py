"""Sidecars and the registry on SPIRE-issued credentials (ADR 0007, docs/spire.md).

A real Workload API (`workload_api.py`, the stubs py-spiffe ships) serves each
workload on its own unix socket; py-spiffe's `X509Source` in the sidecar and in the
registry reads it. The SVIDs are SPIRE-shaped: a root CA in the bundle, an
intermediate that signs short-lived leaves with a URI SAN only and both EKUs, and
chains of leaf + intermediate. The registry runs with `--credentials spiffe` against
the same SPIRE, so every party trusts the same root; the operator keeps its
embedded-CA credential and trusts the SPIRE root to reach the registry.

The SPIRE side, `SpiffeMesh` and the helpers live in `spiffe_support.py`; federation
and the registry's own SPIFFE mode are in test_spiffe_federation.py.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from spiffe._proto import workload_pb2, workload_pb2_grpc
from workload_api import HEADER, WorkloadApi

from trustmesh.errors import ConfigError
from trustmesh.limits import Limits
from trustmesh.x509svid import TrustBundle, X509Svid
from trustmesh_sidecar.credentials import registry_id_for

from harness import ECHO, agent, agent_id, blueprint, policy, unary
from spiffe_support import WAIT, Spire, health, outcome, serial, spiffe_mesh, spy_chains, until

# -- the Workload API itself ---------------------------------------------------------------------


async def test_workload_api_requires_the_security_header(tmp_path: Path) -> None:
    """The test server refuses what SPIRE refuses, so py-spiffe is known to send it."""
    spire = Spire()
    sockets = Path(tempfile.mkdtemp(prefix="wl-"))
    api = WorkloadApi(sockets / "a.sock")
    api.push(spire.svid(agent_id("alice")), spire.bundle)
    await api.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{api.path}") as channel:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=WAIT):
                    break
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == "security header missing from request"
            call = stub.FetchX509SVID(
                workload_pb2.X509SVIDRequest(), metadata=(HEADER,), timeout=WAIT
            )
            first = await call.read()
            call.cancel()
            assert first.svids[0].spiffe_id == str(agent_id("alice"))
        assert api.refused == 1
    finally:
        await api.stop()
        shutil.rmtree(sockets, ignore_errors=True)


# -- 1: first fetch -----------------------------------------------------------------------------


async def test_first_fetch_serves_calls_over_spire_shaped_chains(tmp_path: Path) -> None:
    async with spiffe_mesh(tmp_path) as mesh:
        await mesh.apply(
            blueprint("any"),
            agent("alice"),
            agent("bob"),
            policy("alice-calls-bob", ["alice"], ["bob"], [f"/{ECHO}/*"]),
        )
        alice = await mesh.add_spiffe("alice")
        bob = await mesh.add_spiffe("bob", spiffe_id=None)  # identity from the SVID alone
        ghost = await mesh.add_spiffe("ghost")  # SPIRE issued it; no Agent record
        assert alice.sidecar.state and bob.sidecar.state
        assert bob.sidecar.state.spiffe_id == agent_id("bob")
        chains = spy_chains(bob.sidecar.inbound)
        await mesh.wait_endpoints("alice", "bob")

        reply, _ = await unary(alice.outbound, "bob", body=b"hi")
        assert reply == b"hi"
        assert bob.app.received[-1]["trustmesh-caller"] == str(agent_id("alice"))

        # The caller checked bob's exact ID on a leaf + intermediate chain...
        bob_svid = bob.sidecar.state.svid
        assert len(bob_svid.cert_chain) == 2
        assert alice.sidecar.peer_serials(bob.sidecar.inbound_address, agent_id("bob")) == [
            bob_svid.serial_hex
        ]
        # ...and bob's router got alice's leaf and SPIRE's intermediate from grpc.
        assert chains[-1] == alice.sidecar.state.svid.chain_der()

        # Issuance is not legitimacy: the registry still decides who is an agent.
        code, details = await outcome(ghost.outbound, "bob")
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert details.startswith("trustmesh: agent_not_registered: ")

        assert await health(bob.sidecar) == health_pb2.HealthCheckResponse.SERVING
        assert all(api.refused == 0 for api in mesh.apis.values())


async def test_spiffe_id_flag_that_differs_from_the_svid_refuses_to_start(
    tmp_path: Path,
) -> None:
    async with spiffe_mesh(tmp_path) as mesh:
        with pytest.raises(ConfigError) as err:
            await mesh.add_spiffe("alice", spiffe_id=agent_id("mallory"))
        assert err.value.message == (
            "the SPIFFE Workload API issued an SVID for spiffe://test.local/agents/alice, not "
            "spiffe://test.local/agents/mallory: refusing to start; fix --spiffe-id or the "
            "SPIRE registration entry"
        )


# -- 2: rotation pushed while calls run ---------------------------------------------------------


async def test_pushed_rotation_drops_no_calls(tmp_path: Path) -> None:
    # Connections age out every second, so every rotation reaches new handshakes; the
    # grace outlasts the test, so the open stream may only end if rotation breaks it.
    limits = Limits(max_connection_age_s=1.0, max_connection_age_grace_s=60.0)
    spire = Spire()
    async with spiffe_mesh(tmp_path, spire, limits=limits) as mesh:
        await mesh.apply(
            blueprint("any"),
            agent("alice"),
            agent("bob"),
            policy("alice-calls-bob", ["alice"], ["bob"], [f"/{ECHO}/*"]),
        )
        alice = await mesh.add_spiffe("alice")
        bob = await mesh.add_spiffe("bob")
        await mesh.wait_endpoints("alice", "bob")
        assert alice.sidecar.state and bob.sidecar.state
        first_alice = alice.sidecar.state.svid.serial_hex
        chains = spy_chains(bob.sidecar.inbound)

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        failures: list[tuple[grpc.StatusCode, str]] = []
        called: list[float] = []
        streamed: list[float] = []

        async def caller() -> None:
            while not stop.is_set():
                code, details = await outcome(alice.outbound, "bob", body=b"r", timeout=2.0)
                called.append(loop.time())
                if code is not grpc.StatusCode.OK:
                    failures.append((code, details))
                await asyncio.sleep(0.03)

        async def stream() -> None:
            """One server stream opened before the first rotation, read throughout."""
            async with grpc.aio.insecure_channel(alice.outbound) as channel:
                call = channel.unary_stream(f"/{ECHO}/Hold")(
                    b"", metadata=(("trustmesh-target", "bob"),), timeout=20
                )
                async for _ in call:
                    streamed.append(loop.time())
                    if stop.is_set():
                        call.cancel()
                        return

        tasks = [asyncio.ensure_future(caller()), asyncio.ensure_future(stream())]
        pushed: dict[str, list[X509Svid]] = {"alice": [], "bob": []}
        first_push = loop.time() + 0.4
        try:
            for round_ in range(4):
                if round_ == 2:
                    spire.rotate_intermediate()
                for name in ("alice", "bob"):  # SPIRE rotates workloads independently
                    await asyncio.sleep(0.4)
                    svid = spire.svid(agent_id(name))
                    pushed[name].append(svid)
                    mesh.apis[name].push(svid, spire.bundle)
            last_push = loop.time()
            await until(
                lambda: (
                    bob.sidecar.state is not None
                    and bob.sidecar.state.svid.serial_hex == pushed["bob"][-1].serial_hex
                ),
                "bob's last SVID",
            )
            await asyncio.sleep(1.5)  # past the connection age: new handshakes everywhere
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), WAIT)

        assert failures == [], failures[:3]
        assert called[0] < first_push and called[-1] > last_push and len(called) > 10
        assert streamed and streamed[-1] > last_push  # the open stream outlived rotation
        assert alice.sidecar.state.svid.serial_hex == pushed["alice"][-1].serial_hex
        assert bob.sidecar.state.svid.serial_hex == pushed["bob"][-1].serial_hex
        # the last SVIDs hang below the rotated intermediate
        assert bob.sidecar.state.svid.cert_chain[1] == spire.intermediate.cert
        bob_serials = alice.sidecar.peer_serials(bob.sidecar.inbound_address, agent_id("bob"))
        assert len(bob_serials) > 1 and bob_serials[-1] == pushed["bob"][-1].serial_hex
        alice_serials = {serial(c[0]) for c in chains if c}
        assert {first_alice, pushed["alice"][-1].serial_hex} <= alice_serials


# -- 3: a bundle update removes a CA --------------------------------------------------------------


async def test_bundle_update_that_removes_a_ca_rejects_its_peers(tmp_path: Path) -> None:
    limits = Limits(max_connection_age_s=1.0, max_connection_age_grace_s=1.0)
    old, new = Spire(name="old"), Spire(name="new")
    both = [old.root.cert, new.root.cert]
    async with spiffe_mesh(tmp_path, new, limits=limits) as mesh:
        await mesh.apply(
            blueprint("any"),
            agent("alice"),
            agent("bob"),
            agent("carol"),
            policy("to-bob", ["alice", "carol"], ["bob"], [f"/{ECHO}/*"]),
            policy("bob-to-alice", ["bob"], ["alice"], [f"/{ECHO}/*"]),
        )
        # SPIRE in mid root rotation: every bundle holds both roots, the registry's too.
        assert mesh.registry is not None
        registry = mesh.registry
        before = registry.state.revision
        mesh.apis["registry"].push(new.svid(registry_id_for(new.td)), both)
        await until(
            lambda: len(registry.bundles()[0].x509_authorities) == 2, "the registry's bundle"
        )
        # The rotation is published as a snapshot change, for watchers already connected.
        published = registry.state.updates_since(registry.state.epoch, before) or []
        assert [len(c.put_bundle.x509_authorities) for u in published for c in u.changes
                if c.HasField("put_bundle")] == [2]  # fmt: skip
        alice = await mesh.add_spiffe("alice", svid=old.svid(agent_id("alice")), bundle=both)
        bob = await mesh.add_spiffe("bob", bundle=both)
        carol = await mesh.add_spiffe("carol", bundle=both)
        await mesh.wait_endpoints("alice", "bob", "carol")
        for caller, target in (("alice", "bob"), ("bob", "alice"), ("carol", "bob")):
            assert await outcome(mesh.nodes[caller].outbound, target) == (grpc.StatusCode.OK, "")

        assert bob.sidecar.state is not None
        mesh.apis["bob"].push(bob.sidecar.state.svid, new.bundle)  # the old root is gone
        await until(
            lambda: (
                bob.sidecar.state is not None
                and bob.sidecar.state.bundles.get(new.td) == TrustBundle(new.td, (new.root.cert,))
            ),
            "bob's new bundle",
        )
        # Calls on connections opened before the update: bob re-verifies every call.
        code, details = await outcome(alice.outbound, "bob")
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert details.startswith(
            "trustmesh: peer_unauthenticated: certificate for spiffe://test.local/agents/alice "
            "does not chain to the trust bundle of test.local"
        )
        await asyncio.sleep(2.5)  # connection age + grace: every connection is new now
        code, details = await outcome(alice.outbound, "bob")
        assert code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE), details
        code, details = await outcome(bob.outbound, "alice")
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert details.startswith("trustmesh: peer_unauthenticated: TLS handshake with ")
        assert await outcome(carol.outbound, "bob") == (grpc.StatusCode.OK, "")

        # The registry still publishes the old root; a snapshot update must not bring it
        # back (the Workload API alone decides bundles in SPIFFE mode).
        await mesh.apply(blueprint("another"))
        await until(
            lambda: (
                bob.sidecar.state is not None
                and bob.sidecar.state.snapshot.blueprint("another") is not None
            ),
            "the snapshot delta",
        )
        assert bob.sidecar.state.bundles.get(new.td) == TrustBundle(new.td, (new.root.cert,))
        code, _ = await outcome(alice.outbound, "bob")
        assert code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE)


# -- 5: the Workload API is down at start ---------------------------------------------------------


async def test_workload_api_down_at_start_is_retried_until_it_appears(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trustmesh_sidecar.spiffe_source")
    async with spiffe_mesh(tmp_path) as mesh:
        await mesh.apply(blueprint("any"), agent("alice"))
        path = mesh.sockets / "alice.sock"
        expected = (
            f"cannot reach the SPIFFE Workload API at unix://{path}: no socket at "
            f"{path} (is the SPIRE agent running, and is its socket mounted here?); "
            "retrying in "
        )
        starting = asyncio.ensure_future(mesh.add_spiffe("alice", start_api=False))
        try:

            def retried() -> int:
                return sum(r.getMessage().startswith(expected) for r in caplog.records)

            await until(lambda: retried() >= 2, "two logged retries")
            sidecar = mesh.nodes["alice"].sidecar
            assert sidecar.admin_address and not starting.done()
            assert await health(sidecar) == health_pb2.HealthCheckResponse.NOT_SERVING

            await mesh.apis["alice"].start()
            node = await asyncio.wait_for(starting, 15)
        finally:
            if not starting.done():
                starting.cancel()
        assert node.sidecar.state is not None
        assert node.sidecar.state.spiffe_id == agent_id("alice")
        assert await health(node.sidecar) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("failure", ["restart", "fatal-error"])
async def test_spire_agent_restart_is_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    """The agent goes away mid-run and comes back with a rotated SVID: the sidecar keeps
    its last SVID meanwhile, then takes the new one. After a plain restart py-spiffe
    reconnects by itself; after an error it does not retry, its source closes and the
    sidecar's own `follow()` reconnects."""
    caplog.set_level(logging.WARNING, logger="trustmesh_sidecar.spiffe_source")
    async with spiffe_mesh(tmp_path) as mesh:
        await mesh.apply(blueprint("any"), agent("alice"))
        alice = await mesh.add_spiffe("alice")
        assert alice.sidecar.state is not None
        before = alice.sidecar.state.svid.serial_hex
        api = mesh.apis["alice"]
        await api.stop()
        if failure == "fatal-error":
            api.failing = (grpc.StatusCode.INVALID_ARGUMENT, "agent broken")
            await api.start()
            await until(
                lambda: any("failed" in r.getMessage() for r in caplog.records),
                "the sidecar noticing py-spiffe gave up",
            )
            await api.stop()
            api.failing = None
        await asyncio.sleep(0.5)
        assert alice.sidecar.state.svid.serial_hex == before  # fail static
        rotated = mesh.spire.svid(agent_id("alice"))
        api.push(rotated, mesh.spire.bundle)
        await api.start()
        await until(
            lambda: (
                alice.sidecar.state is not None
                and alice.sidecar.state.svid.serial_hex == rotated.serial_hex
            ),
            "the SVID from the restarted agent",
            timeout=15,
        )
