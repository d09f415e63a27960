"""Which agent a peer's verified certificate chain proves, remembered per chain."""

from __future__ import annotations

from datetime import datetime

from cryptography import x509

from trustmesh.peer_verify import PeerVerifier
from trustmesh.spiffe_id import SpiffeId
from trustmesh.x509svid import BundleSet

__all__ = ["Callers"]


class Callers:
    """The caller each verified chain proves, remembered per chain (by its bytes).

    An entry is used only for the same chain, checked by the same `PeerVerifier` (a
    new bundle set means a new verifier), and only inside a validity window that is
    never wider than the verified chain's: the intersection of every presented
    certificate's and of every CA's in the caller's trust-domain bundle.
    Otherwise (and at a chain's first call) the verifier decides, as before. Only
    chains that verified are remembered.
    """

    __slots__ = ("_entries",)

    _MAX = 1024

    def __init__(self) -> None:
        self._entries: dict[
            tuple[bytes, ...], tuple[PeerVerifier, SpiffeId, datetime, datetime]
        ] = {}

    def verify(self, verifier: PeerVerifier, chain: tuple[bytes, ...], now: datetime) -> SpiffeId:
        if not isinstance(chain, tuple):
            return verifier.verify(chain, now=now, role="client")
        found = self._entries.get(chain)
        if found is not None and found[0] is verifier and found[2] <= now < found[3]:
            return found[1]
        caller = verifier.verify(chain, now=now, role="client")  # raises when it must
        window = _validity(chain, verifier.bundles, caller)
        if window is not None:
            if len(self._entries) >= self._MAX:
                self._entries.clear()
            self._entries[chain] = (verifier, caller, *window)
        return caller


def _validity(
    chain: tuple[bytes, ...], bundles: BundleSet, caller: SpiffeId
) -> tuple[datetime, datetime] | None:
    bundle = bundles.get(caller.trust_domain)
    if bundle is None or not chain:
        return None
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError:
        return None
    # Every authority of the caller's trust domain, not only the one that issued the
    # last presented certificate: the peer chooses what it presents (an unrelated
    # certificate appended would leave the real anchor out), and a narrower window
    # only costs a call to the verifier.
    certs.extend(bundle.authorities)
    return (
        max(c.not_valid_before_utc for c in certs),
        min(c.not_valid_after_utc for c in certs),
    )
