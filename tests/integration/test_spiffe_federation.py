"""Federation and the registry in SPIFFE mode, on SPIRE-issued credentials (ADR 0007).

The SPIRE side, the mesh and the helpers live in `spiffe_support.py`; see
test_spiffe_source.py for the Workload API itself, rotation and bundle updates.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.ca import CertificateAuthority
from trustmesh.channels import MeshChannels
from trustmesh.spiffe_id import SpiffeId
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.v1 import registry_pb2_grpc as rgrpc
from trustmesh.v1 import resources_pb2 as pb
from trustmesh.x509svid import (
    BundleSet,
    TrustBundle,
    X509Svid,
    generate_key,
    make_csr,
    spiffe_id_of,
)

from harness import ECHO, Node, agent, agent_id, blueprint, unary
from spiffe_support import (
    OTHER,
    SCOUT,
    TOOL,
    UNARY,
    WAIT,
    SpiffeMesh,
    Spire,
    foreign_agent,
    outcome,
    selector_policy,
    spiffe_mesh,
    until,
)

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from certs import issue

# -- 4: federation --------------------------------------------------------------------------------


class ForeignServer:
    """A workload of other.example that is not TrustMesh (say, a go-spiffe service):
    mTLS with its SPIRE-shaped SVID, trusting test.local's bundle for its clients."""

    def __init__(self, svid: X509Svid, trusted: Sequence[x509.Certificate]) -> None:
        self.svid = svid
        self.trusted = trusted
        self.callers: list[SpiffeId] = []
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def _unary(self, req: bytes, context: grpc.aio.ServicerContext) -> bytes:
        pem = context.auth_context()["x509_pem_cert"][0]
        self.callers.append(spiffe_id_of(x509.load_pem_x509_certificate(pem)))
        return b"tool:" + req

    async def start(self) -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    ECHO, {"Unary": grpc.unary_unary_rpc_method_handler(self._unary)}
                )
            ]
        )
        roots = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.trusted)
        creds = grpc.ssl_server_credentials(
            [(self.svid.key_pem(), self.svid.chain_pem())],
            root_certificates=roots,
            require_client_auth=True,
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        self.server, self.address = server, f"127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)


async def scout_calls(mesh: SpiffeMesh, node: Node, scout: X509Svid) -> tuple[bytes, str]:
    """other.example's scout dials `node`'s inbound port through TrustMesh's own TLS
    bridge, which checks the callee's exact ID against test.local's bundle."""
    trusted = mesh.spire_bundles()
    channels = MeshChannels(lambda: (scout, trusted))
    try:
        channel = await channels.get(node.sidecar.inbound_address, agent_id(node.name))
        try:
            reply: bytes = await channel.unary_unary(UNARY)(b"hello", timeout=WAIT)
        except grpc.aio.AioRpcError as e:
            return b"", e.code().name
        return reply, "OK"
    finally:
        await channels.close()


@pytest.mark.parametrize("source", ["workload-api", "file"])
async def test_federated_peers_are_verified_with_their_own_bundle(
    tmp_path: Path, source: str
) -> None:
    other = Spire(OTHER)
    federated = {OTHER: other.bundle}
    files = BundleSet.of(TrustBundle(OTHER, tuple(other.bundle)))
    async with spiffe_mesh(tmp_path) as mesh:
        tool = ForeignServer(other.svid(TOOL), mesh.spire.bundle)
        await tool.start()
        try:
            # Agent records and policies name other.example's IDs like any other.
            await mesh.apply(
                blueprint("any"),
                agent("alice"),
                agent("bob"),
                agent("carol"),
                foreign_agent("tool", TOOL),
                foreign_agent("scout", SCOUT),
                selector_policy(
                    "to-tool", [{"name": "alice"}, {"name": "carol"}], [{"spiffeId": str(TOOL)}]
                ),
                selector_policy(
                    "from-scout", [{"spiffeId": str(SCOUT)}], [{"name": "bob"}, {"name": "carol"}]
                ),
            )
            wl = source == "workload-api"
            alice = await mesh.add_spiffe(
                "alice", federated=federated if wl else None, federated_files=None if wl else files
            )
            bob = await mesh.add_spiffe(
                "bob", federated=federated if wl else None, federated_files=None if wl else files
            )
            carol = await mesh.add_spiffe("carol")  # not federated at all
            # A foreign workload can't report its endpoint to our registry (the registry
            # serves its own trust domain only): the test records it directly.
            assert mesh.registry is not None
            mesh.registry.state.put_endpoint(
                pb.Endpoint(spiffe_id=str(TOOL), instance_id="partner-1", address=tool.address)
            )
            await mesh.wait_endpoints("bob", "carol")
            await until(
                lambda: all(
                    n.sidecar.state is not None and n.sidecar.state.snapshot.endpoints(TOOL)
                    for n in (alice, carol)
                ),
                "the tool's endpoint",
            )

            # outbound: alice reaches other.example's tool and checks its exact ID
            reply, _ = await unary(alice.outbound, "tool", body=b"x")
            assert reply == b"tool:x"
            assert tool.callers == [agent_id("alice")]
            # inbound: other.example's scout reaches bob, who names it to the app
            scout = other.svid(SCOUT)
            assert await scout_calls(mesh, bob, scout) == (b"hello", "OK")
            assert bob.app.received[-1]["trustmesh-caller"] == str(SCOUT)

            # without other.example's bundle: refused, with the reason
            code, details = await outcome(carol.outbound, "tool")
            assert (code, details) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "trustmesh: peer_untrusted: no trust bundle for trust domain 'other.example'",
            )
            # inbound, grpc's TLS refuses the handshake: no root for other.example
            assert await scout_calls(mesh, carol, scout) == (b"", "UNAVAILABLE")
            assert carol.app.received == []

            if wl:  # the Workload API withdraws the federation: refused from then on
                assert alice.sidecar.state is not None
                mesh.apis["alice"].push(alice.sidecar.state.svid, mesh.spire.bundle)
                await until(
                    lambda: (
                        alice.sidecar.state is not None
                        and alice.sidecar.state.bundles.get(OTHER) is None
                    ),
                    "alice's bundles without other.example",
                )
                code, details = await outcome(alice.outbound, "tool")
                assert details == (
                    "trustmesh: peer_untrusted: no trust bundle for trust domain 'other.example'"
                )
        finally:
            await tool.stop()


