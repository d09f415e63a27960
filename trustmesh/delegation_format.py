"""The delegation chain's wire format: its values, limits, signing input, digest and
canonical encoding (docs/delegation.md, sections 2 to 4). Reading it back is
`trustmesh.delegation_parse`.

The chain is a `trustmesh.v1.DelegationChain` carried in the binary metadata key
`trustmesh-delegation-bin`. A hop's signature and digest cover its `body` bytes as
carried; `encode_hop` writes scopes sorted and `encode_chain` writes the canonical
container, so equal inputs give equal bytes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from trustmesh.decision import Decision, Reason
from trustmesh.errors import PeerError
from trustmesh.spiffe_id import SpiffeId
from trustmesh.v1 import delegation_pb2 as dpb

__all__ = [
    "CHAIN_HEADER_BYTES",
    "DIGEST_PREFIX",
    "METADATA_KEY",
    "SIGNING_PREFIX",
    "VERSION",
    "AgentOrigin",
    "ChainError",
    "ChainFormatError",
    "HopFields",
    "Origin",
    "RawHop",
    "UserOrigin",
    "encode_chain",
    "encode_hop",
    "encoded_user_origin_size",
    "hop_digest",
    "hop_frame_len",
    "signing_input",
    "to_ms",
]

METADATA_KEY = "trustmesh-delegation-bin"
VERSION = 1
SIGNING_PREFIX = b"trustmesh delegation hop v1\x00"
DIGEST_PREFIX = b"trustmesh delegation digest v1\x00"

DIGEST_BYTES = 32
MIN_NONCE_BYTES = 8
MAX_NONCE_BYTES = 32
TRACE_ID_BYTES = 16
# A DER ECDSA signature over P-521 is at most 139 bytes; anything longer is not one.
MAX_SIGNATURE_BYTES = 160
# 9999-12-31T23:59:59.999Z: later times don't fit a datetime.
MAX_TIME_MS = 253402300799999
MAX_ISSUER_CHARS = 2048
MAX_SUBJECT_CHARS = 1024

_CLAIM_NAME_RE = re.compile(r"[\x21-\x7e]+")


class ChainFormatError(ValueError):
    """The bytes are not a well-formed chain: `reason` is `chain_malformed`, or
    `chain_too_deep` for a chain over the size or depth limit."""

    def __init__(self, message: str, reason: Reason = Reason.CHAIN_MALFORMED):
        super().__init__(message)
        self.reason = reason


class ChainError(PeerError):
    """`extend_chain` refused the incoming chain; `decision` says why."""

    def __init__(self, reason: Reason, message: str):
        self.decision = Decision.deny(reason, message)
        super().__init__(message, reason=reason.value, code=self.decision.code)


def _printable(value: str, what: str, limit: int) -> None:
    if not value:
        raise ValueError(f"{what} must not be empty")
    if len(value) > limit:
        raise ValueError(f"{what} {value[:64]!r}... is longer than {limit} characters")
    if not value.isprintable():
        raise ValueError(f"{what} {value[:64]!r} contains control characters")


@dataclass(frozen=True, slots=True)
class AgentOrigin:
    """The chain's first issuer acted on its own behalf."""

    spiffe_id: SpiffeId


@dataclass(frozen=True, slots=True)
class UserOrigin:
    """A user, as the first sidecar verified from an access token.

    `claims` holds the selected claims sorted by name, each as a tuple of strings (a
    string claim has one value). Raises `ValueError` for a value that can't be carried.
    """

    issuer: str
    subject: str
    claims: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        _printable(self.issuer, "user origin issuer", MAX_ISSUER_CHARS)
        _printable(self.subject, "user origin subject", MAX_SUBJECT_CHARS)
        names = [name for name, _ in self.claims]
        if names != sorted(set(names)):
            raise ValueError("user origin claims must be sorted by name, each name once")
        for name, values in self.claims:
            if not _CLAIM_NAME_RE.fullmatch(name):
                raise ValueError(f"claim name {name[:64]!r} is not printable ASCII")
            if not isinstance(values, tuple):
                raise ValueError(f"claim {name!r} values must be a tuple")
            for v in values:
                if not isinstance(v, str) or not v.isprintable():
                    raise ValueError(f"claim {name!r} has a value that is not printable text")

    def claim(self, name: str) -> tuple[str, ...]:
        for n, values in self.claims:
            if n == name:
                return values
        return ()


Origin = AgentOrigin | UserOrigin


