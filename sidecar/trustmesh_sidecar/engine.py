"""The seam between the sidecar's decisions and the bytes it forwards.

Everything above this seam (routing, authorization, metadata edits, spans) works on
the values defined here and never imports grpc; `grpc_engine.py` is the engine that
implements it with grpcio, and a frame-level engine can replace it without touching
the logic.

The engine:
* terminates the inbound mTLS listener with the SVID and bundles it is given, and
  reports each caller as the DER chain that the TLS layer verified;
* serves the plaintext outbound listener on localhost for the agent;
* asks a `CallRouter` what to do with each call (forward where, with which header
  list, or reject with which status) and reports how forwarded calls ended;
* forwards the message bytes as they are, without parsing them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from trustmesh.errors import Code
from trustmesh.spiffe_id import SpiffeId
from trustmesh.x509svid import BundleSet, X509Svid

__all__ = [
    "CallControl",
    "CallObserver",
    "CallRouter",
    "CallStart",
    "Engine",
    "Forward",
    "Header",
    "Headers",
    "Reject",
    "Upstream",
]

Header = tuple[str, str | bytes]
Headers = tuple[Header, ...]


# CallStart and Forward are made per call and never changed after: plain slots classes
# (a frozen dataclass's __init__ sets every field through object.__setattr__).
@dataclass(slots=True)
class CallStart:
    method: str
    headers: Headers
    peer_address: str
    # Inbound: the caller's chain as the TLS handshake verified it, leaf first, DER.
    # Outbound (the local agent): empty.
    peer_chain: tuple[bytes, ...]
    # Seconds left until the caller's deadline, if it set one.
    time_remaining: float | None


@dataclass(frozen=True, slots=True)
class Upstream:
    address: str
    # The SPIFFE ID the upstream must prove over mTLS; None for the local app (plaintext).
    expected_id: SpiffeId | None


class CallObserver(Protocol):
    def response_headers(self, headers: Headers) -> Headers:
        """Edit the upstream's initial metadata before it goes back downstream."""
        ...

    def finished(self, code: Code, details: str) -> None:
        """The call ended with this status (forwarded or aborted)."""
        ...


@dataclass(slots=True)
class Forward:
    upstream: Upstream
    headers: Headers
    observer: CallObserver
    # Maps a failure to reach the upstream to a clear status (e.g. identity mismatch).
    explain_unavailable: Callable[[], tuple[Code, str] | None] | None = None


@dataclass(frozen=True, slots=True)
class Reject:
    code: Code
    details: str


class CallControl(Protocol):
    def abort(self, code: Code, details: str) -> None:
        """End an in-flight call with this status (used for revocation)."""
        ...


class CallRouter(Protocol):
    def route(self, call: CallStart, control: CallControl) -> Forward | Reject:
        """Decide the call. Must be fast and must not block: it runs per call."""
        ...


class Engine(Protocol):
    async def start(
        self,
        *,
        inbound_address: str,
        outbound_address: str,
        inbound_router: CallRouter,
        outbound_router: CallRouter,
    ) -> tuple[str, str]:
        """Bind both listeners; returns the bound (inbound, outbound) addresses."""
        ...

    def update_credentials(self, svid: X509Svid, bundles: BundleSet) -> None:
        """New handshakes use these from now on; open connections age out."""
        ...

    def peer_serials(self, upstream: Upstream) -> list[str]:
        """Serials the upstream presented, oldest first."""
        ...

    async def stop(self, grace: float) -> None: ...
