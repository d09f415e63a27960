"""Delegation chains: the public API, for the sidecar and for tests.

An orchestrator calls a planner, which calls a tool. Each sidecar sees only its
mTLS peer; a delegation chain lets the tool's sidecar verify who started the
orchestration, on whose behalf, and through which agents, with no central round
trip. Each hop is signed by the calling sidecar's own SVID key, and the verifier
requires the last hop's issuer to be the mTLS peer. docs/delegation.md is the
specification.

Caller side (outbound):
    if needs_signed_hop(snapshot, target) or incoming is not None or user is not None:
        data = extend_chain(incoming, svid=svid, audience=target, method=path, now=now,
                            nonce=secrets.token_bytes(16), trace_id=trace_id,
                            origin_user=user, sign=needs_signed_hop(snapshot, target))

Callee side (inbound), after `authorize()` allowed the mTLS peer:
    result = verify_chain(data, peer=peer, local=me, method=path, snapshot=snapshot,
                          verifier=peer_verifier, cache=chain_cache, now=now)
    if not result.allowed: reject with result.decision
    elif result.chain is not None: add result.chain.headers() to the call to the app

Modules: `delegation_format` (the wire format, writing), `delegation_parse` (reading),
`delegation_verify`, `delegation_result`, `delegation_extend`, `delegation_cache`,
`delegation_policy` (the DelegationPolicy resource) and `delegation_manifest` (its YAML).
"""

from __future__ import annotations

from trustmesh.delegation_cache import ChainCache
from trustmesh.delegation_extend import extend_chain, needs_signed_hop
from trustmesh.delegation_format import (
    METADATA_KEY,
    AgentOrigin,
    ChainError,
    Origin,
    UserOrigin,
)
from trustmesh.delegation_result import CHAIN_HEADER, ORIGIN_HEADER, ChainDecision, VerifiedChain
from trustmesh.delegation_verify import DIRECT_CALL, verify_chain

__all__ = [
    "CHAIN_HEADER",
    "DIRECT_CALL",
    "METADATA_KEY",
    "ORIGIN_HEADER",
    "AgentOrigin",
    "ChainCache",
    "ChainDecision",
    "ChainError",
    "Origin",
    "UserOrigin",
    "VerifiedChain",
    "extend_chain",
    "needs_signed_hop",
    "verify_chain",
]