class RawHop:
    """One `SignedHop` as carried. Its digest is computed when first asked for: a
    verifier with the prefix cached needs only the last hop's."""

    __slots__ = ("_digest", "body", "signature")

    def __init__(self, body: bytes, signature: bytes) -> None:
        self.body = body
        self.signature = signature
        self._digest: bytes | None = None

    @property
    def digest(self) -> bytes:
        if self._digest is None:
            self._digest = hop_digest(self.body, self.signature)
        return self._digest


class HopFields(NamedTuple):
    """A parsed `Hop` body that passed every structural check. (A NamedTuple: it is
    built on every verification, and a frozen dataclass costs several times more.)"""

    issuer: SpiffeId
    audience: SpiffeId
    method: str
    scopes: frozenset[str]
    issued_at_ms: int
    expires_at_ms: int
    nonce: bytes
    trace_id: bytes
    prev_digest: bytes
    cert_chain: tuple[bytes, ...] | None
    cert_ref: int | None
    # Set in hop 0 only; an AgentOrigin names hop 0's issuer.
    origin: Origin | None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def to_ms(t: datetime) -> int:
    """Unix milliseconds of an aware datetime, rounded down (the unit of hop times).
    Exact integer arithmetic: no float rounding can move a time across a boundary."""
    if t.utcoffset() is None:
        raise ValueError("now must be a datetime with a timezone")
    return (t - _EPOCH) // _MS


def signing_input(body: bytes) -> bytes:
    """What a hop's signature covers: a domain-separated prefix, then the body bytes."""
    return SIGNING_PREFIX + body


def hop_digest(body: bytes, signature: bytes) -> bytes:
    """SHA-256 over the prefix, the body's length (4 bytes, big-endian), the body and
    the signature. The length makes the split between body and signature unambiguous."""
    h = hashlib.sha256(DIGEST_PREFIX)
    h.update(len(body).to_bytes(4, "big"))
    h.update(body)
    h.update(signature)
    return h.digest()


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _framed_len(payload: int) -> int:
    """Bytes of a length-delimited field (one-byte tag) with a payload of this size."""
    return 1 + _varint_len(payload) + payload


def hop_frame_len(body_len: int, sig_len: int) -> int:
    """Bytes a canonical encoder writes for one `hops` entry of a `DelegationChain`."""
    inner = (_framed_len(body_len) if body_len else 0) + (_framed_len(sig_len) if sig_len else 0)
    return _framed_len(inner)


# A canonical `DelegationChain` starts with `version = 1` (field 1, varint).
CHAIN_HEADER_BYTES = b"\x08\x01"


def encode_hop(
    *,
    issuer: SpiffeId,
    audience: SpiffeId,
    method: str,
    scopes: Iterable[str],
    issued_at_ms: int,
    expires_at_ms: int,
    nonce: bytes,
    trace_id: bytes,
    prev_digest: bytes,
    cert_chain: Sequence[bytes] | None = None,
    cert_ref: int | None = None,
    origin: Origin | None = None,
) -> bytes:
    """A `Hop` body. Scopes are written sorted, so equal hops encode equally."""
    msg = dpb.Hop(
        issuer=str(issuer),
        audience=str(audience),
        method=method,
        scopes=sorted(set(scopes)),
        issued_at_ms=issued_at_ms,
        expires_at_ms=expires_at_ms,
        nonce=nonce,
        trace_id=trace_id,
        prev_digest=prev_digest,
    )
    if cert_chain is not None:
        msg.cert_chain.der.extend(cert_chain)
    elif cert_ref is not None:
        msg.cert_ref = cert_ref
    if isinstance(origin, AgentOrigin):
        msg.origin.agent.SetInParent()
    elif isinstance(origin, UserOrigin):
        msg.origin.user.issuer = origin.issuer
        msg.origin.user.subject = origin.subject
        for name, values in origin.claims:
            msg.origin.user.claims.add(name=name, values=values)
    return msg.SerializeToString()


def encode_chain(hops: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A `DelegationChain` of (body, signature) pairs, origin first, in the canonical
    encoding (`CHAIN_HEADER_BYTES`, then each hop as `hop_frame_len` says)."""
    msg = dpb.DelegationChain(version=VERSION)
    for body, signature in hops:
        msg.hops.add(body=body, signature=signature)
    return msg.SerializeToString()


def encoded_user_origin_size(origin: UserOrigin) -> int:
    """Bytes the origin takes in hop 0: to bound it before signing."""
    msg = dpb.UserOrigin(issuer=origin.issuer, subject=origin.subject)
    for name, values in origin.claims:
        msg.claims.add(name=name, values=values)
    return msg.ByteSize()
