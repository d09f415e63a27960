"""Verify a delegation chain at the callee's sidecar: a pure function with a reason.

`verify_chain` takes the chain bytes, the mTLS peer, this agent, the method, the
`Snapshot`, a `PeerVerifier` (the trust bundles), a `ChainCache` and `now`, and returns
a `ChainDecision`. It never raises on hostile bytes: they are denied.

Order of the checks (first failure wins; docs/delegation.md explains each):
  1. `chain_too_deep` (size or depth over the mesh limit), `chain_malformed`;
  2. `chain_issuer_not_peer` (last issuer != mTLS peer), `chain_wrong_audience` (last
     audience != this agent, or last method != the call's method);
  3. for each hop in order: `chain_broken_link` (digest, or audience -> issuer),
     `chain_expired` (lifetime over the cap), `chain_scope_escalation`;
  4. `chain_bad_signature` for each hop in order (an unsigned hop that is not last,
     the certificate at the hop's issued_at, the signature);
  5. `chain_expired` (a hop not valid at `now`);
  6. `chain_agent_inactive` (an agent unregistered, disabled or expired at `now`);
  7. for a delegated chain (depth >= 2 or a user origin), the DelegationPolicies:
     `chain_origin_not_allowed`, `chain_path_not_allowed`, `chain_too_deep`,
     `chain_scope_escalation`.
Everything after step 4 judges authenticated content only. Steps 1, 3 and 4 are
cached per verified prefix (`trustmesh.delegation_cache`); 2, 5, 6 and 7 run on
every call, so a cache hit never outlives an expiry, a disable or a policy change.
The usual call, a stored prefix plus one new hop, takes `_verify_fast`: the same
checks on the new hop only, O(1) whatever the depth.
"""

from __future__ import annotations

from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature

from trustmesh.decision import Decision, Reason
from trustmesh.delegation_cache import ChainCache, Verdict, VerifiedHop
from trustmesh.delegation_format import (
    AgentOrigin,
    ChainFormatError,
    HopFields,
    signing_input,
    to_ms,
)
from trustmesh.delegation_parse import (
    SplitChain,
    parse_hop,
    split_canonical,
    split_chain,
)
from trustmesh.delegation_policy import chain_policy_decision
from trustmesh.delegation_result import ChainDecision, VerifiedChain
from trustmesh.errors import MeshError
from trustmesh.limits import DEFAULT_LIMITS, Limits
from trustmesh.peer_verify import PeerVerifier
from trustmesh.resources import AgentView
from trustmesh.snapshot import Snapshot
from trustmesh.spiffe_id import SpiffeId

__all__ = ["DIRECT_CALL", "ChainDecision", "VerifiedChain", "verify_chain"]

_NEVER = 2**62


class _Deny(Exception):
    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


# The answer for a call without a chain (immutable, so one for every such call).
DIRECT_CALL = ChainDecision(
    Decision.allow("", "no delegation chain: a direct call, AccessPolicy alone decides")
)


def verify_chain(
    data: bytes | None,
    *,
    peer: SpiffeId,
    local: SpiffeId,
    method: str,
    snapshot: Snapshot,
    verifier: PeerVerifier,
    cache: ChainCache,
    now: datetime,
    limits: Limits = DEFAULT_LIMITS,
) -> ChainDecision:
    """Decide whether the chain `data` (the `trustmesh-delegation-bin` value) may
    accompany a call from `peer` (verified over mTLS) to `local` on `method`.

    No chain (`None`) is a direct call: allowed here, AccessPolicy alone decides.
    Garbage never raises: it is denied with `chain_malformed`.
    """
    if data is None:
        return DIRECT_CALL
    now_ms = to_ms(now)
    if not snapshot.ready:
        return ChainDecision(Decision.deny(Reason.NO_SNAPSHOT, "no registry snapshot yet"))
    try:
        cache.sync_bundles(verifier.bundles.version)
        found = _verify_fast(data, peer, local, method, snapshot, verifier, cache, now_ms, limits)
        if found is not None:
            return found
        return _verify(data, peer, local, method, snapshot, verifier, cache, now_ms, limits)
    except _Deny as d:
        return ChainDecision(Decision.deny(d.reason, d.message))
    except (ValueError, MeshError, LookupError, TypeError, ArithmeticError, OSError) as e:
        # Every expected failure is a _Deny; this is the backstop that keeps hostile
        # bytes from ever raising past the verifier.
        return ChainDecision(
            Decision.deny(Reason.CHAIN_MALFORMED, f"chain could not be read ({type(e).__name__})")
        )


