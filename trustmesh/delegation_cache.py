"""The caches that keep chain verification cheap; all bounded (LRU), all thread-safe.

* **Verified prefixes**, by their canonical encoding. A prefix entry holds hops
  whose bodies parsed, whose links, lifetimes and scopes checked out and whose
  signatures verified under certificates that chained to the trust bundles in force
  when they were checked. None of that depends on `now`, the snapshot or the
  receiver, so a hit skips exactly that work. The time, agent and policy checks and
  the binding of the last hop to the peer and receiver always run again.
  A hit requires the leading bytes of the incoming chain to equal the stored
  encoding of the prefix (`encode_chain` of its hops), so a hit is exactly the bytes
  that were verified; a chain from a non-canonical encoder merely misses. The usual
  lookup is "every hop but the last", cut from the incoming bytes with no parsing
  and no hashing of the prefix. A chain's last hop is never stored: it is new on
  every call, so storing it would only push useful prefixes out.
* **Issuer keys**, by the carried certificate chain (DER): the SPIFFE ID the
  `PeerVerifier` proved for it, the leaf's public key, and the window in which that
  proof holds: the intersection of the validity of every presented certificate and
  of every authority in the trust domain's bundle (conservative: a miss only costs a
  fresh `PeerVerifier` call). A hit is honoured only for a hop issued inside it.
* **Verdicts** on the snapshot-dependent part (agents and DelegationPolicies), per
  snapshot and generation, like `trustmesh.authz`. A verdict records until when the
  agents it checked stay unexpired; past that, it is computed again at `now`.

Every entry that depends on the trust bundles is dropped when the `PeerVerifier`'s
bundle set changes version.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from datetime import UTC, datetime
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from trustmesh.decision import Decision
from trustmesh.delegation_format import HopFields, encode_chain, to_ms
from trustmesh.limits import DEFAULT_LIMITS, Limits
from trustmesh.peer_verify import CacheInfo, PeerVerifier
from trustmesh.snapshot import Snapshot
from trustmesh.spiffe_id import SpiffeId
from trustmesh.x509svid import ecdsa_hash

__all__ = ["ChainCache", "IssuerKey", "Verdict", "VerifiedHop", "VerifiedPrefix"]

# Prefix entries are found by the last bytes of their canonical encoding (the end of
# a signature: as good as random), then compared in full.
_KEY_BYTES = 64


class VerifiedHop(NamedTuple):
    """A hop whose structure, link and signature (if any) have been checked."""

    fields: HopFields
    body: bytes
    signature: bytes
    digest: bytes


class VerifiedPrefix(NamedTuple):
    """Verified hops 0..j and what the per-call checks need of them, precomputed so
    that a call whose chain extends a stored prefix by one hop costs O(1) beyond that
    hop (`trustmesh.delegation_verify`)."""

    hops: tuple[VerifiedHop, ...]
    fields: tuple[HopFields, ...]
    # Of the last hop of the prefix: what the next hop must link to.
    digest: bytes
    # Over every hop of the prefix: what the validity check at `now` compares with.
    latest_issued_ms: int
    earliest_expiry_ms: int
    issuers: tuple[SpiffeId, ...]

    @classmethod
    def of(cls, hops: tuple[VerifiedHop, ...]) -> VerifiedPrefix:
        return cls(
            hops,
            tuple(h.fields for h in hops),
            hops[-1].digest,
            max(h.fields.issued_at_ms for h in hops),
            min(h.fields.expires_at_ms for h in hops),
            tuple(h.fields.issuer for h in hops),
        )


class IssuerKey(NamedTuple):
    """What a verified certificate chain proves, and when that proof holds (Unix ms)."""

    spiffe_id: SpiffeId
    key: ec.EllipticCurvePublicKey
    algorithm: ec.ECDSA
    not_before_ms: int
    not_after_ms: int


class Verdict(NamedTuple):
    """The snapshot-dependent decision on a chain, valid while `now < valid_until_ms`."""

    decision: Decision
    valid_until_ms: int


class _Lru:
    __slots__ = ("entries", "hits", "maxsize", "misses")

    def __init__(self, maxsize: int) -> None:
        if maxsize < 0:
            raise ValueError(f"cache size must be >= 0, got {maxsize}")
        self.entries: OrderedDict[Hashable, object] = OrderedDict()
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> object | None:
        found = self.entries.get(key)
        if found is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return found

    def put(self, key: Hashable, value: object) -> None:
        if self.maxsize == 0:
            return
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.maxsize:
            self.entries.popitem(last=False)

    def info(self) -> CacheInfo:
        return CacheInfo(self.hits, self.misses, len(self.entries), self.maxsize)


class ChainCache:
    """Caches for `trustmesh.delegation.verify_chain`; one per sidecar."""

    def __init__(self, *, limits: Limits = DEFAULT_LIMITS) -> None:
        self._lock = threading.Lock()
        self._prefixes = _Lru(limits.delegation_prefix_cache)
        self._keys = _Lru(limits.delegation_key_cache)
        self._policies = _Lru(limits.delegation_policy_cache)
        self._ids: dict[str, SpiffeId] = {}
        self._bundles_version: str | None = None
        self._policy_owner: tuple[weakref.ref[Snapshot], int] | None = None

    # -- bundles --------------------------------------------------------------------

    def sync_bundles(self, version: str) -> None:
        """Drop what depends on the trust bundles when their version changes."""
        if version == self._bundles_version:  # the usual case, read without the lock
            return
        with self._lock:
            if version != self._bundles_version:
                self._prefixes.entries.clear()
                self._keys.entries.clear()
                self._bundles_version = version

    # -- prefixes -------------------------------------------------------------------

    def prefix(self, region: bytes) -> VerifiedPrefix | None:
        """The verified hops whose canonical encoding is exactly `region`, if stored."""
        key = region[-_KEY_BYTES:]
        with self._lock:
            entry = self._prefixes.entries.get(key)
            if isinstance(entry, tuple) and entry[0] == region:
                self._prefixes.entries.move_to_end(key)
                self._prefixes.hits += 1
                found: VerifiedPrefix = entry[1]
                return found
            self._prefixes.misses += 1
            return None

    def remember(self, hops: Sequence[VerifiedHop], start: int, version: str) -> None:
        """Store each prefix `hops[:j+1]` for j >= start (the newly verified ones)."""
        entries = []
        for j in range(start, len(hops)):
            prefix = tuple(hops[: j + 1])
            region = encode_chain((h.body, h.signature) for h in prefix)
            entries.append((region, VerifiedPrefix.of(prefix)))
        with self._lock:
            if version != self._bundles_version:
                return  # verified against bundles that have been replaced meanwhile
            for region, verified in entries:
                self._prefixes.put(region[-_KEY_BYTES:], (region, verified))

    # -- keys -----------------------------------------------------------------------

    def issuer_key(
        self, chain_der: tuple[bytes, ...], at_ms: int, verifier: PeerVerifier
    ) -> IssuerKey:
        """The proven identity and key of a certificate chain (leaf first) at `at_ms`.

        Raises `MeshError` (from the `PeerVerifier`) or `ValueError` when the chain
        does not verify at that time or its key is not an EC key."""
        with self._lock:
            found = self._keys.get(chain_der)
            version = self._bundles_version
        if isinstance(found, IssuerKey) and found.not_before_ms <= at_ms <= found.not_after_ms:
            return found
        at = datetime.fromtimestamp(at_ms / 1000, UTC)
        named = verifier.verify(chain_der, now=at, role="client")
        try:
            certs = [x509.load_der_x509_certificate(der) for der in chain_der]
        except Exception as e:  # verified just above, so unreachable in practice
            raise ValueError(f"certificate does not parse: {e}") from e
        key = certs[0].public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError(f"the key of '{named}' is not an EC key")
        bundle = verifier.bundles.get(named.trust_domain)
        window = [*certs, *(bundle.authorities if bundle is not None else ())]
        entry = IssuerKey(
            named,
            key,
            ec.ECDSA(ecdsa_hash(key)),  # type: ignore[arg-type]
            max(to_ms(c.not_valid_before_utc) for c in window),
            min(to_ms(c.not_valid_after_utc) for c in window),
        )
        with self._lock:
            if version == self._bundles_version:  # else verified against replaced bundles
                self._keys.put(chain_der, entry)
        return entry

    # -- policy decisions -----------------------------------------------------------

    def verdict(
        self, snapshot: Snapshot, key: Hashable, now_ms: int, compute: Callable[[], Verdict]
    ) -> Decision:
        """The memoized snapshot-dependent decision for `key`, recomputed when the
        snapshot or its generation changed or `now` reached its `valid_until_ms`."""
        generation = snapshot.generation
        owner = self._policy_owner
        if owner is not None and owner[0]() is snapshot and owner[1] == generation:
            # A hit takes no lock: each OrderedDict call is atomic, an entry that another
            # thread evicts meanwhile is still a correct answer, and an owner replaced
            # meanwhile (a new tuple: the entries may be another snapshot's) is seen.
            found = self._policies.entries.get(key)
            if (
                isinstance(found, Verdict)
                and now_ms < found.valid_until_ms
                and self._policy_owner is owner
            ):
                try:  # noqa: SIM105 (contextlib.suppress costs more on this path)
                    self._policies.entries.move_to_end(key)
                except KeyError:
                    pass
                self._policies.hits += 1  # statistics only: a lost update is harmless
                return found.decision
        with self._lock:
            owner = self._policy_owner
            if owner is None or owner[0]() is not snapshot or owner[1] != generation:
                self._policies.entries.clear()
                self._policy_owner = (weakref.ref(snapshot), generation)
            self._policies.misses += 1
        fresh = compute()
        with self._lock:
            owner = self._policy_owner
            if owner is not None and owner[0]() is snapshot and owner[1] == generation:
                self._policies.put(key, fresh)
        return fresh.decision

    def info(self) -> dict[str, CacheInfo]:
        with self._lock:
            return {
                "prefixes": self._prefixes.info(),
                "keys": self._keys.info(),
                "policies": self._policies.info(),
            }
