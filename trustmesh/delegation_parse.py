"""Reading the delegation chain's wire format (docs/delegation.md, section 2).

Invariants:
* Parsing is total: bytes either parse into values that satisfy every structural
  rule of the spec, or raise `ChainFormatError`. No protobuf, SPIFFE or other
  exception escapes, whatever the input.
* Nothing is re-encoded: a verifier checks signatures and digests over the carried
  `body` bytes, so two implementations never disagree about what was signed.
* A field this version does not know (a protobuf unknown field) in a signed hop body
  makes the hop malformed: a future field might narrow what the hop grants, and
  ignoring it would widen it.
* Every size is bounded (`Limits`) before the work that depends on it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from typing import NamedTuple

from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from trustmesh.decision import Reason
from trustmesh.delegation_format import (
    CHAIN_HEADER_BYTES,
    DIGEST_BYTES,
    MAX_NONCE_BYTES,
    MAX_SIGNATURE_BYTES,
    MAX_TIME_MS,
    MIN_NONCE_BYTES,
    TRACE_ID_BYTES,
    VERSION,
    AgentOrigin,
    ChainFormatError,
    HopFields,
    Origin,
    RawHop,
    UserOrigin,
    hop_frame_len,
)
from trustmesh.errors import InvalidSpiffeIdError
from trustmesh.limits import DEFAULT_LIMITS, Limits
from trustmesh.peer_verify import MAX_CERT_BYTES, MAX_CHAIN_LENGTH
from trustmesh.resources import is_grpc_method
from trustmesh.spiffe_id import SpiffeId
from trustmesh.v1 import delegation_pb2 as dpb

__all__ = [
    "CanonicalChain",
    "SplitChain",
    "check_scopes",
    "parse_hop",
    "parse_spiffe_id",
    "split_canonical",
    "split_chain",
]

# RFC 6749 scope-token: printable ASCII except space, '"' and '\'.
_SCOPE_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


def _unknown(msg: Message) -> bool:
    return len(UnknownFieldSet(msg)) > 0


class SplitChain:
    """A parsed `DelegationChain`: its hop count and, on demand, each `RawHop`.

    `region(j)` is the byte prefix of `data` that a canonical encoder (`encode_chain`)
    writes for hops 0..j. A verifier compares it with what it stored for a verified
    prefix: equal bytes parse to equal hops, whatever encoder produced `data`.
    """

    __slots__ = ("_hops", "_raw", "count", "data")

    def __init__(self, data: bytes, msg: dpb.DelegationChain) -> None:
        self.data = data
        self._hops = msg.hops
        self.count = len(msg.hops)
        self._raw: list[RawHop | None] = [None] * self.count

    def hop(self, i: int) -> RawHop:
        found = self._raw[i]
        if found is None:
            h = self._hops[i]
            signature = h.signature  # each read of a bytes field copies it: read once
            if len(signature) > MAX_SIGNATURE_BYTES:
                raise ChainFormatError(f"hop {i} signature is {len(signature)} bytes")
            found = self._raw[i] = RawHop(h.body, signature)
        return found

    def hops(self) -> tuple[RawHop, ...]:
        return tuple(self.hop(i) for i in range(self.count))

    def region(self, j: int) -> bytes:
        """The canonical byte prefix for hops 0..j, cut from `data`."""
        if j == self.count - 2:  # the usual case: all but the last hop
            last = self.hop(self.count - 1)
            cut = len(self.data) - hop_frame_len(len(last.body), len(last.signature))
        else:
            cut = len(CHAIN_HEADER_BYTES) + sum(
                hop_frame_len(len(self.hop(i).body), len(self.hop(i).signature))
                for i in range(j + 1)
            )
        return self.data[: max(cut, 0)]


def split_chain(data: bytes, limits: Limits = DEFAULT_LIMITS) -> SplitChain:
    """Parse the container of a chain. Checks the size and depth limits, the version
    and that there is at least one hop. Unknown fields of the container (outside
    the signed bodies) are ignored: they are covered by nothing and mean nothing."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ChainFormatError(f"a chain is bytes, got {type(data).__name__}")
    if len(data) > limits.max_delegation_bytes:
        raise ChainFormatError(
            f"chain is {len(data)} bytes, over the {limits.max_delegation_bytes}-byte limit",
            Reason.CHAIN_TOO_DEEP,
        )
    data = bytes(data)
    msg = dpb.DelegationChain()
    try:
        msg.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ChainFormatError(f"chain is not a serialized DelegationChain: {e}") from e
    if msg.version != VERSION:
        raise ChainFormatError(f"chain version {msg.version} is not supported (expected 1)")
    if not msg.hops:
        raise ChainFormatError("chain has no hops")
    if len(msg.hops) > limits.max_delegation_depth:
        raise ChainFormatError(
            f"chain has {len(msg.hops)} hops, over the limit of {limits.max_delegation_depth}",
            Reason.CHAIN_TOO_DEEP,
        )
    return SplitChain(data, msg)