def _split(data: bytes, limits: Limits) -> SplitChain:
    try:
        return split_chain(data, limits)
    except ChainFormatError as e:
        raise _Deny(e.reason, str(e)) from e


def _parse(split: SplitChain, i: int, limits: Limits) -> HopFields:
    try:
        raw = split.hop(i)
        return parse_hop(raw.body, i, signed=bool(raw.signature), limits=limits)
    except ChainFormatError as e:
        raise _Deny(Reason.CHAIN_MALFORMED, str(e)) from e


def _cached_prefix(split: SplitChain, cache: ChainCache, below: int) -> tuple[VerifiedHop, ...]:
    """The longest stored verified prefix of hops 0..j for j < `below`."""
    for j in range(below - 1, -1, -1):
        found = cache.prefix(split.region(j))
        if found is not None:
            return found.hops
    return ()


def _verify_fast(
    data: bytes,
    peer: SpiffeId,
    local: SpiffeId,
    method: str,
    snapshot: Snapshot,
    verifier: PeerVerifier,
    cache: ChainCache,
    now_ms: int,
    limits: Limits,
) -> ChainDecision | None:
    """The usual case, a stored verified prefix plus one new hop, in O(1): the same
    checks in the same order as `_verify`, on the new hop against the prefix's
    precomputed summary (`VerifiedPrefix`). `None` means "ask `_verify`": on anything
    unusual (a non-canonical encoding, no stored prefix) and on any failure before
    the signature, so that every denial is worded in one place."""
    fast = split_canonical(data, limits)
    if fast is None or fast.depth < 2:
        return None
    state = cache.prefix(data[: fast.cut])
    if state is None:
        return None
    signature = fast.signature
    try:  # 1.
        last = parse_hop(fast.body, fast.depth - 1, signed=bool(signature), limits=limits)
    except ChainFormatError:
        return None
    prev = state.fields[-1]
    if (
        last.issuer != peer  # 2.
        or last.audience != local
        or last.method != method
        or last.prev_digest != state.digest  # 3.
        or last.issuer != prev.audience
        or not 0 < last.expires_at_ms - last.issued_at_ms <= limits.max_delegation_ttl_s * 1000
        or not last.scopes <= prev.scopes
    ):
        return None
    if signature:  # 4.: raises on a bad one
        ref = last.cert_ref
        chain_der = last.cert_chain if ref is None else state.fields[ref].cert_chain
        _check_signed(fast.depth - 1, last, fast.body, signature, chain_der, verifier, cache)
    earliest = min(state.earliest_expiry_ms, last.expires_at_ms)
    latest = max(state.latest_issued_ms, last.issued_at_ms)
    if latest > now_ms + limits.delegation_clock_skew_s * 1000 or now_ms >= earliest:  # 5.
        return None
    hops = [*state.fields, last]
    return _decide(hops, state.digest, data, bool(signature), local, snapshot, cache, now_ms,
                   (*state.issuers, last.issuer), earliest)  # fmt: skip


def _verify(
    data: bytes,
    peer: SpiffeId,
    local: SpiffeId,
    method: str,
    snapshot: Snapshot,
    verifier: PeerVerifier,
    cache: ChainCache,
    now_ms: int,
    limits: Limits,
) -> ChainDecision:
    version = verifier.bundles.version  # what the signatures below are checked against
    split = _split(data, limits)
    n = split.count
    last = _parse(split, n - 1, limits)  # 1. structure, the last hop first
    prefix = _cached_prefix(split, cache, n - 1)
    k = len(prefix)
    hops = [h.fields for h in prefix]
    hops += [_parse(split, i, limits) for i in range(k, n - 1)]
    hops.append(last)
    _check_binding(last, peer, local, method)  # 2.
    prev_digest = prefix[-1].digest if prefix else b""
    for i in range(k, n):  # 3. links, lifetimes, scopes
        _check_link(hops[i], i, hops[i - 1] if i else None, prev_digest, limits)
        if i < n - 1:
            prev_digest = split.hop(i).digest
    verified = list(prefix)
    for i in range(k, n):  # 4. signatures
        _check_signature(split, hops, i, verifier, cache)
        if i < n - 1:
            raw = split.hop(i)
            verified.append(VerifiedHop(hops[i], raw.body, raw.signature, raw.digest))
    if k < n - 1:
        cache.remember(verified, k, version)
    _check_validity(hops, now_ms, limits)  # 5.
    anchor: object = verified[-1].digest if n > 1 else last.origin
    last_signed = bool(split.hop(n - 1).signature)
    return _decide(hops, anchor, split.data, last_signed, local, snapshot, cache, now_ms)


