"""Delegation chains in the sidecar: extend on the way out, verify on the way in.

Outbound, the sidecar takes the chain the agent copied from its incoming call (or a
user token the agent presents), appends a hop signed with its own SVID key when a
later verifier could need it (docs/delegation.md, "When to sign"), and sends the
result as `trustmesh-delegation-bin`. A user token that this sidecar verified is not
forwarded.

Inbound, after the mTLS peer was authorized, the chain is verified against the peer,
this agent, the snapshot and the DelegationPolicies. A denial carries a `chain_*` or
`user_token_invalid` reason. The verified chain goes to the app, and its origin,
depth and hops go on the span.
"""

from __future__ import annotations

import secrets
from datetime import datetime

from opentelemetry import trace

from trustmesh.decision import Decision, Reason
from trustmesh.delegation import (
    DIRECT_CALL,
    AgentOrigin,
    ChainDecision,
    ChainError,
    UserOrigin,
    VerifiedChain,
    extend_chain,
    verify_chain,
)
from trustmesh.spiffe_id import SpiffeId
from trustmesh.telemetry import trace_id_of
from trustmesh.user_token import UserTokenError
from trustmesh_sidecar import headers as hdr
from trustmesh_sidecar.engine import Headers
from trustmesh_sidecar.state import SidecarState

__all__ = ["Outgoing", "annotate", "inbound_chain", "outbound_chain"]

_MALFORMED = b"\x00"  # a text value where bytes belong: let the verifier refuse it


def inbound_chain(
    state: SidecarState,
    raw: str | bytes | None,
    caller: SpiffeId,
    method: str,
    *,
    at: datetime | None = None,
) -> ChainDecision:
    """Verify the call's chain, the `trustmesh-delegation-bin` value `raw` (None: a
    direct call). `at` re-checks an open call as of when it started: a chain's expiry
    gates the start of a call; agent status and policy are always taken from the
    current snapshot."""
    if raw is None:
        return DIRECT_CALL  # what verify_chain answers, without reading the clock
    data = raw if isinstance(raw, bytes) else _MALFORMED
    return verify_chain(
        data,
        peer=caller,
        local=state.spiffe_id,
        method=method,
        snapshot=state.snapshot,
        verifier=state.verifier,
        cache=state.chain_cache,
        now=at or state.now(),
    )


class Outgoing:
    """The chain to send on, and whether the agent's bearer token stops here."""

    __slots__ = ("chain", "drop_authorization")

    def __init__(self, chain: bytes | None, drop_authorization: bool) -> None:
        self.chain = chain
        self.drop_authorization = drop_authorization


def _user_origin(
    state: SidecarState, agent: hdr.Reserved
) -> tuple[UserOrigin | None, bool] | Decision:
    explicit = agent.user_token
    bearer = agent.bearer_token()
    if explicit is None and (bearer is None or state.user_tokens is None):
        return None, False  # an app's own Authorization header is its own business
    token = explicit if explicit is not None else bearer
    if state.user_tokens is None:
        return Decision.deny(
            Reason.USER_TOKEN_INVALID,
            "this sidecar trusts no user-token issuers (configure --oidc-issuers)",
        )
    if not isinstance(token, str):
        return Decision.deny(Reason.USER_TOKEN_INVALID, "the user token must be text")
    try:
        user = state.user_tokens.verify(token, now=state.now())
    except UserTokenError as e:
        return Decision.deny(Reason.USER_TOKEN_INVALID, e.message)
    # Whichever header carried it, an `Authorization: Bearer` goes no further.
    return user, bearer is not None


def outbound_chain(
    state: SidecarState,
    agent: hdr.Reserved,
    callee: SpiffeId,
    method: str,
    span: trace.Span,
    *,
    headers: Headers,
    sign: bool,
) -> Outgoing | Decision:
    """The chain to send to `callee`, from the agent's headers (`agent`, read from
    `headers`). `sign`: whether our hop must be signed (`needs_signed_hop` for the
    current snapshot)."""
    origin = _user_origin(state, agent)
    if isinstance(origin, Decision):
        return origin
    user, drop_authorization = origin
    raw = agent.delegation
    incoming = raw if isinstance(raw, bytes) or raw is None else _MALFORMED
    if incoming is None and user is None and not sign:
        return Outgoing(None, drop_authorization)  # a direct call: mTLS says it all
    found = trace_id_of(span, headers)
    trace_id = found.to_bytes(16, "big") if found else b""
    try:
        chain = extend_chain(
            incoming,
            svid=state.svid,
            audience=callee,
            method=method,
            now=state.now(),
            nonce=secrets.token_bytes(16),
            trace_id=trace_id,
            origin_user=user,
            sign=sign,
        )
    except ChainError as e:
        return e.decision
    except ValueError as e:  # e.g. a user claim that can't be carried
        return Decision.deny(Reason.CHAIN_MALFORMED, f"cannot extend the chain: {e}")
    return Outgoing(chain, drop_authorization)


def origin_text(chain: VerifiedChain) -> str:
    origin = chain.origin
    if isinstance(origin, AgentOrigin):
        return str(origin.spiffe_id)
    return f"user:{origin.subject}@{origin.issuer}"


def annotate(span: trace.Span, chain: VerifiedChain) -> None:
    """Origin, depth and chain on the span, and one event per hop naming the previous."""
    span.set_attribute("trustmesh.origin", origin_text(chain))
    span.set_attribute("trustmesh.chain.depth", chain.depth)
    span.set_attribute("trustmesh.chain", chain.chain_header())
    hops = (*chain.agents, chain.callee)
    for i in range(len(chain.agents)):
        span.add_event(
            "trustmesh.delegation.hop",
            {
                "trustmesh.hop.index": i,
                "trustmesh.hop.issuer": str(hops[i]),
                "trustmesh.hop.audience": str(hops[i + 1]),
                "trustmesh.hop.previous": i - 1,
            },
        )