class CanonicalChain(NamedTuple):
    """A canonically framed chain, cut without protobuf: `data[:cut]` frames hops
    0..depth-2 and `body`/`signature` are the last hop's (see `split_canonical`)."""

    depth: int
    cut: int
    body: bytes
    signature: bytes


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """A length varint at `pos` (at most 4 bytes: every length here is < 2**28)."""
    value = 0
    for shift in (0, 7, 14, 21):
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
    raise IndexError("varint too long")


def split_canonical(data: bytes, limits: Limits = DEFAULT_LIMITS) -> CanonicalChain | None:
    """The fast path's reading of a chain: the cut between every hop but the last and
    the last, and the last hop's body and signature. `None` unless the chain is
    framed canonically (`encode_chain`), within the size and depth limits; anything
    else, valid or not, is left to `split_chain`.

    The hops before the cut are framed but not read: the caller goes on only when
    `data[:cut]` equals the canonical encoding of hops it verified before. Then
    `split_chain(data)` reads those hops and this last one, because protobuf parses
    a concatenation as the merge of its parts (each frame appends one `SignedHop`),
    and the canonical last frame holds `body` then `signature`, each only when
    non-empty, with minimal varints (its length is checked against `hop_frame_len`).
    tests/unit/test_delegation_fastpath.py checks that agreement on hostile bytes."""
    size = len(data)
    if type(data) is not bytes or size > limits.max_delegation_bytes:
        return None
    if not data.startswith(CHAIN_HEADER_BYTES):
        return None
    pos, count, start, inner = len(CHAIN_HEADER_BYTES), 0, 0, 0
    try:
        while pos < size:
            if data[pos] != 0x12:  # field 2 (hops), length-delimited
                return None
            start = pos
            b = data[pos + 1]
            if b < 0x80:  # a hop under 128 bytes: never, but cheap to read
                length, inner = b, pos + 2
            elif data[pos + 2] < 0x80:  # the usual case: a hop under 16 KiB
                length, inner = (b & 0x7F) | data[pos + 2] << 7, pos + 3
            else:
                length, inner = _varint(data, pos + 1)
            pos = inner + length
            count += 1
        if pos != size or count == 0 or count > limits.max_delegation_depth:
            return None
        if data[inner] != 0x0A:  # field 1 (body)
            return None
        body_len, at = _varint(data, inner + 1)
        end = at + body_len
        if end > size:
            return None
        body, signature = data[at:end], b""
        if end < size:
            if data[end] != 0x12:  # field 2 (signature)
                return None
            sig_len, at = _varint(data, end + 1)
            if at + sig_len != size:
                return None
            signature = data[at:]
    except IndexError:
        return None
    if (
        not body
        or len(signature) > MAX_SIGNATURE_BYTES
        or hop_frame_len(len(body), len(signature)) != size - start
    ):
        return None
    return CanonicalChain(count, start, body, signature)


def check_scopes(scopes: Iterable[str], limits: Limits = DEFAULT_LIMITS) -> frozenset[str]:
    """The scopes as a set; raises `ValueError` for a malformed scope or too many."""
    return _scope_set(tuple(scopes), limits.max_delegation_scopes, limits.max_scope_chars)


# Scope lists and methods repeat from call to call; their checks are pure, so they
# are memoized (bounded). A failed check raises and is not remembered.
@functools.lru_cache(maxsize=4096)
def _scope_set(scopes: tuple[str, ...], max_scopes: int, max_chars: int) -> frozenset[str]:
    out = frozenset(scopes)
    if len(out) > max_scopes:
        raise ValueError(f"{len(out)} scopes, over the limit of {max_scopes}")
    for s in out:
        if not isinstance(s, str) or len(s) > max_chars or not _SCOPE_RE.fullmatch(s):
            raise ValueError(
                f"invalid scope {str(s)[:64]!r}: use 1 to {max_chars} printable "
                "ASCII characters other than space, '\"' and '\\'"
            )
    return out


_grpc_method = functools.lru_cache(maxsize=4096)(is_grpc_method)
# The default `parse_id`: SPIFFE IDs repeat too, and parsing one costs microseconds.
parse_spiffe_id = functools.lru_cache(maxsize=4096)(SpiffeId.parse)