def _check_binding(last: HopFields, peer: SpiffeId, local: SpiffeId, method: str) -> None:
    if last.issuer != peer:
        raise _Deny(
            Reason.CHAIN_ISSUER_NOT_PEER,
            f"the last hop was issued by '{last.issuer}', but the call comes from '{peer}'",
        )
    if last.audience != local:
        raise _Deny(
            Reason.CHAIN_WRONG_AUDIENCE,
            f"the last hop is addressed to '{last.audience}', not to this agent '{local}'",
        )
    if last.method != method:
        raise _Deny(
            Reason.CHAIN_WRONG_AUDIENCE,
            f"the last hop authorizes {last.method}, not this call's {method[:256]}",
        )


def _check_link(
    h: HopFields, i: int, prev: HopFields | None, prev_digest: bytes, limits: Limits
) -> None:
    if prev is not None:
        if h.prev_digest != prev_digest:
            raise _Deny(
                Reason.CHAIN_BROKEN_LINK,
                f"hop {i} does not link to hop {i - 1}: its prev_digest names another hop",
            )
        if h.issuer != prev.audience:
            raise _Deny(
                Reason.CHAIN_BROKEN_LINK,
                f"hop {i} is issued by '{h.issuer}', but hop {i - 1} is addressed to "
                f"'{prev.audience}'",
            )
    lifetime = h.expires_at_ms - h.issued_at_ms
    cap_ms = int(limits.max_delegation_ttl_s * 1000)
    if not 0 < lifetime <= cap_ms:
        raise _Deny(
            Reason.CHAIN_EXPIRED,
            f"hop {i} claims a lifetime of {lifetime / 1000:g} s; the limit is "
            f"{limits.max_delegation_ttl_s:g} s",
        )
    if prev is not None and not h.scopes <= prev.scopes:
        extra = ", ".join(sorted(h.scopes - prev.scopes))
        raise _Deny(
            Reason.CHAIN_SCOPE_ESCALATION,
            f"hop {i} by '{h.issuer}' grants scopes its caller did not have: {extra}",
        )


def _check_signature(
    split: SplitChain,
    hops: list[HopFields],
    i: int,
    verifier: PeerVerifier,
    cache: ChainCache,
) -> None:
    """Hop i's signature verified, or it is an unsigned last hop (which the mTLS
    connection to its issuer authenticates instead)."""
    h = hops[i]
    raw = split.hop(i)
    if not raw.signature:
        if i != split.count - 1:
            raise _Deny(
                Reason.CHAIN_BAD_SIGNATURE,
                f"hop {i} by '{h.issuer}' is unsigned, so it can only be the last hop",
            )
        return
    chain_der = h.cert_chain if h.cert_ref is None else hops[h.cert_ref].cert_chain
    _check_signed(i, h, raw.body, raw.signature, chain_der, verifier, cache)


def _check_signed(
    i: int,
    h: HopFields,
    body: bytes,
    signature: bytes,
    chain_der: tuple[bytes, ...] | None,
    verifier: PeerVerifier,
    cache: ChainCache,
) -> None:
    """The signature of hop i under the certificate chain it carries or refers to."""
    if chain_der is None:
        raise _Deny(
            Reason.CHAIN_MALFORMED,
            f"hop {i} refers to hop {h.cert_ref}, which carries no certificate chain",
        )
    try:
        proven = cache.issuer_key(chain_der, h.issued_at_ms, verifier)
    except (ValueError, MeshError) as e:
        detail = e.message if isinstance(e, MeshError) else str(e)
        raise _Deny(
            Reason.CHAIN_BAD_SIGNATURE,
            f"hop {i}: the certificate of '{h.issuer}' did not verify at the hop's "
            f"issued_at ({_when(h.issued_at_ms)}): {detail}",
        ) from e
    if proven.spiffe_id != h.issuer:
        raise _Deny(
            Reason.CHAIN_BAD_SIGNATURE,
            f"hop {i} is issued by '{h.issuer}', but signed with the certificate of "
            f"'{proven.spiffe_id}'",
        )
    try:
        proven.key.verify(signature, signing_input(body), proven.algorithm)
    except InvalidSignature as e:
        raise _Deny(
            Reason.CHAIN_BAD_SIGNATURE,
            f"hop {i}: the signature does not verify under the key of '{h.issuer}'",
        ) from e


