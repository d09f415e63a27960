"""Where the sidecar's SVID and bundles come from: the credential-source seam.

`RegistryCredentials` is the embedded-CA source:
1. Bootstrap. Trust in the registry comes from a bundle file or a pinned CA
   fingerprint: with a pin, the bundle is fetched over unverified TLS and accepted
   only if one of its CAs has that fingerprint; an impostor registry is refused.
   Then a key pair is generated here (it never leaves this process and its 0600
   file), and the join token is exchanged for an SVID over TLS that verifies the
   registry's exact SPIFFE ID.
2. Restart. A still-valid SVID in the data dir is reused, so a restarted sidecar
   does not need a new token.
3. Renewal at about half the TTL, over mTLS with the current SVID.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Protocol

import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from trustmesh.channels import MeshChannels
from trustmesh.errors import (
    BootstrapError,
    ConfigError,
    CredentialError,
    PeerAuthenticationError,
    RegistryUnavailableError,
)
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.v1 import registry_pb2_grpc as rgrpc
from trustmesh.v1 import resources_pb2 as pb
from trustmesh.x509svid import (
    BundleSet,
    TrustBundle,
    X509Svid,
    ca_fingerprint,
    ecdsa_hash,
    generate_key,
    make_csr,
    write_private_file,
    write_public_file,
)

__all__ = ["CredentialSource", "RegistryCredentials", "bundles_from_pb", "registry_id_for"]

log = logging.getLogger(__name__)


class CredentialSource(Protocol):
    """The SVID, the bundles per trust domain, and a signer with the SVID's key.

    The embedded-CA source is `RegistryCredentials`; the SPIFFE Workload API source
    (SPIRE) is `spiffe_source.WorkloadApiSource` (ADR 0007). The sidecar runtime uses
    only what is declared here.
    """

    def current(self) -> tuple[X509Svid, BundleSet]: ...

    def subscribe(self, callback: Callable[[X509Svid, BundleSet], None]) -> None: ...

    def sign(self, data: bytes) -> tuple[bytes, X509Svid]:
        """ECDSA signature over `data` with the current SVID's key, and that SVID."""
        ...

    @property
    def registry_id(self) -> SpiffeId:
        """The registry's SPIFFE ID, in the trust domain of our SVID."""
        ...

    async def obtain(self) -> X509Svid:
        """The first SVID; the sidecar stays NOT_SERVING until this returns."""
        ...

    async def renew_forever(self, channels: MeshChannels) -> None:
        """Keep the SVID fresh for as long as the sidecar runs; subscribers hear of it."""
        ...

    def set_bundles(self, bundles: BundleSet) -> None:
        """The bundles the sidecar now uses (from the registry snapshot in CA mode)."""
        ...


def sign_with(svid: X509Svid, data: bytes) -> bytes:
    return svid.private_key.sign(data, ec.ECDSA(ecdsa_hash(svid.private_key)))


def registry_id_for(td: TrustDomain) -> SpiffeId:
    return SpiffeId.parse(f"spiffe://{td}/trustmesh/registry")


def bundles_from_pb(bundles: Iterable[pb.TrustBundle]) -> BundleSet:
    result = BundleSet()
    for b in bundles:
        result = result.with_bundle(
            TrustBundle.from_der(TrustDomain.parse(b.trust_domain), list(b.x509_authorities))
        )
    return result


def _rpc_error(what: str, e: grpc.aio.AioRpcError, explain: str | None) -> Exception:
    if explain:
        return PeerAuthenticationError(
            f"{what}: {explain}",
            reason="peer_identity_mismatch" if "expected" in explain else "peer_unauthenticated",
        )
    if e.code() == grpc.StatusCode.PERMISSION_DENIED:
        return BootstrapError(f"{what}: {e.details()}")
    return RegistryUnavailableError(f"{what}: {e.code().name}: {e.details()}")


