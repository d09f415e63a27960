"""Every bound in one frozen config: walks, sizes and counts all have limits."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_LIMITS", "Limits"]


@dataclass(frozen=True, slots=True)
class Limits:
    # Bytes of one gRPC message, either direction.
    max_message_bytes: int = 4 * 1024 * 1024
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


DEFAULT_LIMITS = Limits()