def _check_validity(hops: list[HopFields], now_ms: int, limits: Limits) -> None:
    """Step 5: every hop valid at `now` (issued_at with the allowed clock skew)."""
    skew_ms = int(limits.delegation_clock_skew_s * 1000)
    for i, h in enumerate(hops):
        if h.issued_at_ms > now_ms + skew_ms:
            raise _Deny(
                Reason.CHAIN_EXPIRED, f"hop {i} is issued in the future ({_when(h.issued_at_ms)})"
            )
        if now_ms >= h.expires_at_ms:
            raise _Deny(
                Reason.CHAIN_EXPIRED,
                f"hop {i} by '{h.issuer}' expired at {_when(h.expires_at_ms)}",
            )


def _agent(snapshot: Snapshot, spiffe_id: SpiffeId, now_ms: int) -> tuple[AgentView, int]:
    """The agent's record and the Unix ms at which it expires; raises if it can't take part."""
    view = snapshot.agent_by_id(spiffe_id)
    if view is None:
        raise _Deny(
            Reason.CHAIN_AGENT_INACTIVE, f"'{spiffe_id}' in the chain is not a registered agent"
        )
    if view.disabled:
        why = f": {view.disabled_reason}" if view.disabled_reason else ""
        raise _Deny(
            Reason.CHAIN_AGENT_INACTIVE,
            f"'{spiffe_id}' (agent {view.name!r}) in the chain is disabled{why}",
        )
    expires_ms = _NEVER if view.expires_at is None else to_ms(view.expires_at)
    if now_ms >= expires_ms:
        raise _Deny(
            Reason.CHAIN_AGENT_INACTIVE,
            f"'{spiffe_id}' (agent {view.name!r}) in the chain expired at {_when(expires_ms)}",
        )
    return view, expires_ms


def _judge(hops: list[HopFields], local: SpiffeId, snapshot: Snapshot, now_ms: int) -> Verdict:
    """Steps 6 and 7: depend on the snapshot and, through agent expiry, on `now`."""
    try:
        checked = [_agent(snapshot, h.issuer, now_ms) for h in hops]
        callee, callee_expires = _agent(snapshot, local, now_ms)
    except _Deny as d:
        return Verdict(Decision.deny(d.reason, d.message), _NEVER)
    until = min(callee_expires, *(e for _, e in checked))
    views = [v for v, _ in checked]
    origin = hops[0].origin
    assert origin is not None  # parse_hop: hop 0 always names its origin
    if len(hops) == 1 and isinstance(origin, AgentOrigin):
        return Verdict(
            Decision.allow("", f"a direct call from its origin '{origin.spiffe_id}'"), until
        )
    decision = chain_policy_decision(
        snapshot.delegation_policies_for(callee),
        callee,
        origin,
        views[0] if isinstance(origin, AgentOrigin) else None,
        views,
        hops[-1].scopes,
    )
    return Verdict(decision, until)


def _decide(
    hops: list[HopFields],
    anchor: object,
    data: bytes,
    last_signed: bool,
    local: SpiffeId,
    snapshot: Snapshot,
    cache: ChainCache,
    now_ms: int,
    issuers: tuple[SpiffeId, ...] | None = None,
    earliest_ms: int | None = None,
) -> ChainDecision:
    """Steps 6 and 7, memoized per snapshot generation. The anchor (the digest of hop
    n-2, or the origin of a one-hop chain) fixes the origin and every issuer but the
    last. `issuers` and `earliest_ms`, when the caller has them, save recomputing."""
    last = hops[-1]
    key = (anchor, last.issuer, local, last.scopes)
    decision = cache.verdict(snapshot, key, now_ms, lambda: _judge(hops, local, snapshot, now_ms))
    if not decision.allowed:
        return ChainDecision(decision)
    origin = hops[0].origin
    assert origin is not None  # parse_hop: hop 0 always names its origin
    chain = VerifiedChain(
        origin,
        tuple([h.issuer for h in hops]) if issuers is None else issuers,
        local,
        last.method,
        last.scopes,
        min([h.expires_at_ms for h in hops]) if earliest_ms is None else earliest_ms,
        last.trace_id,
        data,
        last_signed,
    )
    return ChainDecision(decision, chain)
