"""Shared helpers for the H2Engine integration tests (test_h2_engine.py, test_h2_abuse.py).

Meshes of sidecars on the frame-level engine, call spies, and the transport-identity
helpers (the mesh CA, SVIDs issued by hand, a direct grpcio dial to an inbound port).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc

from trustmesh.ca import CertificateAuthority
from trustmesh.channels import MeshChannels
from trustmesh.errors import parse_details
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.x509svid import BundleSet, TrustBundle, X509Svid, generate_key, make_csr
from trustmesh_sidecar.engine import CallControl, CallStart, Forward, Reject
from trustmesh_sidecar.h2 import H2Engine

from harness import ECHO, TD, Mesh, Node, agent, blueprint, policy, unary

WAIT = 5.0  # seconds: the bound on every network wait in the H2Engine tests
MIB = 1024 * 1024
TARGET = ("trustmesh-target", "bob")
ALICE = "spiffe://test.local/agents/alice"
CAROL = "spiffe://test.local/agents/carol"
BINARY = bytes(range(256)) * 4 + b"\x00\x00tail\x00"
CLIENT_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * MIB),
    ("grpc.max_send_message_length", 16 * MIB),
    ("grpc.max_metadata_size", MIB),
    ("grpc.absolute_max_metadata_size", MIB),
]


async def start_nodes(mesh: Mesh, *names: str) -> Mesh:
    for name in names:
        node = await mesh.add(name)
        assert isinstance(node.sidecar.engine, H2Engine)
    await mesh.wait_endpoints(*names)
    return mesh


@contextlib.asynccontextmanager
async def pair(tmp_path: Path, **kw: Any) -> AsyncIterator[Mesh]:
    """alice -> bob on a mesh with its own settings (limits, SVID TTL)."""
    mesh = await Mesh(tmp_path, **kw).start()
    try:
        await mesh.apply(
            blueprint("any"),
            agent("alice"),
            agent("bob"),
            policy("alice-calls-bob", ["alice"], ["bob"], ["/test.Echo/*"]),
        )
        yield await start_nodes(mesh, "alice", "bob")
    finally:
        await mesh.stop()


def spy_calls(router: Any) -> list[CallStart]:
    seen: list[CallStart] = []
    route: Callable[[CallStart, CallControl], Forward | Reject] = router.route

    def recording(call: CallStart, control: CallControl) -> Forward | Reject:
        seen.append(call)
        return route(call, control)

    router.route = recording
    return seen


def reason(err: grpc.aio.AioRpcError) -> str | None:
    parsed = parse_details(err.details() or "")
    return parsed[0] if parsed else None


async def wait_set(event: asyncio.Event, timeout: float = WAIT) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True


def mesh_ca(mesh: Mesh) -> CertificateAuthority:
    d = mesh.root / "registry"
    return CertificateAuthority.load((d / "ca.crt").read_bytes(), (d / "ca.key").read_bytes())


def mesh_bundles(mesh: Mesh) -> BundleSet:
    return BundleSet.of(TrustBundle.from_pem(TrustDomain.parse(TD), mesh.bundle_path.read_bytes()))


def issue(ca: CertificateAuthority, spiffe_id: str | SpiffeId) -> X509Svid:
    sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
    key = generate_key()
    cert = ca.sign_csr(make_csr(key, sid), sid, now=datetime.now(UTC), ttl=timedelta(minutes=10))
    return X509Svid(sid, (cert,), key)


async def dial(
    mesh: Mesh,
    callee: Node,
    svid: X509Svid | None,
    *,
    body: bytes = b"ping",
    metadata: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """One unary call straight to `callee`'s inbound port with grpcio (via the TLS bridge)."""
    bundles = mesh_bundles(mesh)
    channels = MeshChannels(lambda: (svid, bundles))
    try:
        channel = await channels.get(callee.sidecar.inbound_address, callee.spiffe_id)
        reply: bytes = await channel.unary_unary(f"/{ECHO}/Unary")(
            body, metadata=metadata, timeout=WAIT
        )
        return reply
    finally:
        await channels.close()


async def still_serves(mesh: Mesh) -> None:
    """Through alice's sidecar (pooled connection) and a fresh handshake to bob's inbound."""
    bob = mesh.nodes["bob"]
    assert (await unary(mesh.nodes["alice"].outbound, "bob", body=b"ok", timeout=WAIT))[0] == b"ok"
    assert await dial(mesh, bob, issue(mesh_ca(mesh), ALICE)) == b"ping"


def impostor(mesh: Mesh) -> X509Svid | None:
    other = CertificateAuthority.create(
        TrustDomain.parse(TD), now=datetime.now(UTC), ttl=timedelta(days=1)
    )
    return issue(other, ALICE)