class RegistryCredentials:
    def __init__(
        self,
        spiffe_id: SpiffeId,
        *,
        registry: str,
        bootstrap: str,
        data_dir: Path,
        clock: Callable[[], datetime],
        join_token: str | None = None,
        bundle_file: Path | None = None,
        ca_fingerprint: str | None = None,
    ) -> None:
        if bundle_file is None and ca_fingerprint is None:
            raise ConfigError(
                "the sidecar needs a way to trust the registry: pass --trust-bundle FILE "
                "or --ca-fingerprint sha256:HEX"
            )
        self.spiffe_id = spiffe_id
        self.registry = registry
        self.bootstrap = bootstrap
        self.registry_id = registry_id_for(spiffe_id.trust_domain)
        self._dir = data_dir
        self._clock = clock
        self._token = join_token
        self._bundle_file = bundle_file
        self._pin = ca_fingerprint.lower() if ca_fingerprint else None
        self._svid: X509Svid | None = None
        self._received_at: datetime | None = None
        self._bundles = BundleSet()
        self._subscribers: list[Callable[[X509Svid, BundleSet], None]] = []

    # -- CredentialSource ---------------------------------------------------------------

    def current(self) -> tuple[X509Svid, BundleSet]:
        if self._svid is None:
            raise CredentialError("no SVID yet")
        return self._svid, self._bundles

    def subscribe(self, callback: Callable[[X509Svid, BundleSet], None]) -> None:
        self._subscribers.append(callback)

    def sign(self, data: bytes) -> tuple[bytes, X509Svid]:
        svid, _ = self.current()
        return sign_with(svid, data), svid

    def set_bundles(self, bundles: BundleSet) -> None:
        self._bundles = bundles

    # -- obtaining ------------------------------------------------------------------------

    async def obtain(self) -> X509Svid:
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._bundles = await self._trusted_bundles()
        reused = self._load_existing()
        if reused is not None:
            log.info("reusing SVID %s from %s", reused.serial_hex, self._dir)
            self._svid = reused
            self._received_at = self._clock()
            return reused
        if not self._token:
            raise ConfigError(
                f"no valid SVID in {self._dir} and no join token: pass --join-token "
                "(or set TRUSTMESH_JOIN_TOKEN)"
            )
        key = generate_key()
        channels = MeshChannels(lambda: (None, self._bundles), directory=self._dir / "bridge-boot")
        try:
            stub = rgrpc.BootstrapStub(await channels.get(self.bootstrap, self.registry_id))
            try:
                resp = await stub.Join(
                    rpb.JoinRequest(token=self._token, csr=make_csr(key, self.spiffe_id)),
                    timeout=10,
                )
            except grpc.aio.AioRpcError as e:
                raise _rpc_error(
                    f"join at {self.bootstrap} failed",
                    e,
                    channels.explain(self.bootstrap, self.registry_id),
                ) from e
        finally:
            await channels.close()
        svid = self._accept(resp, key)
        self._svid = svid
        return svid

    async def _trusted_bundles(self) -> BundleSet:
        if self._bundle_file is not None:
            try:
                data = self._bundle_file.read_bytes()
            except OSError as e:
                raise ConfigError(f"cannot read trust bundle {self._bundle_file}: {e}") from e
            return BundleSet().with_bundle(TrustBundle.from_pem(self.spiffe_id.trust_domain, data))
        # Pinned CA fingerprint: fetch the bundle unverified, then check it against the pin.
        channels = MeshChannels(lambda: (None, None), directory=self._dir / "bridge-pin")
        try:
            stub = rgrpc.BootstrapStub(await channels.get(self.bootstrap, None))
            try:
                resp = await stub.GetBundle(rpb.GetBundleRequest(), timeout=10)
            except grpc.aio.AioRpcError as e:
                raise RegistryUnavailableError(
                    f"cannot fetch the trust bundle from {self.bootstrap}: {e.code().name}"
                ) from e
        finally:
            await channels.close()
        bundles = bundles_from_pb(resp.bundles)
        ours = bundles.get(self.spiffe_id.trust_domain)
        if ours is None or not any(ca_fingerprint(c) == self._pin for c in ours.authorities):
            raise PeerAuthenticationError(
                f"the registry at {self.bootstrap} presented a CA that does not match the pinned "
                f"fingerprint {self._pin}: refusing it (impostor registry?)",
                reason="registry_untrusted",
            )
        return bundles

    def _load_existing(self) -> X509Svid | None:
        cert, key = self._dir / "svid.crt", self._dir / "svid.key"
        if not (cert.exists() and key.exists()):
            return None
        try:
            svid = X509Svid.from_pem(cert.read_bytes(), key.read_bytes())
        except Exception as e:  # a damaged file means bootstrap again, not a crash
            log.warning("ignoring unreadable SVID in %s: %s", self._dir, type(e).__name__)
            return None
        now = self._clock()
        lifetime = svid.not_after - svid.not_before
        if svid.spiffe_id != self.spiffe_id or svid.not_after - now < lifetime / 10:
            return None
        return svid

    def _accept(self, resp: rpb.SvidResponse, key: object) -> X509Svid:
        svid = X509Svid.from_der(list(resp.cert_chain), key)  # type: ignore[arg-type]
        if svid.spiffe_id != self.spiffe_id:
            raise BootstrapError(f"registry issued {svid.spiffe_id}, expected {self.spiffe_id}")
        if resp.bundles:
            self._bundles = bundles_from_pb(resp.bundles)
        write_private_file(self._dir / "svid.key", svid.key_pem())
        write_public_file(self._dir / "svid.crt", svid.chain_pem())
        self._received_at = self._clock()
        return svid

    # -- renewal -----------------------------------------------------------------------------

    def renew_at(self) -> datetime:
        """Half-way through what was left of the SVID when we got it.

        (Not half of notBefore..notAfter: the CA backdates notBefore for clock skew,
        which would make a short-lived SVID look half-spent on arrival.)
        """
        svid, _ = self.current()
        got = self._received_at or self._clock()
        return got + (svid.not_after - got) / 2

    async def renew(self, channels: MeshChannels) -> X509Svid:
        key = generate_key()
        stub = rgrpc.RegistryStub(await channels.get(self.registry, self.registry_id))
        try:
            resp = await stub.RenewSvid(
                rpb.RenewSvidRequest(csr=make_csr(key, self.spiffe_id)), timeout=10
            )
        except grpc.aio.AioRpcError as e:
            raise _rpc_error(
                "SVID renewal failed", e, channels.explain(self.registry, self.registry_id)
            ) from e
        svid = self._accept(resp, key)
        self._svid = svid
        for callback in list(self._subscribers):
            callback(svid, self._bundles)
        return svid

    async def renew_forever(self, channels: MeshChannels) -> None:
        backoff = 0.5
        while True:
            delay = (self.renew_at() - self._clock()).total_seconds()
            await asyncio.sleep(max(0.0, delay))
            try:
                svid = await self.renew(channels)
                log.info("SVID renewed: serial %s, expires %s", svid.serial_hex, svid.not_after)
                backoff = 0.5
            except (RegistryUnavailableError, PeerAuthenticationError, BootstrapError) as e:
                log.warning("%s; retrying", e.message)
                await asyncio.sleep(backoff * (1 + random.random() / 2))  # noqa: S311
                backoff = min(backoff * 2, 30.0)
