"""Workload credentials from the SPIFFE Workload API (SPIRE), through py-spiffe.

`WorkloadApiSource` is the second `CredentialSource`: the SVID and the trust bundles
come from a SPIRE agent (or any Workload API) over a unix socket, and follow its
updates. Decisions are in ADR 0007; the invariants:

* The SVID and the bundle of its own trust domain come only from the Workload API.
  Bundles of other trust domains come from the Workload API's `federated_bundles`,
  then from configured files (`--federated-bundle TD=PATH`) for trust domains the
  Workload API does not cover. A file never names the workload's own trust domain.
* The registry snapshot is not a bundle source in this mode (`SnapshotWithoutBundles`):
  a compromised registry could otherwise add a CA for any trust domain.
* The identity is pinned by the first SVID (or `expected_id`). An update naming
  another ID is refused and the last good SVID is kept.
* py-spiffe watches on its own daemon thread. That thread only converts (pure code)
  and hands the result to the event loop with `call_soon_threadsafe`; every write to
  this object and every subscriber call happens on the loop.
* Unreachable at start is a state, not a crash: `obtain()` retries with jittered,
  bounded backoff and logs one clear line per attempt. Operator mistakes
  (`ConfigError`: wrong ID, a file for our own trust domain) are not retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Callable
from urllib.parse import urlparse

from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import X509BundleSet as PyBundleSet
from spiffe import X509Source
from spiffe import X509Svid as PySvid
from spiffe.errors import PySpiffeError
from spiffe.workloadapi.errors import X509SourceError

from trustmesh.channels import MeshChannels
from trustmesh.errors import ConfigError, CredentialError, InvalidSpiffeIdError, MeshError
from trustmesh.snapshot import Snapshot
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.x509svid import BundleSet, TrustBundle, X509Svid, ca_fingerprint
from trustmesh_sidecar.credentials import registry_id_for, sign_with

__all__ = [
    "SnapshotWithoutBundles",
    "WorkloadApiSource",
    "credentials_from",
    "endpoint_socket",
]

log = logging.getLogger(__name__)

_EMPTY = BundleSet()


def endpoint_socket(value: str) -> str:
    """Check a Workload API address: `unix:` followed by an absolute path.

    Returns it unchanged. SPIFFE allows `tcp:` too, but py-spiffe's client speaks
    unix sockets only, and so does a SPIRE agent by default.
    """
    text = value.strip()
    if not text:
        raise ConfigError(
            "the SPIFFE Workload API socket is empty: set SPIFFE_ENDPOINT_SOCKET or pass "
            "--spiffe-endpoint-socket, e.g. unix:///run/spire/agent.sock"
        )
    if text.startswith("/"):
        raise ConfigError(f"SPIFFE endpoint socket {text!r} has no scheme: write unix://{text}")
    parsed = urlparse(text)
    if parsed.scheme != "unix":
        raise ConfigError(
            f"SPIFFE endpoint socket {text!r}: only unix: sockets are supported, "
            "e.g. unix:///run/spire/agent.sock"
        )
    if parsed.netloc or not parsed.path.startswith("/"):
        raise ConfigError(
            f"SPIFFE endpoint socket {text!r}: expected unix:///absolute/path "
            "(unix://NAME/... would make NAME a host)"
        )
    if parsed.query or parsed.fragment:
        raise ConfigError(f"SPIFFE endpoint socket {text!r}: a query or fragment is not allowed")
    return text


def _socket_path(socket: str) -> str:
    return "/" + urlparse(socket).path.lstrip("/")


# -- conversion: py-spiffe values to ours (pure) ---------------------------------------------


def credentials_from(
    svid: PySvid,
    bundles: PyBundleSet,
    *,
    federated: BundleSet = _EMPTY,
    expected_id: SpiffeId | None = None,
) -> tuple[X509Svid, BundleSet]:
    """The SVID and bundle set that a Workload API update (as parsed by py-spiffe) means.

    Raises `ConfigError` when the SVID names another ID than `expected_id` or a
    configured federated bundle names the SVID's own trust domain, and
    `CredentialError` when the update is unusable (not an EC key, no bundle for the
    SVID's own trust domain, a bundle holding a non-CA certificate).
    """
    raw_id = str(svid.spiffe_id)
    key = svid.private_key
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialError(
            f"the Workload API sent an X.509-SVID for {raw_id[:256]!r} with a "
            f"{type(key).__name__}; TrustMesh needs EC keys (SPIRE agent: "
            'workload_x509_svid_key_type = "ec-p256", the default)',
            reason="invalid_svid",
        )
    try:
        ours = X509Svid(SpiffeId.parse(raw_id), tuple(svid.cert_chain), key)
    except (CredentialError, InvalidSpiffeIdError) as e:
        raise CredentialError(
            f"the Workload API sent an unusable X.509-SVID for {raw_id[:256]!r}: {e.message}",
            reason="invalid_svid",
        ) from e
    if expected_id is not None and ours.spiffe_id != expected_id:
        raise ConfigError(
            f"the SPIFFE Workload API issued an SVID for {ours.spiffe_id}, not {expected_id}",
            reason="spiffe_id_mismatch",
        )
    own_td = ours.spiffe_id.trust_domain
    result = BundleSet()
    for bundle in bundles.bundles:
        name = bundle.trust_domain.name
        try:
            td = TrustDomain.parse(name)
            authorities = tuple(sorted(bundle.x509_authorities, key=ca_fingerprint))
            if authorities:
                result = result.with_bundle(TrustBundle(td, authorities))
        except (ConfigError, ValueError) as e:
            detail = e.message if isinstance(e, MeshError) else str(e)
            raise CredentialError(
                f"the Workload API sent an unusable bundle for trust domain {name!r}: {detail}",
                reason="invalid_bundle",
            ) from e
    if result.get(own_td) is None:
        raise CredentialError(
            f"the Workload API sent no X.509 bundle for {ours.spiffe_id}'s own trust domain "
            f"'{own_td}'",
            reason="invalid_bundle",
        )
    for extra in federated:
        if extra.trust_domain == own_td:
            raise ConfigError(
                f"--federated-bundle names '{own_td}', this workload's own trust domain: "
                "its bundle comes only from the SPIFFE Workload API"
            )
        if result.get(extra.trust_domain) is None:  # the Workload API wins
            result = result.with_bundle(extra)
    return ours, result


class SnapshotWithoutBundles(Snapshot):
    """The registry snapshot as a sidecar in SPIFFE mode reads it: without bundles.

    `SidecarState.snapshot_applied` replaces the state's bundles with the snapshot's
    whenever the snapshot carries some; with this snapshot it never does, so the
    Workload API (plus configured files) stays the only bundle source (ADR 0007).
    """

    def bundles(self) -> dict[str, tuple[bytes, ...]]:
        return {}


# -- the source ----------------------------------------------------------------------------


def _why(e: BaseException) -> str:
    return e.message if isinstance(e, MeshError) else f"{type(e).__name__}: {e}"


class WorkloadApiSource:
    """A `CredentialSource` fed by the SPIFFE Workload API (ADR 0007)."""

    def __init__(
        self,
        socket: str,
        *,
        expected_id: SpiffeId | None = None,
        federated: BundleSet = _EMPTY,
        attempt_timeout: float = 5.0,
        first_backoff: float = 0.2,
        max_backoff: float = 5.0,
        poll_interval: float = 0.5,
    ) -> None:
        self.socket = endpoint_socket(socket)
        self._expected = expected_id
        self._federated = federated
        self._attempt_timeout = attempt_timeout
        self._first_backoff = first_backoff
        self._max_backoff = max_backoff
        self._poll = poll_interval
        self._source: X509Source | None = None
        self._svid: X509Svid | None = None
        self._bundles = BundleSet()
        self._subscribers: list[Callable[[X509Svid, BundleSet], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # -- CredentialSource ---------------------------------------------------------------

    @property
    def spiffe_id(self) -> SpiffeId:
        if self._svid is None:
            raise CredentialError("no SVID from the SPIFFE Workload API yet")
        return self._svid.spiffe_id

    @property
    def registry_id(self) -> SpiffeId:
        return registry_id_for(self.spiffe_id.trust_domain)

    def current(self) -> tuple[X509Svid, BundleSet]:
        if self._svid is None:
            raise CredentialError("no SVID from the SPIFFE Workload API yet")
        return self._svid, self._bundles

    def subscribe(self, callback: Callable[[X509Svid, BundleSet], None]) -> None:
        self._subscribers.append(callback)

    def sign(self, data: bytes) -> tuple[bytes, X509Svid]:
        svid, _ = self.current()
        return sign_with(svid, data), svid

    def set_bundles(self, bundles: BundleSet) -> None:
        """Ignored: in SPIFFE mode nothing but the Workload API and the configured
        files decides the bundles (the sidecar only hands back what it got from us)."""

    async def obtain(self) -> X509Svid:
        """The first SVID: waits, retrying with bounded backoff, until the Workload API
        answers. Raises `ConfigError` for an SVID that names the wrong ID."""
        self._loop = asyncio.get_running_loop()
        await self._connect(first=True)
        svid, _ = self.current()
        return svid

    async def renew_forever(self, channels: MeshChannels | None = None) -> None:
        """The sidecar's renewal task: here, following the Workload API (`follow`)."""
        await self.follow()

    async def follow(self) -> None:
        """Reconnect whenever py-spiffe gives up on its stream (it retries transient
        errors itself and closes the source only on a fatal one). Updates themselves
        arrive through py-spiffe's thread, not through this loop."""
        while not self._closed:
            await asyncio.sleep(self._poll)
            source = self._source
            if source is None or not source.is_closed() or self._closed:
                continue
            why = "closed"
            try:
                source.get_x509_context()
            except PySpiffeError as e:
                why = str(e)
            log.error(
                "the SPIFFE Workload API stream at %s failed (%s); reconnecting, keeping "
                "SVID serial %s meanwhile",
                self.socket,
                why,
                self._svid.serial_hex if self._svid else "-",
            )
            self._source = None
            await self._connect(first=False)

    def close(self) -> None:
        self._closed = True
        source, self._source = self._source, None
        if source is not None:
            with contextlib.suppress(Exception):
                source.close()

    # -- connecting ------------------------------------------------------------------------

    async def _connect(self, *, first: bool) -> None:
        backoff = self._first_backoff
        attempt = 0
        while not self._closed:
            attempt += 1
            try:
                source = await asyncio.to_thread(self._open)
                if self._closed:
                    source.close()
                    break
                try:
                    converted = self._convert(source)
                except BaseException:
                    source.close()
                    raise
            except ConfigError as e:
                if first and e.reason == "spiffe_id_mismatch":
                    raise ConfigError(
                        f"{e.message}: refusing to start; fix --spiffe-id or the SPIRE "
                        "registration entry",
                        reason=e.reason,
                    ) from e
                if first:
                    raise
                log.error("%s; keeping the current SVID", e.message)
            except CredentialError as e:
                if self._closed:
                    break
                delay = backoff * (0.5 + random.random())  # noqa: S311 (jitter)
                log.warning("%s; retrying in %.1fs (attempt %d)", e.message, delay, attempt)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            else:
                self._install(source, converted)
                return
            await asyncio.sleep(self._max_backoff)

    def _open(self) -> X509Source:
        """Runs on a worker thread: py-spiffe blocks until the first update."""
        path = _socket_path(self.socket)
        if not os.path.exists(path):
            raise CredentialError(
                f"cannot reach the SPIFFE Workload API at {self.socket}: no socket at {path} "
                "(is the SPIRE agent running, and is its socket mounted here?)",
                reason="workload_api_unavailable",
            )
        try:
            source = X509Source(
                socket_path=self.socket,
                timeout_in_seconds=self._attempt_timeout,
                svid_picker=self._pick,
            )
        except X509SourceError as e:
            if e.__cause__ is None:  # py-spiffe's timeout carries no cause
                detail = (
                    f"no X.509-SVID within {self._attempt_timeout:g}s (is the SPIRE agent up, "
                    "and is this workload registered?)"
                )
            else:
                detail = str(e.__cause__)
            raise CredentialError(
                f"cannot get an X.509-SVID from the SPIFFE Workload API at {self.socket}: {detail}",
                reason="workload_api_unavailable",
            ) from e
        except PySpiffeError as e:
            raise CredentialError(
                f"cannot reach the SPIFFE Workload API at {self.socket}: {e}",
                reason="workload_api_unavailable",
            ) from e
        if self._closed:  # closed (or the awaiting task cancelled) while we waited
            source.close()
            raise CredentialError("the SPIFFE Workload API source is closed")
        return source

    def _pick(self, svids: list[PySvid]) -> PySvid:
        """With several SVIDs (several matching SPIRE entries), take ours. Never raises:
        a raising picker closes py-spiffe's source."""
        want = self._svid.spiffe_id if self._svid is not None else self._expected
        if want is not None:
            for s in svids:
                if str(s.spiffe_id) == str(want):
                    return s
        return svids[0]

    def _convert(self, source: X509Source) -> tuple[X509Svid, BundleSet]:
        try:
            context = source.get_x509_context()
        except PySpiffeError as e:
            raise CredentialError(
                f"the SPIFFE Workload API at {self.socket} failed: {e}",
                reason="workload_api_unavailable",
            ) from e
        pinned = self._svid.spiffe_id if self._svid is not None else self._expected
        return credentials_from(
            context.default_svid,
            context.x509_bundle_set,
            federated=self._federated,
            expected_id=pinned,
        )

    def _install(self, source: X509Source, converted: tuple[X509Svid, BundleSet]) -> None:
        self._source = source
        source.subscribe_for_updates(lambda: self._updated(source))
        self._apply(source, converted)
        # An update may have landed between the first fetch and the subscription.
        with contextlib.suppress(MeshError):
            self._apply(source, self._convert(source))

    # -- updates ---------------------------------------------------------------------------

    def _updated(self, source: X509Source) -> None:
        """Runs on py-spiffe's watcher thread: convert, then hand over to the loop."""
        if self._closed or source is not self._source:
            return
        result: tuple[X509Svid, BundleSet] | MeshError
        try:
            result = self._convert(source)
        except MeshError as e:
            result = e
        except Exception as e:  # never let a bad update kill py-spiffe's thread
            result = CredentialError(f"cannot read a Workload API update: {_why(e)}")
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down
            loop.call_soon_threadsafe(self._apply, source, result)

    def _apply(self, source: X509Source, result: tuple[X509Svid, BundleSet] | MeshError) -> None:
        if self._closed or source is not self._source:
            return
        if isinstance(result, MeshError):
            log.error(
                "ignoring an update from the SPIFFE Workload API at %s: %s; keeping SVID serial %s",
                self.socket,
                result.message,
                self._svid.serial_hex if self._svid else "-",
            )
            return
        svid, bundles = result
        old = self._svid
        if (
            old is not None
            and old.chain_der() == svid.chain_der()
            and bundles.version == self._bundles.version
        ):
            return
        self._svid, self._bundles = svid, bundles
        log.info(
            "SVID from the SPIFFE Workload API: %s serial %s, expires %s; bundles for %s",
            svid.spiffe_id,
            svid.serial_hex,
            svid.not_after.isoformat(),
            ", ".join(td.name for td in bundles.trust_domains()),
        )
        if old is None:
            return  # the first SVID is returned by obtain(), not pushed
        for callback in list(self._subscribers):
            try:
                callback(svid, bundles)
            except Exception:
                log.exception("credential subscriber failed")
