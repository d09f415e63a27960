"""Delegation chains through the public API: extending, verifying, caching, signing rule."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from test_delegation_vectors import mesh_snapshot

from trustmesh.decision import Reason
from trustmesh.delegation import (
    METADATA_KEY,
    AgentOrigin,
    ChainCache,
    ChainDecision,
    ChainError,
    UserOrigin,
    extend_chain,
    needs_signed_hop,
    verify_chain,
)
from trustmesh.delegation_format import encode_chain, encode_hop, signing_input
from trustmesh.delegation_parse import split_chain
from trustmesh.limits import DEFAULT_LIMITS, Limits
from trustmesh.peer_verify import PeerVerifier
from trustmesh.snapshot import Snapshot
from trustmesh.spiffe_id import SpiffeId
from trustmesh.v1 import delegation_pb2 as dpb
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.x509svid import X509Svid

from certs import NOW, bundles, issue, make_ca, raises

TD = "example.org"
CA = make_ca(TD)
NAMES = ("orchestrator", "planner", "helper", "tool", "w1", "w2", "w3", "w4", "w5")
SVIDS = {n: issue(CA, f"spiffe://{TD}/agents/{n}") for n in NAMES}
METHOD = "/demo.Tool/Invoke"
MESH = "".join(
    f"---\napiVersion: trustmesh.dev/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}}}\n"
    f"spec: {spec}\n"
    for kind, name, spec in [
        ("AgentBlueprint", "bp", "{allowedMethods: ['*']}"),
        *(
            ("Agent", n, f"{{spiffeId: 'spiffe://{TD}/agents/{n}', blueprint: bp, sponsor: s}}")
            for n in NAMES
        ),
        (
            "DelegationPolicy",
            "via-planner",
            "{callees: [{name: tool}], allowedOrigins: [{name: orchestrator}, "
            "{user: {issuer: 'https://idp.example'}}], "
            "allowedPaths: [[{name: orchestrator}], [{name: orchestrator}, {name: planner}, '**']]}",
        ),
    ]
)


def sid(name: str) -> SpiffeId:
    return SpiffeId.parse(f"spiffe://{TD}/agents/{name}")


@pytest.fixture
def snapshot() -> Snapshot:
    return mesh_snapshot(MESH, set())


@pytest.fixture(scope="module")
def verifier() -> PeerVerifier:
    return PeerVerifier(bundles(CA))


def build(
    path: Sequence[str],
    callee: str = "tool",
    *,
    scopes: Sequence[str] = ("tools:invoke", "read"),
    sign_last: bool = True,
    origin_user: UserOrigin | None = None,
    svids: dict[str, X509Svid] = SVIDS,
    nonce: bytes = b"n" * 16,
) -> bytes:
    chain: bytes | None = None
    names = [*path, callee]
    for i, issuer in enumerate(path):
        chain = extend_chain(
            chain,
            svid=svids[issuer],
            audience=sid(names[i + 1]),
            method=METHOD,
            now=NOW,
            nonce=nonce[:-1] + bytes([i]),
            scopes=scopes if i == 0 else None,
            origin_user=origin_user if i == 0 else None,
            sign=sign_last or i < len(path) - 1,
        )
    assert chain is not None
    return chain


def check(
    chain: bytes | None,
    snapshot: Snapshot,
    verifier: PeerVerifier,
    *,
    peer: str = "planner",
    local: str = "tool",
    cache: ChainCache | None = None,
    after: timedelta = timedelta(seconds=1),
) -> ChainDecision:
    return verify_chain(
        chain,
        peer=sid(peer),
        local=sid(local),
        method=METHOD,
        snapshot=snapshot,
        verifier=verifier,
        cache=cache or ChainCache(),
        now=NOW + after,
    )


def test_a_delegated_chain_proves_origin_path_and_scopes(
    snapshot: Snapshot, verifier: PeerVerifier
) -> None:
    result = check(build(["orchestrator", "planner", "helper"]), snapshot, verifier, peer="helper")
    assert (result.allowed, result.decision.policy) == (True, "via-planner")
    chain = result.chain
    assert chain is not None
    assert chain.origin == AgentOrigin(sid("orchestrator"))
    assert chain.agents == (sid("orchestrator"), sid("planner"), sid("helper"))
    assert (chain.callee, chain.depth, chain.delegated) == (sid("tool"), 3, True)
    assert chain.scopes == {"tools:invoke", "read"}
    assert chain.expires_at == NOW + timedelta(seconds=60)
    headers = dict(chain.headers())
    assert headers["trustmesh-chain"].count(" > ") == 3
    assert headers[METADATA_KEY] == chain.data
    assert all(isinstance(v, bytes) or v.isascii() for v in headers.values())


def test_no_chain_and_a_one_hop_autonomous_chain_are_direct_calls(
    snapshot: Snapshot, verifier: PeerVerifier
) -> None:
    none = check(None, snapshot, verifier)
    assert (none.allowed, none.chain) == (True, None)
    direct = check(build(["helper"]), snapshot, verifier, peer="helper")  # no policy names helper
    assert direct.allowed and direct.chain is not None and not direct.chain.delegated
    assert "direct call" in direct.message


def test_a_user_origin_is_delegated_even_at_depth_one(
    snapshot: Snapshot, verifier: PeerVerifier
) -> None:
    user = UserOrigin("https://idp.example", "alice", (("groups", ("analysts",)),))
    allowed = check(
        build(["orchestrator"], origin_user=user), snapshot, verifier, peer="orchestrator"
    )
    assert allowed.allowed and allowed.chain is not None and allowed.chain.origin == user
    other = UserOrigin("https://other.example", "alice")
    denied = check(
        build(["orchestrator"], origin_user=other), snapshot, verifier, peer="orchestrator"
    )
    assert denied.reason is Reason.CHAIN_ORIGIN_NOT_ALLOWED


def test_not_ready_snapshot_denies(verifier: PeerVerifier) -> None:
    result = check(build(["orchestrator", "planner"]), Snapshot(), verifier)
    assert result.reason is Reason.NO_SNAPSHOT


# -- extending --------------------------------------------------------------------------


def test_scopes_are_inherited_or_narrowed_never_widened() -> None:
    first = build(["orchestrator"], "planner")
    kept = extend_chain(first, svid=SVIDS["planner"], audience=sid("tool"), method=METHOD,
                        now=NOW, nonce=b"x" * 16)  # fmt: skip
    narrowed = extend_chain(first, svid=SVIDS["planner"], audience=sid("tool"), method=METHOD,
                            now=NOW, nonce=b"x" * 16, scopes=["read"])  # fmt: skip
    last = [dpb.Hop.FromString(split_chain(c).hop(1).body) for c in (kept, narrowed)]
    assert [sorted(h.scopes) for h in last] == [["read", "tools:invoke"], ["read"]]
    with raises(ChainError, "would grant scopes the incoming chain does not: admin") as info:
        extend_chain(first, svid=SVIDS["planner"], audience=sid("tool"), method=METHOD,
                     now=NOW, nonce=b"x" * 16, scopes=["read", "admin"])  # fmt: skip
    assert info.value.reason == "chain_scope_escalation"


def _extend(chain: bytes | None, issuer: str = "planner", **kw: object) -> bytes:
    args: dict[str, object] = {"audience": sid("tool"), "method": METHOD, "now": NOW,
                               "nonce": b"x" * 16, **kw}  # fmt: skip
    return extend_chain(chain, svid=SVIDS[issuer], **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "issuer", "reason", "message"),
    [
        (lambda: b"garbage", "planner", "chain_malformed", "cannot extend the incoming chain"),
        (lambda: build(["orchestrator"], "helper"), "planner", "chain_wrong_audience",
         "addressed to 'spiffe://example.org/agents/helper', not to"),
        (lambda: build(["orchestrator"], "planner", sign_last=False), "planner",
         "chain_bad_signature", "last hop (by 'spiffe://example.org/agents/orchestrator') is unsigned"),
        (lambda: build(["orchestrator", "planner", "w1", "w2", "w3", "w4", "w5", "helper"],
                       "planner"), "planner", "chain_too_deep", "already has 8 hops"),
    ],
    ids=["malformed", "relay-by-non-audience", "unsigned-last-hop", "too-deep"],
)  # fmt: skip
def test_extend_refuses_chains_it_may_not_extend(
    make: object, issuer: str, reason: str, message: str
) -> None:
    with raises(ChainError, message) as info:
        _extend(make(), issuer)  # type: ignore[operator]
    assert info.value.reason == reason
    assert info.value.decision.reason == Reason(reason)


def test_extend_refuses_an_expired_chain_and_clamps_expiry() -> None:
    first = build(["orchestrator"], "planner")
    with raises(ChainError, "the incoming chain has expired"):
        _extend(first, now=NOW + timedelta(seconds=60))
    later = _extend(first, now=NOW + timedelta(seconds=30), ttl=timedelta(seconds=120))
    hop = dpb.Hop.FromString(split_chain(later).hop(1).body)
    assert hop.expires_at_ms == int((NOW + timedelta(seconds=60)).timestamp() * 1000)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"ttl": timedelta(0)}, "ttl must be positive"),
        ({"ttl": timedelta(minutes=6)}, "at most 300 s"),
        ({"method": "Invoke"}, "is not a gRPC method path"),
        ({"nonce": b"short"}, "nonce must be 8 to 32 bytes"),
        ({"trace_id": b"x" * 8}, "trace_id 0 or 16 bytes"),
        ({"origin_user": UserOrigin("i", "s")}, "an existing chain keeps its origin"),
    ],
    ids=["zero-ttl", "ttl-over-cap", "bad-method", "short-nonce", "bad-trace", "origin-twice"],
)
def test_extend_rejects_bad_arguments(kw: dict[str, object], message: str) -> None:
    with raises(ValueError, message):
        _extend(build(["orchestrator"], "planner"), **kw)


def test_a_repeated_agent_refers_to_its_earlier_certificate() -> None:
    chain = build(["orchestrator", "planner", "orchestrator"])
    hops = [dpb.Hop.FromString(split_chain(chain).hop(i).body) for i in range(3)]
    assert [h.WhichOneof("issuer_cert") for h in hops] == ["cert_chain", "cert_chain", "cert_ref"]
    assert hops[2].cert_ref == 0
    rotated = {**SVIDS, "orchestrator": issue(CA, SVIDS["orchestrator"].spiffe_id)}
    renewed = extend_chain(
        build(["orchestrator"], "planner"),
        svid=SVIDS["planner"],
        audience=sid("orchestrator"),
        method=METHOD,
        now=NOW,
        nonce=b"y" * 16,
    )
    again = extend_chain(renewed, svid=rotated["orchestrator"], audience=sid("tool"),
                         method=METHOD, now=NOW, nonce=b"z" * 16)  # fmt: skip
    assert dpb.Hop.FromString(split_chain(again).hop(2).body).WhichOneof("issuer_cert") == (
        "cert_chain"  # a rotated SVID carries its new certificate
    )


def test_an_oversized_chain_is_refused_when_extended() -> None:
    small = Limits(max_delegation_bytes=1200)
    with raises(ChainError, "over the 1200-byte limit") as info:
        _extend(build(["orchestrator"], "planner"), limits=small)
    assert info.value.reason == "chain_too_deep"


def test_depth_eight_fits_the_metadata_limit(snapshot: Snapshot, verifier: PeerVerifier) -> None:
    chain = build(["orchestrator", "planner", "helper", "w1", "w2", "w3", "w4", "w5"])
    assert len(chain) <= DEFAULT_LIMITS.max_delegation_bytes
    assert len(base64.b64encode(chain)) < DEFAULT_LIMITS.max_metadata_bytes * 3 // 4
    assert check(chain, snapshot, verifier, peer="w5").allowed


# -- verifying: encodings, caches, and what a cache hit never skips --------------------


def test_a_non_canonical_container_still_verifies(
    snapshot: Snapshot, verifier: PeerVerifier
) -> None:
    chain = build(["orchestrator", "planner"])
    hops = split_chain(chain).hops()
    # hops first, then the version field: the same message, other bytes
    reordered = b"".join(
        dpb.DelegationChain(hops=[dpb.SignedHop(body=h.body, signature=h.signature)])
        .SerializeToString() for h in hops
    ) + b"\x08\x01"  # fmt: skip
    assert reordered != chain and split_chain(reordered).count == 2
    cache = ChainCache()
    assert check(chain, snapshot, verifier, cache=cache).allowed
    assert check(reordered, snapshot, verifier, cache=cache).allowed


def test_warm_verification_hits_the_prefix_cache(
    snapshot: Snapshot, verifier: PeerVerifier
) -> None:
    cache = ChainCache()
    first = build(["orchestrator", "planner", "helper"], nonce=b"a" * 16)
    assert check(first, snapshot, verifier, peer="helper", cache=cache).allowed
    # same prefix, a new last hop: only that hop is verified
    prefix = encode_chain((h.body, h.signature) for h in split_chain(first).hops()[:2])
    second = extend_chain(prefix, svid=SVIDS["helper"], audience=sid("tool"), method=METHOD,
                          now=NOW, nonce=b"b" * 16)  # fmt: skip
    assert check(second, snapshot, verifier, peer="helper", cache=cache).allowed
    info = cache.info()
    assert info["prefixes"].hits >= 1 and info["prefixes"].size == 2


def test_a_cache_hit_still_checks_time_agents_and_policy(
    snapshot: Snapshot, verifier: PeerVerifier
) -> None:
    cache = ChainCache()
    chain = build(["orchestrator", "planner"])
    assert check(chain, snapshot, verifier, cache=cache).allowed
    late = check(chain, snapshot, verifier, cache=cache, after=timedelta(seconds=61))
    assert late.reason is Reason.CHAIN_EXPIRED
    disable = snapshot.agent_by_name("orchestrator")
    assert disable is not None
    off = rpb.Change(put_agent=dict_agent("orchestrator", disabled=True))
    assert snapshot.apply(rpb.SnapshotUpdate(epoch="vectors", revision=2, base_revision=1,
                                             changes=[off]))  # fmt: skip
    assert check(chain, snapshot, verifier, cache=cache).reason is Reason.CHAIN_AGENT_INACTIVE
    on = rpb.Change(put_agent=dict_agent("orchestrator", disabled=False))
    gone = rpb.Change(delete_delegation_policy="via-planner")
    assert snapshot.apply(rpb.SnapshotUpdate(epoch="vectors", revision=3, base_revision=2,
                                             changes=[on, gone]))  # fmt: skip
    assert check(chain, snapshot, verifier, cache=cache).reason is Reason.CHAIN_ORIGIN_NOT_ALLOWED


def dict_agent(name: str, *, disabled: bool):  # type: ignore[no-untyped-def]
    from trustmesh.v1 import resources_pb2 as pb

    return pb.Agent(
        name=name, spiffe_id=str(sid(name)), blueprint="bp", sponsor="s",
        state=pb.AGENT_STATE_DISABLED if disabled else pb.AGENT_STATE_ACTIVE,
    )  # fmt: skip


def test_new_bundles_drop_what_the_old_ones_verified(snapshot: Snapshot) -> None:
    cache = ChainCache()
    chain = build(["orchestrator", "planner", "helper"])
    assert check(chain, snapshot, PeerVerifier(bundles(CA)), peer="helper", cache=cache).allowed
    rotated = PeerVerifier(bundles(make_ca(TD)))  # the old CA is gone from the bundle
    denied = check(chain, snapshot, rotated, peer="helper", cache=cache)
    assert denied.reason is Reason.CHAIN_BAD_SIGNATURE
    assert "does not chain to the trust bundle" in denied.message


def test_caches_are_bounded(snapshot: Snapshot, verifier: PeerVerifier) -> None:
    cache = ChainCache(limits=Limits(delegation_prefix_cache=2, delegation_policy_cache=2))
    for i in range(5):
        chain = build(["orchestrator", "planner", "helper"], nonce=bytes([i]) * 16)
        assert check(chain, snapshot, verifier, peer="helper", cache=cache).allowed
    info = cache.info()
    assert info["prefixes"].size <= 2 and info["policies"].size <= 2


# -- the sign-only-when-needed rule ------------------------------------------------------


def test_only_hops_to_possible_forwarders_need_a_signature(snapshot: Snapshot) -> None:
    # via-planner: [orchestrator], [orchestrator, planner, '**']: '**' lets anyone forward
    assert needs_signed_hop(snapshot, sid("tool"))
    narrow = MESH.replace("{name: planner}, '**'", "{name: planner}")
    snap = mesh_snapshot(narrow, set())
    assert needs_signed_hop(snap, sid("planner"))  # planner issues hop 1 of [orch, planner]
    assert not needs_signed_hop(snap, sid("tool"))  # tool is only ever a callee
    assert not needs_signed_hop(snap, sid("orchestrator"))  # only ever hop 0
    assert needs_signed_hop(snap, sid("unknown"))  # unknown: the safe side


def test_an_unsigned_last_hop_verifies_but_cannot_be_forwarded(
    snapshot: Snapshot, verifier: PeerVerifier
) -> None:
    chain = build(["orchestrator", "planner"], sign_last=False)
    assert check(chain, snapshot, verifier).allowed
    # forwarded anyway (by a sidecar that ignored extend_chain's refusal): hop 1 is
    # now in the middle, where only a signed hop may be
    hops = split_chain(chain).hops()
    body = encode_hop(
        issuer=sid("tool"), audience=sid("helper"), method=METHOD, scopes=["read"],
        issued_at_ms=int(NOW.timestamp() * 1000), expires_at_ms=int(NOW.timestamp() * 1000) + 1,
        nonce=b"f" * 16, trace_id=b"", prev_digest=hops[1].digest,
        cert_chain=SVIDS["tool"].chain_der(),
    )  # fmt: skip
    key = SVIDS["tool"].private_key
    signature = key.sign(signing_input(body), ec.ECDSA(hashes.SHA256()))
    forwarded = encode_chain([*((h.body, h.signature) for h in hops), (body, signature)])
    denied = check(forwarded, snapshot, verifier, peer="tool", local="helper")
    assert denied.reason is Reason.CHAIN_BAD_SIGNATURE
    assert "hop 1 by 'spiffe://example.org/agents/planner' is unsigned" in denied.message
