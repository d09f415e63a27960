"""Who may connect to a sidecar's inbound port, and who the sidecar says they are.

Each test acts as a raw peer: it builds an SVID (from the mesh CA, or from a CA the
mesh does not trust) and dials a sidecar itself through `MeshChannels`, which checks
the callee's SPIFFE ID. A control case next to each attack shows that the same path
succeeds with honest credentials, so every rejection comes from the defence named
in the test, not from a broken client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from trustmesh.ca import CertificateAuthority
from trustmesh.channels import MeshChannels
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.v1 import registry_pb2_grpc as rgrpc
from trustmesh.v1 import resources_pb2 as pb
from trustmesh.x509svid import X509Svid
from trustmesh_sidecar.credentials import RegistryCredentials, registry_id_for

from harness import TD, Mesh, Node, agent, agent_id, policy, unary
from raw_peer import WAIT, dial, issue, mesh_bundles, mesh_ca, reason

ALICE = "spiffe://test.local/agents/alice"
CAROL = "spiffe://test.local/agents/carol"
OTHER_TD = TrustDomain.parse("other.example")


# -- raw peers ---------------------------------------------------------------------------


def impostor_ca(td: TrustDomain, *, signs_for: TrustDomain | None = None) -> CertificateAuthority:
    """A fresh CA for `td`. With `signs_for`, the same key and certificate willing to
    issue IDs of another trust domain (what a rogue federated CA would do)."""
    ca = CertificateAuthority.create(td, now=datetime.now(UTC), ttl=timedelta(days=1))
    return ca if signs_for is None else CertificateAuthority(ca.cert, ca.key, signs_for)


async def until(check: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(WAIT):
        while not check():
            await asyncio.sleep(0.02)
    assert check(), what


# -- 1-3: the TLS layer refuses the certificate ----------------------------------------------


def _foreign_ca(mesh: Mesh) -> X509Svid | None:
    return issue(impostor_ca(TrustDomain.parse(TD)), ALICE)


def _no_cert(mesh: Mesh) -> X509Svid | None:
    return None


def _expired(mesh: Mesh) -> X509Svid | None:
    # Issued by the real CA 20 s ago for 10 s: expired 10 s ago (notBefore backdated 30 s).
    return issue(
        mesh_ca(mesh),
        ALICE,
        now=datetime.now(UTC) - timedelta(seconds=20),
        ttl=timedelta(seconds=10),
    )


def _honest(mesh: Mesh) -> X509Svid | None:
    return issue(mesh_ca(mesh), ALICE)


@pytest.mark.parametrize(
    ("credential", "code"),
    [
        (_honest, grpc.StatusCode.OK),
        (_foreign_ca, grpc.StatusCode.UNAVAILABLE),
        (_no_cert, grpc.StatusCode.UNAVAILABLE),
        (_expired, grpc.StatusCode.UNAVAILABLE),
    ],
    ids=["control-mesh-svid", "foreign-ca-same-id", "no-client-cert", "expired-mesh-svid"],
)
async def test_inbound_handshake_requires_a_current_mesh_svid(
    trio: Mesh, credential: Callable[[Mesh], X509Svid | None], code: grpc.StatusCode
) -> None:
    bob = trio.nodes["bob"]
    svid = credential(trio)
    if code is grpc.StatusCode.OK:
        assert await dial(trio, bob, svid, body=b"hi") == b"hi"
        assert bob.app.received[-1]["trustmesh-caller"] == ALICE
        return
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await dial(trio, bob, svid)
    assert err.value.code() == code, err.value.details()
    assert bob.app.received == []
    # The handshake failed, so the router never saw a call: nothing was counted.
    assert bob.sidecar.state is not None and bob.sidecar.state.counters.denied == 0


# -- 4: a valid SVID for a different identity ---------------------------------------------


@contextlib.asynccontextmanager
async def rogue_instance(mesh: Mesh, name: str, advertise: str) -> AsyncIterator[None]:
    """A second instance of agent `name`, holding a real SVID for it, that tells the
    registry it listens at `advertise`. The registry records advertised addresses
    unproven by design: the caller's check of the callee's ID is what makes that safe."""
    assert mesh.registry is not None
    svid = issue(mesh_ca(mesh), agent_id(name))
    bundles = mesh_bundles(mesh)
    channels = MeshChannels(lambda: (svid, bundles))
    stub = rgrpc.RegistryStub(
        await channels.get(mesh.registry.address, registry_id_for(TrustDomain.parse(TD)))
    )
    call = stub.Watch(rpb.WatchRequest(instance_id="rogue", inbound_address=advertise))
    try:
        async with asyncio.timeout(WAIT):
            await call.read()  # the registry has accepted the stream and the endpoint
        yield
    finally:
        call.cancel()
        await channels.close()


async def test_caller_refuses_a_callee_with_another_identity(trio: Mesh) -> None:
    alice, carol = trio.nodes["alice"], trio.nodes["carol"]
    # Were the callee's ID not checked, carol's sidecar would let this call through.
    await trio.apply(policy("alice-calls-carol", ["alice"], ["carol"], ["/test.Echo/*"]))
    async with rogue_instance(trio, "bob", advertise=carol.sidecar.inbound_address):
        state = alice.sidecar.state
        assert state is not None
        await until(
            lambda: len(state.snapshot.endpoints(agent_id("bob"))) == 2,
            "alice never saw the second bob endpoint",
        )
        outcomes: list[str] = []
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
                outcomes.append(reason(e) or "")
    assert sorted(outcomes) == ["ok", "peer_identity_mismatch"]
    assert carol.app.received == []


@pytest.mark.parametrize(
    ("holder", "claims", "code", "why"),
    [
        ("carol", ALICE, grpc.StatusCode.PERMISSION_DENIED, "no_matching_policy"),
        ("alice", CAROL, grpc.StatusCode.OK, None),
    ],
    ids=["carol-claims-alice-by-header", "control-alice-claims-carol-by-header"],
)
async def test_callee_takes_the_caller_from_the_certificate_not_a_header(
    trio: Mesh, holder: str, claims: str, code: grpc.StatusCode, why: str | None
) -> None:
    bob = trio.nodes["bob"]
    svid = issue(mesh_ca(trio), agent_id(holder))
    spoof = (("trustmesh-caller", claims),)
    if code is grpc.StatusCode.OK:
        assert await dial(trio, bob, svid, metadata=spoof) == b"ping"
        assert bob.app.received[-1]["trustmesh-caller"] == str(agent_id(holder))
        return
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await dial(trio, bob, svid, metadata=spoof)
    assert err.value.code() == code
    assert reason(err.value) == why
    assert f"'{agent_id(holder)}'" in (err.value.details() or "")
    assert bob.app.received == []


# -- 5: a federated CA may vouch for its own trust domain only ------------------------------


def federate(node: Node, ca: CertificateAuthority) -> None:
    """Hand `node` a bundle for `ca`'s trust domain, the way the registry would: as a
    `put_bundle` delta applied to its snapshot."""
    state = node.sidecar.state
    assert state is not None
    snap = state.snapshot
    bundle = pb.TrustBundle(trust_domain=OTHER_TD.name, x509_authorities=list(ca.bundle().der()))
    update = rpb.SnapshotUpdate(
        epoch=snap.epoch,
        base_revision=snap.revision,
        revision=snap.revision,
        changes=[rpb.Change(put_bundle=bundle)],
    )
    assert snap.apply(update)
    state.snapshot_applied()
    assert state.bundles.get(OTHER_TD) is not None
    assert state.verifier.bundles.get(OTHER_TD) is not None


@pytest.mark.parametrize(
    ("federated", "claims", "code", "why"),
    [
        (False, "spiffe://other.example/agents/x", grpc.StatusCode.UNAVAILABLE, None),
        (
            True,
            "spiffe://other.example/agents/x",
            grpc.StatusCode.PERMISSION_DENIED,
            "agent_not_registered",
        ),
        (True, ALICE, grpc.StatusCode.UNAUTHENTICATED, "peer_unauthenticated"),
    ],
    ids=[
        "not-federated-tls-refuses",
        "federated-own-domain-passes-tls",
        "federated-ca-signs-our-id",
    ],
)
async def test_federated_ca_vouches_only_for_its_own_trust_domain(
    trio: Mesh, federated: bool, claims: str, code: grpc.StatusCode, why: str | None
) -> None:
    bob = trio.nodes["bob"]
    other = impostor_ca(OTHER_TD)
    if federated:
        federate(bob, other)
    claimed = SpiffeId.parse(claims)
    signer = CertificateAuthority(other.cert, other.key, claimed.trust_domain)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await dial(trio, bob, issue(signer, claimed))
    assert err.value.code() == code, err.value.details()
    assert reason(err.value) == why
    if why == "peer_unauthenticated":
        # The per-trust-domain chain check refused it, after TLS had accepted the CA.
        assert (err.value.details() or "").startswith(
            f"trustmesh: peer_unauthenticated: certificate for {ALICE} does not chain to the "
            f"trust bundle of {TD}: "
        )
    assert bob.app.received == []


# -- 6: the registry's records decide -----------------------------------------------------
# Each caller holds a valid mesh SVID and dials bob itself, as a stolen key would: the
# caller's own sidecar may refuse too, but the callee must not rely on that.


async def joined_svid(mesh: Mesh, name: str) -> X509Svid:
    """An SVID obtained the way a sidecar gets one: a join token exchanged at the registry."""
    assert mesh.registry is not None
    sid = agent_id(name)
    creds = RegistryCredentials(
        sid,
        registry=mesh.registry.address,
        bootstrap=mesh.registry.bootstrap_address,
        data_dir=mesh.root / "joined" / name,
        clock=lambda: datetime.now(UTC),
        join_token=await mesh.token(sid),
        bundle_file=mesh.bundle_path,
    )
    async with asyncio.timeout(WAIT):
        return await creds.obtain()


async def _unregistered(mesh: Mesh) -> None:
    await dial(mesh, mesh.nodes["bob"], await joined_svid(mesh, "ghost"))


async def _disabled(mesh: Mesh) -> None:
    await mesh.disable("alice", reason="compromised")
    bob = mesh.nodes["bob"].sidecar.state
    assert bob is not None
    await until(
        lambda: (a := bob.snapshot.agent_by_name("alice")) is not None and a.disabled,
        "bob never saw alice disabled",
    )
    await dial(mesh, mesh.nodes["bob"], issue(mesh_ca(mesh), ALICE))


async def _expired_agent(mesh: Mesh) -> None:
    expires = (datetime.now(UTC) + timedelta(seconds=2)).replace(microsecond=0)
    await mesh.apply(agent("alice", expiresAt=expires.isoformat().replace("+00:00", "Z")))
    bob = mesh.nodes["bob"].sidecar.state
    assert bob is not None
    await until(
        lambda: (a := bob.snapshot.agent_by_name("alice")) is not None and a.expires_at == expires,
        "bob never saw alice's expiresAt",
    )
    svid = issue(mesh_ca(mesh), ALICE)  # outlives the agent record
    await dial(mesh, mesh.nodes["bob"], svid)  # still before expiresAt: allowed
    await asyncio.sleep((expires - datetime.now(UTC)).total_seconds() + 0.05)
    await dial(mesh, mesh.nodes["bob"], svid)


@pytest.mark.parametrize(
    ("attempt", "why", "message"),
    [
        (
            _unregistered,
            "agent_not_registered",
            "caller 'spiffe://test.local/agents/ghost' is not a registered agent",
        ),
        (_disabled, "agent_disabled", f"caller '{ALICE}' (agent 'alice') is disabled: compromised"),
        (_expired_agent, "agent_expired", f"caller '{ALICE}' (agent 'alice') expired at "),
    ],
    ids=["unregistered-svid", "disabled-agent", "expired-agent"],
)
async def test_callee_denies_callers_the_registry_does_not_vouch_for(
    trio: Mesh, attempt: Callable[[Mesh], Awaitable[None]], why: str, message: str
) -> None:
    bob = trio.nodes["bob"]
    before = len(bob.app.received)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await attempt(trio)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason(err.value) == why
    assert (err.value.details() or "").startswith(f"trustmesh: {why}: {message}")
    # Only the expired case made one allowed call before expiresAt.
    assert len(bob.app.received) == before + (why == "agent_expired")
