"""Verify a peer's X.509 SVID chain and name the SPIFFE ID it proves.

Invariants:

* Pure: bytes and an injected `now` in, a `SpiffeId` or a `PeerAuthenticationError`
  out. No cryptography exception escapes this module.
* A chain is checked only against the bundle of the trust domain its leaf claims.
  A federated CA can vouch for its own trust domain's IDs and for no one else's,
  even though the TLS root store (`BundleSet.all_pem()`) holds every CA.
* The chain check is cryptography's `x509.verification` (WebPKI profile), never a
  hand-rolled signature walk.
* The cache of verified chains is bounded (LRU) and honours a hit only while `now`
  lies inside the validity window of every certificate of the verified chain.
  A `PeerVerifier` is built for one `BundleSet`; a new bundle set means a new
  verifier and so an empty cache.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    ClientVerifier,
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
)

from trustmesh.errors import PeerAuthenticationError
from trustmesh.limits import DEFAULT_LIMITS
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.x509svid import BundleSet, spiffe_id_of

__all__ = ["MAX_CERT_BYTES", "MAX_CHAIN_LENGTH", "CacheInfo", "PeerVerifier", "Role"]

Role = Literal["client", "server"]

# Certificates a peer may present (leaf + intermediates); SPIRE nests one or two.
MAX_CHAIN_LENGTH = 8
# DER bytes of one presented certificate; a P-256 SVID is under 1 KiB.
MAX_CERT_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class CacheInfo:
    hits: int
    misses: int
    size: int
    maxsize: int


@dataclass(frozen=True, slots=True)
class _Verified:
    spiffe_id: SpiffeId
    # The intersection of the validity windows of the whole verified chain.
    not_before: datetime
    not_after: datetime


def _server_eku(_policy: Policy, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage) -> None:
    if ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        raise ValueError("certificate lacks the serverAuth extended key usage")


def _server_eku_ca(
    _policy: Policy, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None
) -> None:
    if eku is None:
        return
    if (
        ExtendedKeyUsageOID.SERVER_AUTH not in eku
        and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku
    ):
        raise ValueError("CA certificate restricts its extended key usage to exclude serverAuth")


# The peer is a TLS server, but we check its SPIFFE ID ourselves, so there is no DNS
# name to give `build_server_verifier`. Instead a client verifier is built whose EKU
# checks (leaf and CAs; both default to clientAuth) ask for serverAuth instead.
_SERVER_EE_POLICY = ExtensionPolicy.webpki_defaults_ee().require_present(
    x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _server_eku
)
_SERVER_CA_POLICY = ExtensionPolicy.webpki_defaults_ca().may_be_present(
    x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _server_eku_ca
)


def _check_now(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")


class PeerVerifier:
    """Checks peer chains against one `BundleSet`. Safe to share between threads."""

    def __init__(
        self, bundles: BundleSet, *, cache_size: int = DEFAULT_LIMITS.verified_cert_cache
    ) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self._bundles = bundles
        self._stores: dict[TrustDomain, Store] = {
            b.trust_domain: Store(list(b.authorities)) for b in bundles if b.authorities
        }
        self._cache_size = cache_size
        self._cache: OrderedDict[bytes, _Verified] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    @property
    def bundles(self) -> BundleSet:
        return self._bundles

    def verify(self, chain_der: Sequence[bytes], *, now: datetime, role: Role) -> SpiffeId:
        """The SPIFFE ID that `chain_der` (leaf first) proves at `now`.

        `role` is the peer's side of the TLS connection: "client" when we accepted
        it, "server" when we dialled it.
        """
        _check_now(now)
        if role not in ("client", "server"):
            raise ValueError(f"role must be 'client' or 'server', got {role!r}")
        _check_shape(chain_der)
        key = _cache_key(chain_der, role)
        cached = self._lookup(key, now)
        if cached is not None:
            return cached
        verified = self._verify_uncached(chain_der, now=now, role=role)
        self._remember(key, verified)
        return verified.spiffe_id

    def expect(
        self, chain_der: Sequence[bytes], expected: SpiffeId, *, now: datetime, role: Role
    ) -> None:
        """Verify the chain, then require that it proves exactly `expected`."""
        actual = self.verify(chain_der, now=now, role=role)
        if actual != expected:
            raise PeerAuthenticationError(
                f"expected {expected}, peer presented {actual}",
                reason="peer_identity_mismatch",
            )

    def cache_info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self._hits, self._misses, len(self._cache), self._cache_size)

    # -- internals ------------------------------------------------------------------

    def _lookup(self, key: bytes, now: datetime) -> SpiffeId | None:
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None and entry.not_before <= now <= entry.not_after:
                self._cache.move_to_end(key)
                self._hits += 1
                return entry.spiffe_id
            if entry is not None:
                del self._cache[key]
            self._misses += 1
            return None

    def _remember(self, key: bytes, verified: _Verified) -> None:
        if self._cache_size == 0:
            return
        with self._lock:
            self._cache[key] = verified
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _verify_uncached(
        self, chain_der: Sequence[bytes], *, now: datetime, role: Role
    ) -> _Verified:
        certs: list[x509.Certificate] = []
        for i, der in enumerate(chain_der):
            try:
                certs.append(x509.load_der_x509_certificate(bytes(der)))
            except Exception as e:  # hostile bytes: ValueError, InvalidVersion, ...
                raise PeerAuthenticationError(f"peer certificate #{i} is not DER X.509: {e}") from e
        leaf = certs[0]
        spiffe_id = spiffe_id_of(leaf)
        td = spiffe_id.trust_domain
        if not spiffe_id.path:
            raise PeerAuthenticationError(
                f"peer certificate names the trust domain {spiffe_id} itself, not a workload"
            )
        store = self._stores.get(td)
        if store is None:
            raise PeerAuthenticationError(
                f"no trust bundle for trust domain {td}; cannot verify {spiffe_id}",
                reason="peer_untrusted",
            )
        _check_leaf_time(leaf, spiffe_id, now)
        try:
            result = _verifier(store, now, role).verify(leaf, certs[1:])
        except Exception as e:  # fail closed: VerificationError or anything else
            raise PeerAuthenticationError(
                f"certificate for {spiffe_id} does not chain to the trust bundle of {td}: {e}"
            ) from e
        chain = result.chain
        return _Verified(
            spiffe_id,
            not_before=max(c.not_valid_before_utc for c in chain),
            not_after=min(c.not_valid_after_utc for c in chain),
        )


def _verifier(store: Store, now: datetime, role: Role) -> ClientVerifier:
    builder = PolicyBuilder().store(store).time(now).max_chain_depth(MAX_CHAIN_LENGTH)
    if role == "server":
        builder = builder.extension_policies(
            ca_policy=_SERVER_CA_POLICY, ee_policy=_SERVER_EE_POLICY
        )
    return builder.build_client_verifier()


def _check_shape(chain_der: Sequence[bytes]) -> None:
    if isinstance(chain_der, bytes | bytearray | str):
        raise TypeError("chain_der is a sequence of DER certificates, not one blob")
    if len(chain_der) == 0:
        raise PeerAuthenticationError("peer presented no certificate")
    if len(chain_der) > MAX_CHAIN_LENGTH:
        raise PeerAuthenticationError(
            f"peer presented {len(chain_der)} certificates; at most {MAX_CHAIN_LENGTH} are accepted"
        )
    for i, der in enumerate(chain_der):
        if len(der) > MAX_CERT_BYTES:
            raise PeerAuthenticationError(
                f"peer certificate #{i} is {len(der)} bytes; at most {MAX_CERT_BYTES} are accepted"
            )


def _check_leaf_time(leaf: x509.Certificate, spiffe_id: SpiffeId, now: datetime) -> None:
    """Clear messages for the commonest failure; cryptography checks it again."""
    if now > leaf.not_valid_after_utc:
        raise PeerAuthenticationError(
            f"certificate for {spiffe_id} expired at {leaf.not_valid_after_utc.isoformat()}"
        )
    if now < leaf.not_valid_before_utc:
        raise PeerAuthenticationError(
            f"certificate for {spiffe_id} is not valid before "
            f"{leaf.not_valid_before_utc.isoformat()}",
        )


def _cache_key(chain_der: Sequence[bytes], role: Role) -> bytes:
    h = hashlib.sha256(role.encode() + b"\0")
    for der in chain_der:
        h.update(len(der).to_bytes(4, "big"))
        h.update(der)
    return h.digest()
