"""Shared helpers for the H2Engine integration tests (test_h2_engine.py, test_h2_abuse.py).

Meshes of sidecars on the frame-level engine, call spies, and an impostor's SVID.
Raw-peer helpers (the mesh CA, SVIDs issued by hand, a direct dial to an inbound port)
are in raw_peer.py, shared with the transport identity tests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from trustmesh.ca import CertificateAuthority
from trustmesh.spiffe_id import TrustDomain
from trustmesh.x509svid import X509Svid
from trustmesh_sidecar.engine import CallControl, CallStart, Forward, Reject
from trustmesh_sidecar.h2 import H2Engine

from harness import TD, Mesh, agent, blueprint, policy, unary
from raw_peer import dial, issue, mesh_ca

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


async def wait_set(event: asyncio.Event, timeout: float = WAIT) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True


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
