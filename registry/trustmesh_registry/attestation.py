"""Node/workload attestation for bootstrap, behind a small Protocol.

The first attestor is the join token. A Kubernetes service-account attestor can be
added later by implementing `Attestor`. An attestor answers one question: which
SPIFFE ID may this bootstrap request be issued? The CA then signs exactly that ID.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from typing import Protocol

from trustmesh.errors import BootstrapError, ConfigError
from trustmesh.spiffe_id import SpiffeId
from trustmesh_registry.store import Store

__all__ = ["Attestor", "JoinTokenAttestor", "hash_token"]

_TOKEN_PREFIX = "tmjt."  # noqa: S105 (a prefix, not a secret)
MAX_TOKEN_TTL_S = 30 * 24 * 3600
MAX_TOKEN_USES = 10_000


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Attestor(Protocol):
    def attest(self, evidence: str, *, now: datetime) -> SpiffeId:
        """The ID the evidence entitles the caller to; raises BootstrapError."""
        ...


class JoinTokenAttestor:
    def __init__(self, store: Store, *, is_reserved: ReservedCheck) -> None:
        self._store = store
        self._is_reserved = is_reserved

    def create(
        self, spiffe_id: SpiffeId, *, ttl_s: int, uses: int, now: datetime
    ) -> tuple[str, int]:
        if self._is_reserved(spiffe_id):
            raise ConfigError(f"join tokens are never issued for {spiffe_id}: it is reserved")
        if not 0 < ttl_s <= MAX_TOKEN_TTL_S:
            raise ConfigError(f"token TTL must be between 1 s and {MAX_TOKEN_TTL_S} s, got {ttl_s}")
        if not 0 < uses <= MAX_TOKEN_USES:
            raise ConfigError(f"token uses must be between 1 and {MAX_TOKEN_USES}, got {uses}")
        token = _TOKEN_PREFIX + secrets.token_urlsafe(32)
        expires_at = int(now.timestamp()) + ttl_s
        self._store.add_join_token(hash_token(token), str(spiffe_id), uses, expires_at)
        return token, expires_at

    def attest(self, evidence: str, *, now: datetime) -> SpiffeId:
        if not evidence.startswith(_TOKEN_PREFIX) or len(evidence) > 128:
            raise BootstrapError("join token is malformed")
        bound = self._store.consume_join_token(hash_token(evidence), int(now.timestamp()))
        if bound is None:
            raise BootstrapError("join token is unknown, expired or used up")
        spiffe_id = SpiffeId.parse(bound)
        if self._is_reserved(spiffe_id):  # defence in depth: never issue reserved IDs
            raise BootstrapError(f"{spiffe_id} is never issued against a join token")
        return spiffe_id


class ReservedCheck(Protocol):
    def __call__(self, spiffe_id: SpiffeId) -> bool: ...
