"""The registry's storage seam: a small Protocol, so other stores can be added.

The store keeps the durable state only: resource documents, operator state and join
tokens (as hashes). Live endpoints are not stored: they exist while a sidecar's watch
stream does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["OperatorState", "ResourceKey", "Store", "StoredState"]

ResourceKey = tuple[str, str]  # (kind, name)


@dataclass(frozen=True)
class OperatorState:
    disabled: bool
    reason: str = ""


@dataclass
class StoredState:
    documents: dict[ResourceKey, dict[str, Any]] = field(default_factory=dict)
    operator: dict[str, OperatorState] = field(default_factory=dict)  # by agent name


class Store(Protocol):
    def load(self) -> StoredState: ...

    def write_resources(
        self, puts: Sequence[tuple[ResourceKey, dict[str, Any]]], deletes: Sequence[ResourceKey]
    ) -> None:
        """Apply every put and delete in one transaction, or none of them."""
        ...

    def set_operator_state(self, agent: str, state: OperatorState) -> None: ...

    def add_join_token(
        self, token_hash: str, spiffe_id: str, uses: int, expires_at: int
    ) -> None: ...

    def consume_join_token(self, token_hash: str, now: int) -> str | None:
        """Use the token once, atomically; the bound SPIFFE ID, or None if unusable."""
        ...

    def close(self) -> None: ...


class MemoryStore:
    """In-memory Store for unit tests."""

    def __init__(self) -> None:
        self.state = StoredState()
        self.tokens: dict[str, tuple[str, int, int]] = {}

    def load(self) -> StoredState:
        return StoredState(dict(self.state.documents), dict(self.state.operator))

    def write_resources(
        self, puts: Sequence[tuple[ResourceKey, dict[str, Any]]], deletes: Sequence[ResourceKey]
    ) -> None:
        for key, doc in puts:
            self.state.documents[key] = doc
        for key in deletes:
            self.state.documents.pop(key, None)

    def set_operator_state(self, agent: str, state: OperatorState) -> None:
        self.state.operator[agent] = state

    def add_join_token(self, token_hash: str, spiffe_id: str, uses: int, expires_at: int) -> None:
        self.tokens[token_hash] = (spiffe_id, uses, expires_at)

    def consume_join_token(self, token_hash: str, now: int) -> str | None:
        entry = self.tokens.get(token_hash)
        if entry is None or entry[1] <= 0 or entry[2] <= now:
            return None
        self.tokens[token_hash] = (entry[0], entry[1] - 1, entry[2])
        return entry[0]

    def close(self) -> None:
        pass