def _origin(msg: dpb.Origin, issuer: SpiffeId, index: int) -> Origin:
    which = msg.WhichOneof("kind")
    if _unknown(msg):
        raise ChainFormatError(f"hop {index} origin has fields this version does not know")
    if which == "agent":
        if _unknown(msg.agent):
            raise ChainFormatError(f"hop {index} origin has fields this version does not know")
        return AgentOrigin(issuer)
    if which == "user":
        user = msg.user
        if _unknown(user) or any(_unknown(c) for c in user.claims):
            raise ChainFormatError(f"hop {index} origin has fields this version does not know")
        claims = tuple((c.name, tuple(c.values)) for c in user.claims)
        try:
            return UserOrigin(user.issuer, user.subject, claims)
        except ValueError as e:
            raise ChainFormatError(f"hop {index} user origin: {e}") from e
    raise ChainFormatError(f"hop {index} is the first hop but names no origin")


def parse_hop(
    body: bytes,
    index: int,
    *,
    signed: bool,
    parse_id: Callable[[str], SpiffeId] = parse_spiffe_id,
    limits: Limits = DEFAULT_LIMITS,
) -> HopFields:
    """Parse and structurally check hop `index`'s body. `parse_id` may memoize."""
    msg = dpb.Hop()
    try:
        msg.ParseFromString(body)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ChainFormatError(f"hop {index} body is not a serialized Hop: {e}") from e
    if _unknown(msg):
        raise ChainFormatError(f"hop {index} has fields this version does not know")
    # Each field is read once: every read of a protobuf field builds a new object.
    method, scope_list, prev = msg.method, tuple(msg.scopes), msg.prev_digest
    issued, expires, nonce, trace = msg.issued_at_ms, msg.expires_at_ms, msg.nonce, msg.trace_id
    try:
        issuer = parse_id(msg.issuer)
        audience = parse_id(msg.audience)
    except InvalidSpiffeIdError as e:
        raise ChainFormatError(f"hop {index}: {e.message}") from e
    if not issuer.path or not audience.path:
        raise ChainFormatError(f"hop {index} names a trust domain, not an agent, as a party")
    if not _grpc_method(method):
        raise ChainFormatError(f"hop {index} method {method[:128]!r} is not a gRPC path")
    try:
        scopes = check_scopes(scope_list, limits)
    except ValueError as e:
        raise ChainFormatError(f"hop {index}: {e}") from e
    if len(scope_list) != len(scopes):
        raise ChainFormatError(f"hop {index} lists a scope twice")
    if not 0 < issued <= MAX_TIME_MS or not 0 < expires <= MAX_TIME_MS:
        raise ChainFormatError(f"hop {index} issued_at or expires_at is missing or out of range")
    if not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
        raise ChainFormatError(f"hop {index} nonce is {len(nonce)} bytes (8 to 32 expected)")
    if len(trace) not in (0, TRACE_ID_BYTES):
        raise ChainFormatError(f"hop {index} trace_id is {len(trace)} bytes (0 or 16)")
    has_origin = msg.HasField("origin")
    if index == 0:
        if prev:
            raise ChainFormatError("hop 0 has a prev_digest")
        if not has_origin:
            raise ChainFormatError("hop 0 names no origin")
        origin: Origin | None = _origin(msg.origin, issuer, index)
    else:
        if len(prev) != DIGEST_BYTES:
            raise ChainFormatError(f"hop {index} prev_digest is {len(prev)} bytes")
        if has_origin:
            raise ChainFormatError(f"hop {index} names an origin; only hop 0 may")
        origin = None
    cert_chain, cert_ref = _cert(msg, index, signed)
    return HopFields(
        issuer, audience, method, scopes, issued, expires, nonce, trace, prev,
        cert_chain, cert_ref, origin,
    )  # fmt: skip


def _cert(msg: dpb.Hop, index: int, signed: bool) -> tuple[tuple[bytes, ...] | None, int | None]:
    which = msg.WhichOneof("issuer_cert")
    if not signed:
        if which is not None:
            raise ChainFormatError(f"hop {index} is unsigned but carries a certificate")
        return None, None
    if which == "cert_chain":
        if _unknown(msg.cert_chain):
            raise ChainFormatError(f"hop {index} cert_chain has fields this version does not know")
        ders = tuple(msg.cert_chain.der)
        if not 1 <= len(ders) <= MAX_CHAIN_LENGTH:
            raise ChainFormatError(f"hop {index} carries {len(ders)} certificates (1 to 8)")
        for d in ders:
            if not d or len(d) > MAX_CERT_BYTES:
                raise ChainFormatError(f"hop {index} carries an empty or oversized certificate")
        return ders, None
    if which == "cert_ref":
        if msg.cert_ref >= index:
            raise ChainFormatError(
                f"hop {index} refers to the certificate of hop {msg.cert_ref}, not an earlier hop"
            )
        return None, msg.cert_ref
    raise ChainFormatError(f"hop {index} is signed but carries no certificate")
