"""Authorization decisions as values.

A `Decision` is what `trustmesh.authz.authorize()` returns: allowed or not, a stable
reason code, a human message and the rule that matched. The reason travels into the
span, the audit log and the gRPC status details (`trustmesh: <reason>: <message>`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from trustmesh.errors import AccessDeniedError, Code

__all__ = ["Decision", "Reason", "enforce"]


class Reason(enum.StrEnum):
    ALLOWED = "allowed"
    # the caller or callee record
    AGENT_NOT_REGISTERED = "agent_not_registered"
    AGENT_DISABLED = "agent_disabled"
    AGENT_EXPIRED = "agent_expired"
    # policy
    NO_MATCHING_POLICY = "no_matching_policy"
    METHOD_NOT_IN_BLUEPRINT = "method_not_in_blueprint"
    # outbound resolution
    MISSING_TARGET = "missing_target"
    UNKNOWN_TARGET = "unknown_target"
    NO_ENDPOINT = "no_endpoint"
    # transport and identity
    PEER_UNAUTHENTICATED = "peer_unauthenticated"
    PEER_IDENTITY_MISMATCH = "peer_identity_mismatch"
    PEER_UNTRUSTED = "peer_untrusted"
    # the sidecar itself
    NO_SNAPSHOT = "no_snapshot"
    BAD_METHOD = "bad_method"
    LIMIT_EXCEEDED = "limit_exceeded"
    # delegation chains (trustmesh.delegation; docs/delegation.md)
    CHAIN_MALFORMED = "chain_malformed"
    CHAIN_BAD_SIGNATURE = "chain_bad_signature"
    CHAIN_BROKEN_LINK = "chain_broken_link"
    CHAIN_ISSUER_NOT_PEER = "chain_issuer_not_peer"
    CHAIN_WRONG_AUDIENCE = "chain_wrong_audience"
    CHAIN_EXPIRED = "chain_expired"
    CHAIN_TOO_DEEP = "chain_too_deep"
    CHAIN_SCOPE_ESCALATION = "chain_scope_escalation"
    CHAIN_AGENT_INACTIVE = "chain_agent_inactive"
    CHAIN_ORIGIN_NOT_ALLOWED = "chain_origin_not_allowed"
    CHAIN_PATH_NOT_ALLOWED = "chain_path_not_allowed"
    # user access tokens (trustmesh.user_token)
    USER_TOKEN_INVALID = "user_token_invalid"  # noqa: S105 (a reason code, not a secret)


_CODES: dict[Reason, Code] = {
    Reason.PEER_UNAUTHENTICATED: Code.UNAUTHENTICATED,
    Reason.PEER_IDENTITY_MISMATCH: Code.UNAUTHENTICATED,
    Reason.PEER_UNTRUSTED: Code.UNAUTHENTICATED,
    Reason.NO_SNAPSHOT: Code.UNAVAILABLE,
    Reason.NO_ENDPOINT: Code.UNAVAILABLE,
    Reason.MISSING_TARGET: Code.INVALID_ARGUMENT,
    Reason.BAD_METHOD: Code.INVALID_ARGUMENT,
    Reason.LIMIT_EXCEEDED: Code.RESOURCE_EXHAUSTED,
    Reason.CHAIN_MALFORMED: Code.INVALID_ARGUMENT,
    Reason.USER_TOKEN_INVALID: Code.UNAUTHENTICATED,
}


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: Reason
    message: str
    policy: str | None = None

    @classmethod
    def allow(cls, policy: str, message: str = "allowed") -> Decision:
        return cls(True, Reason.ALLOWED, message, policy)

    @classmethod
    def deny(cls, reason: Reason, message: str, policy: str | None = None) -> Decision:
        return cls(False, reason, message, policy)

    @property
    def code(self) -> Code:
        """The gRPC status a denial maps to."""
        if self.allowed:
            return Code.OK
        return _CODES.get(self.reason, Code.PERMISSION_DENIED)


def enforce(decision: Decision) -> None:
    """Raise `AccessDeniedError` for a denial; do nothing for an allow."""
    if not decision.allowed:
        raise AccessDeniedError(decision.message, reason=decision.reason.value, code=decision.code)
