"""The registry's storage seam: a small Protocol, so other stores can be added.

The store keeps the durable state: resource documents, operator state, join tokens
(as hashes), and the endpoints last known live. An endpoint lives while its sidecar's
watch stream does; it is stored only so that a restarted registry can keep serving
routes for a grace period while the sidecars reconnect (ADR 0005).
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

    def put_endpoint(self, spiffe_id: str, instance_id: str, address: str) -> None: ...

    def delete_endpoint(self, spiffe_id: str, instance_id: str) -> None: ...

    def load_endpoints(self) -> list[tuple[str, str, str]]:
        """(spiffe_id, instance_id, address) of the endpoints last known live."""
        ...

    def close(self) -> None: ...


class MemoryStore:
    """In-memory Store for unit tests."""

    def __init__(self) -> None:
        self.state = StoredState()
        self.tokens: dict[str, tuple[str, int, int]] = {}
        self.endpoints: dict[tuple[str, str], str] = {}

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

    def put_endpoint(self, spiffe_id: str, instance_id: str, address: str) -> None:
        self.endpoints[(spiffe_id, instance_id)] = address

    def delete_endpoint(self, spiffe_id: str, instance_id: str) -> None:
        self.endpoints.pop((spiffe_id, instance_id), None)

    def load_endpoints(self) -> list[tuple[str, str, str]]:
        return [(s, i, a) for (s, i), a in self.endpoints.items()]

    def close(self) -> None:
        pass
