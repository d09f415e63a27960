"""Every bound in one frozen config: walks, sizes and counts all have limits."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_LIMITS", "Limits"]


@dataclass(frozen=True, slots=True)
class Limits:
    # Bytes of one gRPC message, either direction.
    max_message_bytes: int = 4 * 1024 * 1024
    # Bytes of one snapshot message on the watch stream (a full snapshot of 100,000
    # agents is about 14 MB); only the registry connection allows this much.
    max_snapshot_bytes: int = 256 * 1024 * 1024
    # Bytes of a header list (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE) that the sidecar
    # accepts from its agent and from peers: room for a depth-8 delegation chain
    # (base64) plus a 2 KiB user token. Agents set grpc.max_metadata_size to at least this.
    max_metadata_bytes: int = 16 * 1024
    # Concurrent HTTP/2 streams per connection, and calls in flight per listener.
    max_concurrent_streams: int = 256
    max_inflight_calls: int = 1024
    # Connection age after which peers must re-handshake (picks up rotated SVIDs),
    # and the grace given to streams still open at that point.
    max_connection_age_s: float = 300.0
    max_connection_age_grace_s: float = 600.0
    # Resources in one apply, and bytes of one manifest document.
    max_apply_documents: int = 1000
    max_document_bytes: int = 256 * 1024
    # Cached verified peer certificates and decisions.
    verified_cert_cache: int = 4096
    decision_cache: int = 65536
    # Delegation chains (docs/delegation.md). Hops in one chain, and bytes of the
    # serialized chain before base64: a depth-8 chain of P-256 SVIDs is about 6 KiB,
    # 8 KiB after base64, so this leaves half the header list for everything else.
    max_delegation_depth: int = 8
    max_delegation_bytes: int = 9 * 1024
    # Lifetime of a hop: the default a sidecar signs with, the most a verifier
    # accepts (expires_at - issued_at), and the clock skew allowed on issued_at.
    delegation_ttl_s: float = 60.0
    max_delegation_ttl_s: float = 300.0
    delegation_clock_skew_s: float = 5.0
    # Scopes in one hop, and characters of one scope.
    max_delegation_scopes: int = 32
    max_scope_chars: int = 128
    # Cached verified chain prefixes (by the digest of their last hop), parsed
    # issuer keys (by certificate fingerprint) and chain policy decisions.
    delegation_prefix_cache: int = 4096
    delegation_key_cache: int = 1024
    delegation_policy_cache: int = 16384
    # Bytes of a user access token (JWT), and the selected claims recorded from it:
    # claims, values per claim and characters per value.
    max_user_token_bytes: int = 8 * 1024
    max_user_claims: int = 16
    max_user_claim_values: int = 64
    max_user_claim_chars: int = 256
    # Bytes the recorded user origin takes in hop 0 (issuer, subject and claims).
    max_user_origin_bytes: int = 2048


DEFAULT_LIMITS = Limits()
