"""What a chain verification returns: `ChainDecision` and `VerifiedChain`.

Both are NamedTuples: immutable, and built on every verified call, where a frozen
dataclass would cost a few microseconds more.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import NamedTuple

from trustmesh.decision import Decision, Reason
from trustmesh.delegation_format import METADATA_KEY, AgentOrigin, Origin, UserOrigin
from trustmesh.spiffe_id import SpiffeId

__all__ = ["CHAIN_HEADER", "ORIGIN_HEADER", "ChainDecision", "VerifiedChain"]

ORIGIN_HEADER = "trustmesh-origin"
CHAIN_HEADER = "trustmesh-chain"


class VerifiedChain(NamedTuple):
    """What a verified chain proves, for the sidecar and (rendered) for the app."""

    origin: Origin
    # The hops' issuers in order: the origin agent first, the mTLS peer last.
    agents: tuple[SpiffeId, ...]
    callee: SpiffeId
    method: str
    # The scopes of the last hop: what the chain grants this call.
    scopes: frozenset[str]
    # The earliest expiry among the hops (Unix ms): the chain is worth nothing after it.
    expires_at_ms: int
    trace_id: bytes
    # The chain as received, for the app to copy into its outgoing calls.
    data: bytes
    last_signed: bool = True

    def __repr__(self) -> str:
        return (
            f"VerifiedChain(origin={self.origin}, agents={[str(a) for a in self.agents]}, "
            f"callee={self.callee}, method={self.method}, scopes={sorted(self.scopes)}, "
            f"expires_at={self.expires_at.isoformat()}, last_signed={self.last_signed})"
        )

    @property
    def expires_at(self) -> datetime:
        return datetime.fromtimestamp(self.expires_at_ms / 1000, UTC)

    @property
    def depth(self) -> int:
        return len(self.agents)

    @property
    def delegated(self) -> bool:
        """Depth >= 2 or a user origin: DelegationPolicies decided."""
        return self.depth >= 2 or isinstance(self.origin, UserOrigin)

    def origin_header(self) -> str:
        """`trustmesh-origin`: compact ASCII JSON, `{"agent": id}` or `{"user": {...}}`."""
        if isinstance(self.origin, AgentOrigin):
            doc: dict[str, object] = {"agent": str(self.origin.spiffe_id)}
        else:
            doc = {
                "user": {
                    "issuer": self.origin.issuer,
                    "subject": self.origin.subject,
                    "claims": {name: list(values) for name, values in self.origin.claims},
                }
            }
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=True)

    def chain_header(self) -> str:
        """`trustmesh-chain`: every agent in order, this one last, joined by ' > '."""
        return " > ".join(str(a) for a in (*self.agents, self.callee))

    def headers(self) -> tuple[tuple[str, str | bytes], ...]:
        """The metadata the sidecar adds to the call it forwards to its app."""
        return (
            (ORIGIN_HEADER, self.origin_header()),
            (CHAIN_HEADER, self.chain_header()),
            (METADATA_KEY, self.data),
        )


class ChainDecision(NamedTuple):
    """A `Decision` and, when allowed with a chain present, what the chain proves."""

    decision: Decision
    chain: VerifiedChain | None = None

    @property
    def allowed(self) -> bool:
        return self.decision.allowed

    @property
    def reason(self) -> Reason:
        return self.decision.reason

    @property
    def message(self) -> str:
        return self.decision.message
