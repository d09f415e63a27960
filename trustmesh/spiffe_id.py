"""SPIFFE IDs as values that can't be built invalid.

Parsing is delegated to py-spiffe (the `spiffe` package) so that TrustMesh and
SPIRE agree on what a valid ID is; this wrapper adds what the mesh needs on top:
frozen, hashable values that never compare equal to a plain `str`, and errors
that quote the input.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from spiffe import SpiffeId as _PySpiffeId
from spiffe.errors import PySpiffeError

from trustmesh.errors import InvalidSpiffeIdError

__all__ = ["SpiffeId", "TrustDomain"]

_MAX_LEN = 2048  # SPIFFE spec: URIs SHOULD NOT exceed 2048 bytes


def _detail(message: str) -> str:
    """py-spiffe says "Invalid SPIFFE ID 'x': why"; keep the why, we quote the input."""
    for sep in ("': ", ": "):
        if sep in message:
            return message.split(sep, 1)[1]
    return message


@dataclass(frozen=True, slots=True)
class TrustDomain:
    name: str

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        return SpiffeId.parse(f"spiffe://{text}").trust_domain

    def id(self) -> SpiffeId:
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """`spiffe://trust-domain/path`. Build it with `SpiffeId.parse()`."""

    trust_domain: TrustDomain
    path: str
    # The `spiffe://...` form, built once and interned: the snapshot's indexes and the
    # decision caches key on it, so a lookup is a C-level string probe that usually
    # matches by identity instead of a call to `__eq__`.
    text: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        text = sys.intern(f"spiffe://{self.trust_domain.name}{self.path}")
        object.__setattr__(self, "text", text)

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        if not isinstance(text, str):
            raise InvalidSpiffeIdError(f"Invalid SPIFFE ID {text!r}: not a string")
        if len(text) > _MAX_LEN:
            raise InvalidSpiffeIdError(
                f"Invalid SPIFFE ID {text[:64]!r}...: longer than {_MAX_LEN} characters"
            )
        try:
            parsed = _PySpiffeId(text)
        except PySpiffeError as e:
            detail = _detail(str(e))
            raise InvalidSpiffeIdError(f"Invalid SPIFFE ID {text!r}: {detail}") from e
        return cls(TrustDomain(parsed.trust_domain.name), parsed.path)

    def child(self, *segments: str) -> SpiffeId:
        return SpiffeId.parse(str(self) + "".join("/" + s for s in segments))

    def is_under(self, prefix_path: str) -> bool:
        """True when the path equals `prefix_path` or lies below it."""
        p = prefix_path.rstrip("/")
        return self.path == p or self.path.startswith(p + "/")

    def __str__(self) -> str:
        return self.text

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if isinstance(other, SpiffeId):
            return self.text == other.text  # equal texts <=> equal trust domain and path
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.text)

    def __reduce__(self) -> tuple[type[SpiffeId], tuple[TrustDomain, str]]:
        # String hashes differ between processes: a copy hashes itself afresh.
        return (SpiffeId, (self.trust_domain, self.path))
