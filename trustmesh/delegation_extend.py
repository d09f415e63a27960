"""Append a hop to a delegation chain at the calling sidecar (`extend_chain`), and
decide whether it must be signed (`needs_signed_hop`). Pure: the key, the clock and
the nonce are all passed in; nothing here reads the clock or draws random bytes.

Signatures are deterministic ECDSA (RFC 6979): no dependence on a random source at
signing time, and the same inputs give the same chain (test vectors stay stable).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustmesh.decision import Reason
from trustmesh.delegation_format import (
    MAX_NONCE_BYTES,
    MIN_NONCE_BYTES,
    TRACE_ID_BYTES,
    AgentOrigin,
    ChainError,
    ChainFormatError,
    HopFields,
    Origin,
    RawHop,
    UserOrigin,
    encode_chain,
    encode_hop,
    encoded_user_origin_size,
    signing_input,
    to_ms,
)
from trustmesh.delegation_parse import check_scopes, parse_hop, split_chain
from trustmesh.limits import DEFAULT_LIMITS, Limits
from trustmesh.resources import is_grpc_method
from trustmesh.snapshot import Snapshot
from trustmesh.spiffe_id import SpiffeId
from trustmesh.x509svid import X509Svid, ecdsa_hash

__all__ = ["extend_chain", "needs_signed_hop"]


@functools.lru_cache(maxsize=64)
def _der(chain: tuple[x509.Certificate, ...]) -> tuple[bytes, ...]:
    """A certificate chain as DER, memoized: a sidecar signs with the same SVID until it
    rotates. Keyed by the certificates, so no private key is kept alive here."""
    return tuple(c.public_bytes(serialization.Encoding.DER) for c in chain)


def needs_signed_hop(snapshot: Snapshot, callee: SpiffeId) -> bool:
    """Whether the hop addressed to `callee` must be signed: only when some
    DelegationPolicy could accept a chain that `callee` forwards (docs/delegation.md,
    "When to sign"). An unknown callee gets a signed hop (the safe side)."""
    view = snapshot.agent_by_id(callee)
    return view is None or snapshot.can_delegate_onward(view)


def extend_chain(
    chain: bytes | None,
    *,
    svid: X509Svid,
    audience: SpiffeId,
    method: str,
    now: datetime,
    nonce: bytes,
    scopes: Iterable[str] | None = None,
    trace_id: bytes = b"",
    ttl: timedelta | None = None,
    origin_user: UserOrigin | None = None,
    sign: bool = True,
    limits: Limits = DEFAULT_LIMITS,
) -> bytes:
    """Append a hop from `svid`'s agent to `audience` for a call to `method`.

    `chain` is what the sidecar earlier handed its app, as the app sent it back;
    None starts a chain whose origin is `origin_user` or else this agent. `scopes`
    None keeps the previous hop's scopes (none for a new chain). The hop expires
    after `ttl` (default `limits.delegation_ttl_s`), but never after the chain it
    extends. `sign=False` writes an unsigned hop, which only the next receiver can
    accept (see `needs_signed_hop`).

    Raises `ChainError` when the incoming chain can't be extended (malformed, not
    addressed to this agent, unsigned last hop, expired, too deep, or `scopes`
    wider than the previous hop's), and `ValueError` for bad arguments.
    """
    now_ms = to_ms(now)
    life = timedelta(seconds=limits.delegation_ttl_s) if ttl is None else ttl
    if not timedelta(0) < life <= timedelta(seconds=limits.max_delegation_ttl_s):
        raise ValueError(f"ttl must be positive and at most {limits.max_delegation_ttl_s:g} s")
    if not is_grpc_method(method):
        raise ValueError(f"{method[:256]!r} is not a gRPC method path")
    if not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES or len(trace_id) not in (
        0,
        TRACE_ID_BYTES,
    ):
        raise ValueError("nonce must be 8 to 32 bytes and trace_id 0 or 16 bytes")
    expires_ms = now_ms + life // timedelta(milliseconds=1)
    issuer = svid.spiffe_id
    own_chain = _der(svid.cert_chain)
    previous: list[tuple[bytes, bytes]] = []
    cert_ref: int | None = None
    if chain is None:
        origin: Origin | None = origin_user or AgentOrigin(issuer)
        if origin_user is not None and (
            encoded_user_origin_size(origin_user) > limits.max_user_origin_bytes
        ):
            raise ValueError("the user origin is over the max_user_origin_bytes limit")
        granted = check_scopes(scopes or (), limits)
        prev_digest = b""
    else:
        if origin_user is not None:
            raise ValueError("origin_user starts a chain; an existing chain keeps its origin")
        origin = None
        raw, hops = _incoming(chain, issuer, now_ms, limits)
        last = hops[-1]
        granted = last.scopes if scopes is None else check_scopes(scopes, limits)
        if not granted <= last.scopes:
            raise ChainError(
                Reason.CHAIN_SCOPE_ESCALATION,
                "the new hop would grant scopes the incoming chain does not: "
                + ", ".join(sorted(granted - last.scopes)),
            )
        expires_ms = min(expires_ms, *(h.expires_at_ms for h in hops))
        prev_digest = raw[-1].digest
        previous = [(r.body, r.signature) for r in raw]
        if sign:
            cert_ref = next((j for j, h in enumerate(hops) if h.cert_chain == own_chain), None)
    body = encode_hop(
        issuer=issuer,
        audience=audience,
        method=method,
        scopes=granted,
        issued_at_ms=now_ms,
        expires_at_ms=expires_ms,
        nonce=nonce,
        trace_id=trace_id,
        prev_digest=prev_digest,
        cert_chain=own_chain if sign and cert_ref is None else None,
        cert_ref=cert_ref,
        origin=origin,
    )
    signature = b""
    if sign:
        key = svid.private_key
        signature = key.sign(
            signing_input(body), ec.ECDSA(ecdsa_hash(key), deterministic_signing=True)
        )
    out = encode_chain([*previous, (body, signature)])
    if len(out) > limits.max_delegation_bytes:
        raise ChainError(
            Reason.CHAIN_TOO_DEEP,
            f"the extended chain would be {len(out)} bytes, over the "
            f"{limits.max_delegation_bytes}-byte limit",
        )
    return out


def _incoming(
    chain: bytes, issuer: SpiffeId, now_ms: int, limits: Limits
) -> tuple[tuple[RawHop, ...], list[HopFields]]:
    """The incoming chain's hops, once it is clear this agent may extend it."""
    try:
        raw = split_chain(chain, limits).hops()
        hops = [
            parse_hop(r.body, i, signed=bool(r.signature), limits=limits) for i, r in enumerate(raw)
        ]
    except ChainFormatError as e:
        raise ChainError(e.reason, f"cannot extend the incoming chain: {e}") from e
    if len(raw) + 1 > limits.max_delegation_depth:
        raise ChainError(
            Reason.CHAIN_TOO_DEEP,
            f"the chain already has {len(raw)} hops; the limit is {limits.max_delegation_depth}",
        )
    last = hops[-1]
    if last.audience != issuer:
        raise ChainError(
            Reason.CHAIN_WRONG_AUDIENCE,
            f"the incoming chain is addressed to '{last.audience}', not to '{issuer}': a "
            "sidecar extends only chains addressed to its own agent",
        )
    if not raw[-1].signature:
        raise ChainError(
            Reason.CHAIN_BAD_SIGNATURE,
            f"the incoming chain's last hop (by '{last.issuer}') is unsigned: its issuer "
            "did not expect this agent to forward it",
        )
    if now_ms >= min(h.expires_at_ms for h in hops):
        raise ChainError(Reason.CHAIN_EXPIRED, "the incoming chain has expired")
    return raw, hops
