"""A running sidecar: credentials, snapshot watch, engine, routers and admin API.

Health (`grpc.health.v1` on the admin listener) reports SERVING only once the
sidecar holds an SVID and a snapshot.

Credentials come from the embedded CA (`RegistryCredentials`, the default) or, with
`spiffe_endpoint_socket`, from the SPIFFE Workload API (`WorkloadApiSource`,
ADR 0007); the sidecar's identity is then its SVID's ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from trustmesh.channels import MeshChannels
from trustmesh.errors import ConfigError
from trustmesh.limits import DEFAULT_LIMITS, Limits
from trustmesh.peer_verify import PeerVerifier
from trustmesh.spiffe_id import SpiffeId
from trustmesh.user_token import IssuerConfig, UserTokenVerifier
from trustmesh.v1 import sidecar_pb2 as spb
from trustmesh.v1 import sidecar_pb2_grpc as sgrpc
from trustmesh.x509svid import BundleSet, X509Svid
from trustmesh_sidecar import engine_select
from trustmesh_sidecar.audit import DEFAULT_FLUSH_INTERVAL
from trustmesh_sidecar.credentials import CredentialSource, RegistryCredentials
from trustmesh_sidecar.engine import Upstream
from trustmesh_sidecar.grpc_engine import GrpcEngine
from trustmesh_sidecar.routing import InboundRouter, OutboundRouter
from trustmesh_sidecar.spiffe_source import SnapshotWithoutBundles, WorkloadApiSource
from trustmesh_sidecar.state import SidecarState, system_clock
from trustmesh_sidecar.watch import watch_forever

if TYPE_CHECKING:
    from trustmesh_sidecar.h2.engine import H2Engine

__all__ = ["Sidecar", "SidecarConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SidecarConfig:
    # Required with the embedded CA; in SPIFFE mode optional, and if given it must be
    # the ID of the SVID the Workload API issues.
    spiffe_id: SpiffeId | None
    registry: str
    app: str
    data_dir: Path
    registry_bootstrap: str = ""
    join_token: str | None = None
    trust_bundle: Path | None = None
    ca_fingerprint: str | None = None
    outbound: str = "127.0.0.1:15001"
    inbound: str = "0.0.0.0:15443"
    admin: str = "127.0.0.1:15000"
    advertise: str = ""  # the inbound address peers should dial; default: --inbound
    # Issuers of user access tokens this sidecar verifies (`--oidc-issuers`).
    user_token_issuers: tuple[IssuerConfig, ...] = ()
    # The forwarding engine: "h2" (HTTP/2 frames on Python ssl, ADR 0009; the default)
    # or "grpc" (grpc.aio + the TLS bridge, ADR 0006).
    engine: str = engine_select.DEFAULT_ENGINE
    limits: Limits = DEFAULT_LIMITS
    # SPIFFE mode (ADR 0007): the Workload API address (unix:///...), and bundles of
    # other trust domains for those the Workload API does not deliver.
    spiffe_endpoint_socket: str | None = None
    federated_bundles: BundleSet = field(default_factory=BundleSet)
    # How long an allowed call's audit line may wait to be written with others (ADR
    # 0013); denials are written at once. 0: every line once its callback is done.
    audit_flush_interval: float = DEFAULT_FLUSH_INTERVAL

    def bootstrap_address(self) -> str:
        if self.registry_bootstrap:
            return self.registry_bootstrap
        host, _, port = self.registry.rpartition(":")
        return f"{host}:{int(port) + 1}"


class _Admin(sgrpc.SidecarAdminServicer):  # type: ignore[misc]
    def __init__(self, sidecar: Sidecar) -> None:
        self._sidecar = sidecar

    async def Status(
        self, request: spb.StatusRequest, context: grpc.aio.ServicerContext
    ) -> spb.StatusResponse:
        s = self._sidecar
        st = s.state
        assert st is not None
        return spb.StatusResponse(
            spiffe_id=str(st.spiffe_id),
            svid_serial=st.svid.serial_hex,
            svid_expires_at=int(st.svid.not_after.timestamp()),
            snapshot_epoch=st.snapshot.epoch,
            snapshot_revision=st.snapshot.revision,
            registry_connected=st.registry_connected,
            inbound_address=s.inbound_address,
            outbound_address=s.outbound_address,
            calls_allowed=st.counters.allowed,
            calls_denied=st.counters.denied,
        )


class Sidecar:
    def __init__(
        self,
        config: SidecarConfig,
        *,
        tracer_provider: TracerProvider | None = None,
        clock: Callable[[], datetime] = system_clock,
    ) -> None:
        self.config = config
        self.clock = clock
        provider = tracer_provider or trace.get_tracer_provider()
        self.tracer = provider.get_tracer("trustmesh.sidecar")
        self.credentials = _credential_source(config, clock)
        self.state: SidecarState | None = None
        self.engine: GrpcEngine | H2Engine | None = None
        self.inbound: InboundRouter | None = None
        self.outbound: OutboundRouter | None = None
        self.inbound_address = ""
        self.outbound_address = ""
        self.admin_address = ""
        self._channels: MeshChannels | None = None
        self._admin: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        cfg = self.config
        # Admin first, NOT_SERVING until ready, so probes can reach it during bootstrap.
        admin = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, admin)
        sgrpc.add_SidecarAdminServicer_to_server(_Admin(self), admin)
        admin_port = admin.add_insecure_port(cfg.admin)
        await admin.start()
        self._admin = admin
        self.admin_address = f"{cfg.admin.rpartition(':')[0]}:{admin_port}"
        await self._set_health(False)

        svid = await self.credentials.obtain()
        _, bundles = self.credentials.current()
        state = SidecarState(svid.spiffe_id, svid, bundles, clock=self.clock)
        if isinstance(self.credentials, WorkloadApiSource):
            state.snapshot = SnapshotWithoutBundles()  # the Workload API decides bundles
        if cfg.user_token_issuers:
            state.user_tokens = UserTokenVerifier(cfg.user_token_issuers, limits=cfg.limits)
        self.state = state
        engine: GrpcEngine | H2Engine
        if cfg.engine == "grpc":
            engine = GrpcEngine(
                svid, bundles, limits=cfg.limits, bridge_dir=cfg.data_dir / "bridge"
            )
        else:
            engine = engine_select.build(
                cfg.engine, svid, bundles, limits=cfg.limits, bridge_dir=cfg.data_dir / "bridge"
            )
        self.engine = engine
        self._channels = MeshChannels(
            lambda: (state.svid, state.bundles),
            limits=cfg.limits,
            directory=cfg.data_dir / "bridge-registry",
            receive_bytes=cfg.limits.max_snapshot_bytes,  # a full snapshot can be large
        )
        flush = cfg.audit_flush_interval
        self.inbound = InboundRouter(
            state, cfg.app, self.tracer, limits=cfg.limits, audit_flush_interval=flush
        )
        outbound = self.outbound = OutboundRouter(
            state, self.tracer, engine.explain, limits=cfg.limits, audit_flush_interval=flush
        )
        self.inbound_address, self.outbound_address = await engine.start(
            inbound_address=cfg.inbound,
            outbound_address=cfg.outbound,
            inbound_router=self.inbound,
            outbound_router=outbound,
        )
        self.credentials.subscribe(self._source_updated)
        state.on_credentials(self._credentials_changed)
        state.on_snapshot(self._refresh_health)
        advertise = cfg.advertise or self.inbound_address
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(
                watch_forever(
                    state,
                    self._channels,
                    registry=cfg.registry,
                    registry_id=self.credentials.registry_id,
                    instance_id=uuid.uuid4().hex[:16],
                    advertise=advertise,
                )
            ),
            loop.create_task(self.credentials.renew_forever(self._channels)),
            loop.create_task(self._health_ticker()),
        ]
        log.info(
            "sidecar %s: outbound %s, inbound %s, admin %s",
            state.spiffe_id,
            self.outbound_address,
            self.inbound_address,
            self.admin_address,
        )

    def _source_updated(self, svid: X509Svid, bundles: BundleSet) -> None:
        state = self.state
        if state is None:
            return
        if isinstance(self.credentials, WorkloadApiSource) and (
            bundles.version != state.bundles.version
        ):
            # The credential source is the state's other writer (state.py); in CA mode
            # bundles come with the snapshot instead.
            state.bundles = bundles
            state.verifier = PeerVerifier(bundles)
        state.set_svid(svid)

    def _credentials_changed(self, svid: X509Svid, bundles: BundleSet) -> None:
        if self.engine is not None:
            self.engine.update_credentials(svid, bundles)
        self.credentials.set_bundles(bundles)
        if self._channels is not None:
            asyncio.get_running_loop().create_task(self._channels.rotate())
        self._refresh_health()

    async def _health_ticker(self, period: float = 2.0) -> None:
        """Re-judge health on a timer too: an SVID can expire with nothing else happening."""
        while True:
            await asyncio.sleep(period)
            self._refresh_health()

    def _refresh_health(self) -> None:
        ready = self.state is not None and self.state.ready
        asyncio.get_running_loop().create_task(self._set_health(ready))

    async def _set_health(self, ready: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._health.set("", status)
        await self._health.set("trustmesh.v1.Sidecar", status)

    async def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not (self.state is not None and self.state.ready):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"sidecar {self.config.spiffe_id} not ready after {timeout}s")
            await asyncio.sleep(0.02)

    def peer_serials(self, address: str, expected: SpiffeId) -> list[str]:
        return self.engine.peer_serials(Upstream(address, expected)) if self.engine else []

    async def stop(self, grace: float = 1.0) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.engine is not None:
            await self.engine.stop(grace)
        for router in (self.inbound, self.outbound):
            if router is not None:
                router.flush_audit()  # the lines still waiting for their batch
        if self._channels is not None:
            await self._channels.close()
        if self._admin is not None:
            await self._admin.stop(grace)
        if isinstance(self.credentials, WorkloadApiSource):
            self.credentials.close()


def _credential_source(config: SidecarConfig, clock: Callable[[], datetime]) -> CredentialSource:
    if config.spiffe_endpoint_socket:
        return WorkloadApiSource(
            config.spiffe_endpoint_socket,
            expected_id=config.spiffe_id,
            federated=config.federated_bundles,
        )
    if config.spiffe_id is None:
        raise ConfigError("the sidecar needs --spiffe-id unless it runs with --credentials spiffe")
    if len(config.federated_bundles):
        raise ConfigError(
            "--federated-bundle on the sidecar needs --credentials spiffe; with the embedded "
            "CA, give it to `trustmesh registry serve`, which publishes it in the snapshot"
        )
    return RegistryCredentials(
        config.spiffe_id,
        registry=config.registry,
        bootstrap=config.bootstrap_address(),
        data_dir=config.data_dir,
        clock=clock,
        join_token=config.join_token,
        bundle_file=config.trust_bundle,
        ca_fingerprint=config.ca_fingerprint,
    )
