"""Acting as a raw peer of a sidecar: SVIDs issued by hand (from the mesh CA, or from
a CA the mesh does not trust) and a unary call straight to a sidecar's inbound port
through `MeshChannels`, which checks the callee's SPIFFE ID. Shared by the transport
identity tests (both engines) and the H2Engine tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc

from trustmesh.ca import CertificateAuthority
from trustmesh.channels import MeshChannels
from trustmesh.errors import parse_details
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.x509svid import BundleSet, TrustBundle, X509Svid, generate_key, make_csr

from harness import ECHO, TD, Mesh, Node

WAIT = 5.0  # seconds: the bound on a raw peer's call
UNARY = f"/{ECHO}/Unary"


def mesh_ca(mesh: Mesh) -> CertificateAuthority:
    d = mesh.root / "registry"
    return CertificateAuthority.load((d / "ca.crt").read_bytes(), (d / "ca.key").read_bytes())


def mesh_bundles(mesh: Mesh) -> BundleSet:
    return BundleSet.of(TrustBundle.from_pem(TrustDomain.parse(TD), mesh.bundle_path.read_bytes()))


def issue(
    ca: CertificateAuthority,
    spiffe_id: str | SpiffeId,
    *,
    now: datetime | None = None,
    ttl: timedelta = timedelta(minutes=10),
) -> X509Svid:
    """An SVID through the CA's real CSR path."""
    sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
    key = generate_key()
    cert = ca.sign_csr(make_csr(key, sid), sid, now=now or datetime.now(UTC), ttl=ttl)
    return X509Svid(sid, (cert,), key)


async def dial(
    mesh: Mesh,
    callee: Node,
    svid: X509Svid | None,
    *,
    body: bytes = b"ping",
    metadata: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """One unary call straight to `callee`'s inbound port, presenting `svid` (or none)."""
    bundles = mesh_bundles(mesh)
    channels = MeshChannels(lambda: (svid, bundles))
    try:
        channel = await channels.get(callee.sidecar.inbound_address, callee.spiffe_id)
        reply: bytes = await channel.unary_unary(UNARY)(body, metadata=metadata, timeout=WAIT)
        return reply
    finally:
        await channels.close()


def reason(err: grpc.aio.AioRpcError) -> str | None:
    """The stable reason code at the start of a denial's details."""
    parsed = parse_details(err.details() or "")
    return parsed[0] if parsed else None
