"""What a sidecar knows at a moment: its identity, SVID, bundles and snapshot.

Decisions read this through O(1) lookups only; the watch loop and the credential
source are the only writers, and both run on the sidecar's event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from trustmesh.delegation import ChainCache
from trustmesh.peer_verify import PeerVerifier
from trustmesh.snapshot import Snapshot
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.user_token import UserTokenVerifier
from trustmesh.x509svid import BundleSet, TrustBundle, X509Svid

__all__ = ["Counters", "SidecarState", "system_clock"]

log = logging.getLogger(__name__)


def system_clock() -> datetime:
    return datetime.now(UTC)


@dataclass
class Counters:
    allowed: int = 0
    denied: int = 0


class SidecarState:
    def __init__(
        self,
        spiffe_id: SpiffeId,
        svid: X509Svid,
        bundles: BundleSet,
        *,
        clock: Callable[[], datetime] = system_clock,
    ) -> None:
        self.spiffe_id = spiffe_id
        self.svid = svid
        self.bundles = bundles
        self.verifier = PeerVerifier(bundles)
        self.snapshot = Snapshot()
        self.synced = False
        self.registry_connected = False
        self.clock = clock
        self.counters = Counters()
        # Delegation: verified chain prefixes and certificates, and the user-token
        # issuers this sidecar trusts (None: user tokens are refused).
        self.chain_cache = ChainCache()
        self.user_tokens: UserTokenVerifier | None = None
        self._listeners: list[Callable[[], None]] = []
        self._credential_listeners: list[Callable[[X509Svid, BundleSet], None]] = []

    # -- writers ---------------------------------------------------------------

    def set_svid(self, svid: X509Svid) -> None:
        self.svid = svid
        self._notify_credentials()

    def snapshot_applied(self) -> None:
        """Called after every applied update: refresh bundles, re-check open calls."""
        self.synced = True
        bundles = _bundles_from(self.snapshot)
        if len(bundles) and bundles.version != self.bundles.version:
            self.bundles = bundles
            self.verifier = PeerVerifier(bundles)
            self._notify_credentials()
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                log.exception("snapshot listener failed")

    def on_snapshot(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def on_credentials(self, listener: Callable[[X509Svid, BundleSet], None]) -> None:
        self._credential_listeners.append(listener)

    def _notify_credentials(self) -> None:
        for listener in list(self._credential_listeners):
            listener(self.svid, self.bundles)

    # -- readers ---------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.synced and self.svid.not_after > self.clock()

    def now(self) -> datetime:
        return self.clock()


def _bundles_from(snapshot: Snapshot) -> BundleSet:
    result = BundleSet()
    for td, ders in snapshot.bundles().items():
        if ders:
            result = result.with_bundle(TrustBundle.from_der(TrustDomain.parse(td), ders))
    return result
