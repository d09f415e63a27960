"""Hostile bytes never raise past the verifier, and are never allowed.

Truncations and bit flips start from a valid, fully signed depth-3 chain (an
unsigned last hop is authenticated by mTLS alone, so flipping its bits could give
another valid hop; every hop here is signed). Random bytes and random protobuf
shapes need no starting point.
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_delegation_vectors import mesh_snapshot

from trustmesh.delegation import ChainCache, extend_chain, verify_chain
from trustmesh.delegation_parse import split_chain
from trustmesh.peer_verify import PeerVerifier
from trustmesh.snapshot import Snapshot
from trustmesh.spiffe_id import SpiffeId
from trustmesh.v1 import delegation_pb2 as dpb

from certs import NOW, bundles, issue, make_ca

TD = "example.org"
CA = make_ca(TD)
NAMES = ("orchestrator", "planner", "helper", "tool")
SVIDS = {n: issue(CA, f"spiffe://{TD}/agents/{n}") for n in NAMES}
MESH = "".join(
    f"---\napiVersion: trustmesh.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}}}\n"
    f"spec: {spec}\n"
    for kind, name, spec in [
        ("AgentBlueprint", "bp", "{allowedMethods: ['*']}"),
        *(
            ("Agent", n, f"{{spiffeId: 'spiffe://{TD}/agents/{n}', blueprint: bp, sponsor: s}}")
            for n in NAMES
        ),
        ("DelegationPolicy", "any", "{callees: [{name: tool}], allowedOrigins: "
         "[{name: orchestrator}], allowedPaths: [['**']]}"),
    ]
)  # fmt: skip
METHOD = "/demo.Tool/Invoke"
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def sid(name: str) -> SpiffeId:
    return SpiffeId.parse(f"spiffe://{TD}/agents/{name}")


def _valid() -> bytes:
    chain = None
    for issuer, audience in [
        ("orchestrator", "planner"),
        ("planner", "helper"),
        ("helper", "tool"),
    ]:
        chain = extend_chain(
            chain,
            svid=SVIDS[issuer],
            audience=sid(audience),
            method=METHOD,
            now=NOW,
            nonce=b"n" * 16,
            scopes=["s"] if chain is None else None,
        )
    assert chain is not None
    return chain  # fmt: skip


VALID = _valid()
SNAPSHOT = mesh_snapshot(MESH, set())
VERIFIER = PeerVerifier(bundles(CA))
CACHE = ChainCache()  # shared: hostile input must not poison it either


def decide(data: bytes, cache: ChainCache = CACHE, snapshot: Snapshot = SNAPSHOT):  # type: ignore[no-untyped-def]
    return verify_chain(
        data,
        peer=sid("helper"),
        local=sid("tool"),
        method=METHOD,
        snapshot=snapshot,
        verifier=VERIFIER,
        cache=cache,
        now=NOW + timedelta(seconds=1),
    )


def test_the_starting_chain_is_valid() -> None:
    assert decide(VALID).allowed


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes_are_denied(data: bytes) -> None:
    assert not decide(data).allowed


def test_every_truncation_is_denied() -> None:
    allowed = [cut for cut in range(len(VALID)) if decide(VALID[:cut]).allowed]
    assert allowed == []


@SETTINGS
@given(st.sets(st.integers(0, len(VALID) * 8 - 1), min_size=1, max_size=3))
def test_bit_flips_are_denied(bits: set[int]) -> None:
    data = bytearray(VALID)
    for bit in bits:
        data[bit // 8] ^= 1 << (bit % 8)
    assert not decide(bytes(data)).allowed
    assert decide(VALID).allowed  # the cache was not poisoned


@SETTINGS
@given(
    st.lists(st.tuples(st.binary(max_size=300), st.binary(max_size=80)), min_size=1, max_size=10),
    st.integers(0, 3),
)
def test_random_hops_are_denied(hops: list[tuple[bytes, bytes]], version: int) -> None:
    msg = dpb.DelegationChain(version=version)
    for body, signature in hops:
        msg.hops.add(body=body, signature=signature)
    assert not decide(msg.SerializeToString()).allowed


@SETTINGS
@given(st.data())
def test_hop_bodies_with_random_fields_are_denied(data: st.DataObject) -> None:
    """Well-formed protobuf with hostile values: huge times, odd IDs, empty strings."""
    raw = split_chain(VALID).hops()
    i = data.draw(st.integers(0, len(raw) - 1))
    hop = dpb.Hop.FromString(raw[i].body)
    name = data.draw(
        st.sampled_from(
            [
                "issuer",
                "audience",
                "method",
                "issued_at_ms",
                "expires_at_ms",
                "nonce",
                "trace_id",
                "prev_digest",
            ]
        )
    )
    if name in ("issued_at_ms", "expires_at_ms"):
        setattr(hop, name, data.draw(st.integers(-(2**63), 2**63 - 1)))
    elif name in ("nonce", "trace_id", "prev_digest"):
        setattr(hop, name, data.draw(st.binary(max_size=64)))
    else:
        setattr(hop, name, data.draw(st.text(max_size=80)))
    chain = dpb.DelegationChain(version=1)
    for j, r in enumerate(raw):
        chain.hops.add(body=hop.SerializeToString() if j == i else r.body, signature=r.signature)
    assert not decide(chain.SerializeToString()).allowed or hop.SerializeToString() == raw[i].body
