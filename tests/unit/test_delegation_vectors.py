"""The committed delegation vectors (tests/vectors/delegation/), table-driven.

Each chain case names the mTLS peer, the receiving agent, the method, the clock and
the exact reason the verifier must give; each token case the user it proves or the
error it must raise. The files come from scripts/gen_delegation_vectors.py (test
keys only); this module only reads them, so another implementation can use them too.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from trustmesh import wire
from trustmesh.decision import Reason
from trustmesh.delegation import ChainCache, verify_chain
from trustmesh.delegation_policy import DelegationPolicy
from trustmesh.errors import MeshError
from trustmesh.manifest import parse_documents
from trustmesh.peer_verify import PeerVerifier
from trustmesh.resources import AccessPolicy, Agent, AgentBlueprint
from trustmesh.snapshot import Snapshot
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.user_token import IssuerConfig, StaticJwks, UserTokenError, UserTokenVerifier
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.x509svid import BundleSet, TrustBundle

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "delegation"
CHAINS = json.loads((VECTORS / "chains.json").read_text())
TOKENS = json.loads((VECTORS / "user_tokens.json").read_text())
KEYS = json.loads((VECTORS / "keys.json").read_text())


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def mesh_snapshot(yaml_text: str, disabled: set[str]) -> Snapshot:
    """A snapshot holding the resources of a manifest, as the registry would publish them."""
    resources = parse_documents(yaml_text, "mesh.yaml")
    blueprints = {r.name: r for r in resources if isinstance(r, AgentBlueprint)}
    changes: list[rpb.Change] = []
    for r in resources:
        if isinstance(r, AgentBlueprint):
            changes.append(rpb.Change(put_blueprint=wire.blueprint_to_pb(r)))
        elif isinstance(r, Agent):
            off = r.name in disabled
            agent = wire.agent_to_pb(
                r, blueprints[r.blueprint], disabled=off, disabled_reason="vectors" if off else ""
            )
            changes.append(rpb.Change(put_agent=agent))
        elif isinstance(r, AccessPolicy):
            changes.append(rpb.Change(put_policy=wire.policy_to_pb(r)))
        elif isinstance(r, DelegationPolicy):
            changes.append(rpb.Change(put_delegation_policy=wire.delegation_policy_to_pb(r)))
    snapshot = Snapshot()
    assert snapshot.apply(
        rpb.SnapshotUpdate(epoch="vectors", revision=1, full=True, changes=changes)
    )
    return snapshot


@pytest.fixture(scope="module")
def snapshot() -> Snapshot:
    return mesh_snapshot((VECTORS / "mesh.yaml").read_text(), set(CHAINS["disabled"]))


@pytest.fixture(scope="module")
def verifier() -> PeerVerifier:
    bundles = [
        TrustBundle.from_pem(TrustDomain.parse(td), KEYS["cas"][td]["cert"].encode())
        for td in CHAINS["bundles"]
    ]
    return PeerVerifier(BundleSet.of(*bundles))


def _decide(case: dict[str, Any], snapshot: Snapshot, verifier: PeerVerifier, cache: ChainCache):  # type: ignore[no-untyped-def]
    return verify_chain(
        base64.b64decode(case["chain"]),
        peer=SpiffeId.parse(case["peer"]),
        local=SpiffeId.parse(case["local"]),
        method=case["method"],
        snapshot=snapshot,
        verifier=verifier,
        cache=cache,
        now=_time(case["now"]),
    )


@pytest.mark.parametrize("case", CHAINS["cases"], ids=[c["name"] for c in CHAINS["cases"]])
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_chain_vector(
    case: dict[str, Any], warm: bool, snapshot: Snapshot, verifier: PeerVerifier
) -> None:
    cache = ChainCache()
    if warm:  # a second verification runs from the caches and must decide the same
        _decide(case, snapshot, verifier, cache)
    result = _decide(case, snapshot, verifier, cache)
    expect = case["expect"]
    assert result.reason == Reason(expect["reason"]), result.message
    assert result.allowed == (expect["reason"] == "allowed")
    if "policy" in expect:
        assert (result.decision.policy or "") == expect["policy"]
    assert (result.chain is not None) == result.allowed
    assert (VECTORS / "chains" / f"{case['name']}.bin").read_bytes() == base64.b64decode(
        case["chain"]
    )


def test_every_chain_reason_has_a_vector() -> None:
    chain_reasons = {r for r in Reason if r.value.startswith("chain_")} | {Reason.ALLOWED}
    covered = {Reason(c["expect"]["reason"]) for c in CHAINS["cases"]}
    assert chain_reasons <= covered
    # user_token_invalid: every token case with an "error" (see test_token_vector)
    assert sum("error" in c["expect"] for c in TOKENS["cases"]) >= 10


def test_valid_vectors_render_for_the_app(snapshot: Snapshot, verifier: PeerVerifier) -> None:
    by_name = {c["name"]: c for c in CHAINS["cases"]}
    result = _decide(by_name["valid-depth-2"], snapshot, verifier, ChainCache())
    assert result.chain is not None
    assert result.chain.origin_header() == '{"agent":"spiffe://example.org/agents/orchestrator"}'
    assert result.chain.chain_header() == (
        "spiffe://example.org/agents/orchestrator > spiffe://example.org/agents/planner"
        " > spiffe://example.org/agents/tool"
    )
    user = _decide(by_name["valid-user-origin"], snapshot, verifier, ChainCache()).chain
    assert user is not None
    assert json.loads(user.origin_header()) == {
        "user": {
            "issuer": "https://idp.example",
            "subject": "alice",
            "claims": {"groups": ["analysts", "staff"]},
        }
    }
    assert user.depth == 1 and user.delegated


# -- user tokens ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokens() -> UserTokenVerifier:
    return UserTokenVerifier(
        IssuerConfig(
            issuer=i["issuer"],
            audience=tuple(i["audience"]),
            jwks=StaticJwks(i["jwks"]),
            claims=tuple(i["claims"]),
        )
        for i in TOKENS["issuers"]
    )


@pytest.mark.parametrize("case", TOKENS["cases"], ids=[c["name"] for c in TOKENS["cases"]])
def test_token_vector(case: dict[str, Any], tokens: UserTokenVerifier) -> None:
    now = _time(TOKENS["now"])
    expect = case["expect"]
    if "error" in expect:
        with pytest.raises(UserTokenError) as info:
            tokens.verify(case["token"], now=now)
        err: MeshError = info.value
        assert err.reason == "user_token_invalid"
        assert expect["error"] in err.message
        for part in case["token"].split("."):
            if len(part) > 8:
                assert part not in err.message  # the token never appears in an error
        return
    origin = tokens.verify(case["token"], now=now)
    assert origin.issuer == TOKENS["issuers"][0]["issuer"]
    assert origin.subject == expect["subject"]
    assert {n: list(v) for n, v in origin.claims} == expect["claims"]