# -- the registry in SPIFFE mode ------------------------------------------------------------------


async def test_spiffe_mode_registry_issues_operator_credentials_only(tmp_path: Path) -> None:
    async with spiffe_mesh(tmp_path) as mesh:
        assert mesh.registry is not None
        registry_id = mesh.registry.registry_id
        # the registry's own SVID is SPIRE's
        assert mesh.registry.svid.cert_chain[1] == mesh.spire.intermediate.cert
        # operators (embedded-CA credential) still work: apply, tokens, renewal
        await mesh.apply(blueprint("any"), agent("alice"))
        token = await mesh.token(agent_id("alice"))
        assert mesh.operator is not None
        operator_id = mesh.operator.svid.spiffe_id
        key = generate_key()
        renewed = await mesh.operator.call(
            lambda s: s.RenewSvid(
                rpb.RenewSvidRequest(csr=make_csr(key, operator_id)), timeout=WAIT
            )
        )
        d = mesh.root / "registry"
        ca = CertificateAuthority.load((d / "ca.crt").read_bytes(), (d / "ca.key").read_bytes())
        operator = X509Svid.from_der(list(renewed.cert_chain), key)
        assert operator.spiffe_id == operator_id
        assert operator.leaf.issuer == ca.cert.subject

        # but the embedded CA no longer issues workload SVIDs
        channels = MeshChannels(lambda: (None, mesh.spire_bundles()))
        try:
            stub = rgrpc.BootstrapStub(
                await channels.get(mesh.registry.bootstrap_address, registry_id)
            )
            key = generate_key()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Join(
                    rpb.JoinRequest(token=token, csr=make_csr(key, agent_id("alice"))),
                    timeout=WAIT,
                )
        finally:
            await channels.close()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details() == (
            "trustmesh: issuance_disabled: this registry runs with --credentials spiffe: SPIRE "
            "issues workload SVIDs and the embedded CA only operator credentials; not issuing "
            "spiffe://test.local/agents/alice"
        )

        # and a workload SVID from the embedded CA proves nothing here
        forged = issue(ca, agent_id("alice"), now=datetime.now(UTC))
        channels = MeshChannels(lambda: (forged, mesh.spire_bundles()))
        try:
            registry = rgrpc.RegistryStub(await channels.get(mesh.registry.address, registry_id))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in registry.Watch(rpb.WatchRequest(), timeout=WAIT):
                    break
        finally:
            await channels.close()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (err.value.details() or "").startswith(
            "trustmesh: peer_unauthenticated: certificate for spiffe://test.local/agents/alice "
            "does not chain to the trust bundle of test.local"
        )
