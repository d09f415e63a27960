"""`trustmesh registry serve`: the registry process.

Two listeners, because grpcio can't make a client certificate optional on one port:
* `--listen`: mTLS, client certificate required. Everything but bootstrap.
* `--bootstrap-listen`: server TLS only. Join-token exchange and the bundle.
Both serve `grpc.health.v1`. The registry's own SVID is issued by its CA at start and
renewed at half its TTL; new handshakes pick it up.

SPIFFE mode (`--credentials spiffe`, ADR 0007): the registry's SVID and the bundles
come from the SPIFFE Workload API (SPIRE) instead. Then SPIRE is the only issuer of
workload SVIDs: the embedded CA renews operator credentials and nothing else, and a
chain to the embedded CA is accepted only for IDs under `/operators/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from trustmesh.ca import CertificateAuthority
from trustmesh.errors import AccessDeniedError, ConfigError, PeerAuthenticationError
from trustmesh.grpc_tls import ServerCredentials, server_options
from trustmesh.limits import DEFAULT_LIMITS, Limits
from trustmesh.peer_verify import PeerVerifier, Role
from trustmesh.spiffe_id import SpiffeId
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.v1 import registry_pb2_grpc as rgrpc
from trustmesh.v1 import resources_pb2 as pb
from trustmesh.x509svid import BundleSet, TrustBundle, X509Svid, generate_key, make_csr
from trustmesh_registry.attestation import JoinTokenAttestor
from trustmesh_registry.datadir import DataDir
from trustmesh_registry.service import (
    OPERATORS,
    BootstrapService,
    Issuer,
    RegistryService,
    add_registry_servicer,
)
from trustmesh_registry.state import RegistryState
from trustmesh_registry.store_sqlite import SqliteStore

__all__ = ["RegistryServer", "ServeConfig", "WorkloadCredentials"]

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ServeConfig:
    data_dir: Path
    listen: str = "127.0.0.1:8443"
    bootstrap_listen: str = "127.0.0.1:8444"
    svid_ttl: timedelta = timedelta(hours=1)
    operator_ttl: timedelta = timedelta(days=30)
    registry_svid_ttl: timedelta = timedelta(hours=24)
    # How long endpoints inherited from the last run are served without their
    # sidecar reconnecting (sidecars reconnect with backoff capped at 5 s).
    endpoint_grace: timedelta = timedelta(seconds=15)
    # Optional plaintext listener serving only grpc.health.v1 (`--health-listen`).
    health_listen: str = ""
    limits: Limits = DEFAULT_LIMITS
    # Bundles of other trust domains, published in snapshots (embedded-CA mode; in
    # SPIFFE mode the Workload API source merges them instead).
    federated_bundles: BundleSet = field(default_factory=BundleSet)


class WorkloadCredentials(Protocol):
    """The registry's SVID and bundles from the SPIFFE Workload API.

    Implemented by the sidecar package's `WorkloadApiSource`; the CLI (the composition
    root) injects it, so this package never imports the sidecar's.
    """

    async def obtain(self) -> X509Svid: ...

    def current(self) -> tuple[X509Svid, BundleSet]: ...

    def subscribe(self, callback: Callable[[X509Svid, BundleSet], None]) -> None: ...

    async def follow(self) -> None: ...

    def close(self) -> None: ...


class _OperatorsOnlyIssuer(Issuer):
    """SPIFFE mode: SPIRE issues every workload SVID; the embedded CA, operators only."""

    def issue(self, csr: bytes, spiffe_id: SpiffeId) -> rpb.SvidResponse:
        if not spiffe_id.is_under(OPERATORS):
            raise AccessDeniedError(
                f"this registry runs with --credentials spiffe: SPIRE issues workload SVIDs "
                f"and the embedded CA only operator credentials; not issuing {spiffe_id}",
                reason="issuance_disabled",
            )
        return super().issue(csr, spiffe_id)


class _WorkloadsAndOperators(PeerVerifier):
    """SPIFFE mode: a chain to the Workload API's bundles proves any ID; a chain to the
    embedded CA proves only an operator ID (the CLI's credentials keep working)."""

    def __init__(self, workloads: BundleSet, operators: TrustBundle) -> None:
        super().__init__(workloads)
        self._operators = PeerVerifier(BundleSet.of(operators))

    def verify(self, chain_der: Sequence[bytes], *, now: datetime, role: Role) -> SpiffeId:
        try:
            return super().verify(chain_der, now=now, role=role)
        except PeerAuthenticationError as first:
            try:
                spiffe_id = self._operators.verify(chain_der, now=now, role=role)
            except PeerAuthenticationError:
                raise first from None
            if not spiffe_id.is_under(OPERATORS):
                raise first from None
            return spiffe_id


class RegistryServer:
    svid: X509Svid
    _mtls_creds: ServerCredentials
    _boot_creds: ServerCredentials

    def __init__(
        self,
        config: ServeConfig,
        *,
        clock: Callable[[], datetime] = _now,
        workload_api: WorkloadCredentials | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.workload_api = workload_api
        self.data = DataDir(config.data_dir)
        self.ca: CertificateAuthority = self.data.load_ca()
        td = self.ca.trust_domain
        if config.federated_bundles.get(td) is not None:
            raise ConfigError(f"--federated-bundle names '{td}', the registry's own trust domain")
        self.registry_id = SpiffeId.parse(f"spiffe://{td}/trustmesh/registry")
        self.store = SqliteStore(self.data.database)
        self.issuer = (Issuer if workload_api is None else _OperatorsOnlyIssuer)(
            self.ca,
            self.registry_id,
            self.bundles,
            clock,
            svid_ttl=config.svid_ttl,
            operator_ttl=config.operator_ttl,
        )
        self.attestor = JoinTokenAttestor(self.store, is_reserved=self.issuer.is_reserved)
        self.state = RegistryState(self.store, self.bundles, reserved_ids=self.issuer.is_reserved)
        self.bundle_set = BundleSet().with_bundle(self.ca.bundle())
        self._verifier = PeerVerifier(self.bundle_set)
        if workload_api is None:
            self.svid = self._issue_own_svid()
            self._mtls_creds = ServerCredentials(self.svid, self.bundle_set)
            self._boot_creds = ServerCredentials(self.svid, self.bundle_set, verify_clients=False)
        self._servers: list[grpc.aio.Server] = []
        self._health: list[HealthServicer] = []
        self._renewer: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self.address = ""
        self.bootstrap_address = ""
        self.health_address = ""
        self._workload_bundles = ""  # the version of the Workload API's bundles in use

    def bundles(self) -> list[pb.TrustBundle]:
        """What the registry publishes (snapshots, `GetBundle`, SVID responses)."""
        if self.workload_api is not None:
            _, published = self.workload_api.current()
        else:
            published = self.config.federated_bundles.with_bundle(self.ca.bundle())
        return [
            pb.TrustBundle(trust_domain=b.trust_domain.name, x509_authorities=list(b.der()))
            for b in published
        ]

    async def _take_workload_svid(self, api: WorkloadCredentials) -> None:
        svid = await api.obtain()
        if svid.spiffe_id != self.registry_id:
            raise ConfigError(
                f"the SPIFFE Workload API issued {svid.spiffe_id} to the registry; register "
                f"the registry in SPIRE as {self.registry_id}, the ID sidecars and the CLI expect"
            )
        _, bundles = api.current()
        self._use_workload_svid(svid, bundles, first=True)
        api.subscribe(self._use_workload_svid)

    def _use_workload_svid(self, svid: X509Svid, bundles: BundleSet, first: bool = False) -> None:
        operators = self.ca.bundle()
        own = bundles.get(operators.trust_domain)
        assert own is not None  # the source refuses an update without our own bundle
        # TLS accepts both issuers; `_WorkloadsAndOperators` then tells them apart.
        tls_roots = bundles.with_bundle(
            TrustBundle(own.trust_domain, own.authorities + operators.authorities)
        )
        self.svid = svid
        self._verifier = _WorkloadsAndOperators(bundles, operators)
        if not first and bundles.version != self._workload_bundles:
            # Rotated or federated bundles reach the sidecars as a snapshot change.
            self.state.bundles_changed()
        self._workload_bundles = bundles.version
        if first:
            self._mtls_creds = ServerCredentials(svid, tls_roots)
            self._boot_creds = ServerCredentials(svid, tls_roots, verify_clients=False)
        else:
            self._mtls_creds.update(svid, tls_roots)
            self._boot_creds.update(svid, tls_roots)
            log.info("registry SVID from the Workload API: serial %s", svid.serial_hex)

    def _issue_own_svid(self) -> X509Svid:
        from cryptography.hazmat.primitives.serialization import Encoding

        key = generate_key()
        cert = self.ca.sign_csr(
            make_csr(key, self.registry_id),
            self.registry_id,
            now=self.clock(),
            ttl=self.config.registry_svid_ttl,
        )
        return X509Svid.from_der([cert.public_bytes(Encoding.DER)], key)

    async def start(self) -> None:
        limits = self.config.limits
        if self.workload_api is not None:
            await self._take_workload_svid(self.workload_api)
        # The watch stream carries full snapshots, which outgrow ordinary messages.
        mtls = grpc.aio.server(
            options=server_options(limits, age=True, send_bytes=limits.max_snapshot_bytes)
        )
        add_registry_servicer(
            RegistryService(
                self.state, self.issuer, self.attestor, lambda: self._verifier, limits=limits
            ),
            mtls,
        )
        boot = grpc.aio.server(options=server_options(limits, age=True))
        rgrpc.add_BootstrapServicer_to_server(BootstrapService(self.issuer, self.attestor), boot)
        servers = [mtls, boot]
        if self.config.health_listen:
            # Plaintext, health only: for probes that can't do TLS (the kubelet's).
            servers.append(grpc.aio.server(options=server_options(limits, age=False)))
        for server in servers:
            health = HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health, server)
            self._health.append(health)
        port = mtls.add_secure_port(self.config.listen, self._mtls_creds.credentials())
        bport = boot.add_secure_port(self.config.bootstrap_listen, self._boot_creds.credentials())
        if self.config.health_listen:
            hport = servers[2].add_insecure_port(self.config.health_listen)
            self.health_address = f"{self.config.health_listen.rpartition(':')[0]}:{hport}"
        for server in servers:
            await server.start()
        self._servers = servers
        self.address = f"{self.config.listen.rpartition(':')[0]}:{port}"
        self.bootstrap_address = f"{self.config.bootstrap_listen.rpartition(':')[0]}:{bport}"
        for health in self._health:
            await health.set("", health_pb2.HealthCheckResponse.SERVING)
            await health.set("trustmesh.v1.Registry", health_pb2.HealthCheckResponse.SERVING)
        loop = asyncio.get_running_loop()
        self._renewer = loop.create_task(
            self._renew_loop() if self.workload_api is None else self.workload_api.follow()
        )
        self._expiry = loop.call_later(
            self.config.endpoint_grace.total_seconds(), self.state.expire_stale_endpoints
        )
        log.info(
            "registry %s serving on %s (mTLS) and %s (bootstrap)",
            self.registry_id,
            self.address,
            self.bootstrap_address,
        )

    async def _renew_loop(self) -> None:
        while True:
            wait = max(1.0, (self.svid.not_after - self.clock()).total_seconds() / 2)
            await asyncio.sleep(wait)
            self.svid = self._issue_own_svid()
            self._mtls_creds.update(self.svid, self.bundle_set)
            self._boot_creds.update(self.svid, self.bundle_set)
            log.info("registry SVID renewed, serial %s", self.svid.serial_hex)

    async def stop(self, grace: float = 1.0) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        if self._expiry is not None:
            self._expiry.cancel()
        self.state.closing = True
        for health in self._health:
            with contextlib.suppress(Exception):
                await health.enter_graceful_shutdown()
        await asyncio.gather(*(s.stop(grace) for s in self._servers), return_exceptions=True)
        if self.workload_api is not None:
            self.workload_api.close()
        self.store.close()

    async def wait(self) -> None:
        await asyncio.gather(*(s.wait_for_termination() for s in self._servers))
