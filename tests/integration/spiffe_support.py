"""SPIRE for the integration tests: a SPIRE-shaped CA, a mesh on SPIRE credentials.

`Spire` is the server side (root, signing intermediate, short-lived leaves); each party's
Workload API is `workload_api.WorkloadApi`. `SpiffeMesh` is `harness.Mesh` with the
registry on `--credentials spiffe` and sidecars that read their own Workload API socket.
Used by test_spiffe_source.py and test_spiffe_federation.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from workload_api import WorkloadApi

from trustmesh.client_config import ClientConfig
from trustmesh.limits import DEFAULT_LIMITS, Limits
from trustmesh.operator_client import OperatorClient
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.x509svid import BundleSet, TrustBundle, X509Svid
from trustmesh_registry.datadir import DataDir
from trustmesh_registry.server import RegistryServer, ServeConfig
from trustmesh_sidecar.credentials import registry_id_for
from trustmesh_sidecar.engine import CallControl, CallStart, Forward, Reject
from trustmesh_sidecar.runtime import Sidecar, SidecarConfig
from trustmesh_sidecar.spiffe_source import WorkloadApiSource

from harness import ECHO, TD, EchoApp, Mesh, Node, agent, agent_id, unary

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from certs import issue, make_ca, make_intermediate

UNARY = f"/{ECHO}/Unary"
OTHER = TrustDomain.parse("other.example")
TOOL = SpiffeId.parse("spiffe://other.example/agents/tool")
SCOUT = SpiffeId.parse("spiffe://other.example/agents/scout")
WAIT = 10.0


# -- SPIRE, the server side -------------------------------------------------------------------


class Spire:
    """A SPIRE server's CA shape: a root (what the bundle holds) and an intermediate
    that signs short-lived leaf SVIDs, which carry the intermediate in their chain."""

    def __init__(self, td: str | TrustDomain = TD, *, name: str = "spire") -> None:
        now = datetime.now(UTC)
        self.td = td if isinstance(td, TrustDomain) else TrustDomain.parse(td)
        self.root = make_ca(self.td, now=now, ttl=timedelta(days=1), path_length=1)
        self.intermediate = make_intermediate(self.root, now=now, ttl=timedelta(hours=6), name=name)

    @property
    def bundle(self) -> list[x509.Certificate]:
        return [self.root.cert]

    def svid(self, spiffe_id: SpiffeId, *, ttl: timedelta = timedelta(minutes=5)) -> X509Svid:
        ca = self.intermediate
        return issue(ca, spiffe_id, now=datetime.now(UTC), ttl=ttl, intermediates=(ca.cert,))

    def rotate_intermediate(self) -> None:
        """SPIRE's CA rotation: a new signing intermediate under the same root."""
        self.intermediate = make_intermediate(
            self.root, now=datetime.now(UTC), ttl=timedelta(hours=6), name="rotated"
        )


Federated = Mapping[TrustDomain, Sequence[x509.Certificate]]


class SpiffeMesh(Mesh):
    """`harness.Mesh` with every party on SPIRE credentials: the registry runs with
    `--credentials spiffe`, each sidecar with its own Workload API socket."""

    def __init__(self, root: Path, spire: Spire, *, limits: Limits = DEFAULT_LIMITS) -> None:
        super().__init__(root, limits=limits)
        self.spire = spire
        self.sockets = Path(tempfile.mkdtemp(prefix="wl-"))  # unix paths must stay short
        self.apis: dict[str, WorkloadApi] = {}

    async def workload_api(
        self,
        name: str,
        svid: X509Svid,
        *,
        bundle: Sequence[x509.Certificate] | None = None,
        federated: Federated | None = None,
        start: bool = True,
    ) -> WorkloadApi:
        api = WorkloadApi(self.sockets / f"{name}.sock")
        api.push(svid, self.spire.bundle if bundle is None else bundle, federated)
        self.apis[name] = api
        return await api.start() if start else api

    async def start(self) -> SpiffeMesh:
        td = TrustDomain.parse(TD)
        data = self.root / "registry"
        DataDir(data).init(td, now=datetime.now(UTC), registry_address="127.0.0.1:0")
        api = await self.workload_api("registry", self.spire.svid(registry_id_for(td)))
        self.registry = RegistryServer(
            ServeConfig(data, listen="127.0.0.1:0", bootstrap_listen="127.0.0.1:0"),
            workload_api=WorkloadApiSource(api.address),
        )
        await self.registry.start()
        # The operator keeps its embedded-CA credential; the registry's SVID is SPIRE's,
        # so the CLI's bundle must hold the SPIRE root (docs/spire.md).
        cfg = ClientConfig.load(data / "config.yaml")
        self.operator = OperatorClient(
            X509Svid.from_pem(cfg.certificate.read_bytes(), cfg.key.read_bytes()),
            self.spire_bundles(),
            self.registry.address,
            self.registry.registry_id,
        )
        return self

    def spire_bundles(self) -> BundleSet:
        return BundleSet.of(TrustBundle(self.spire.td, tuple(self.spire.bundle)))

    async def add_spiffe(
        self,
        name: str,
        *,
        svid: X509Svid | None = None,
        bundle: Sequence[x509.Certificate] | None = None,
        federated: Federated | None = None,
        federated_files: BundleSet | None = None,
        spiffe_id: SpiffeId | bool | None = True,
        start_api: bool = True,
        wait: bool = True,
    ) -> Node:
        """A sidecar in SPIFFE mode. `spiffe_id=True` passes the agent's ID as the
        flag, None leaves it to the SVID, a SpiffeId passes that ID."""
        assert self.registry is not None
        api = await self.workload_api(
            name,
            svid or self.spire.svid(agent_id(name)),
            bundle=bundle,
            federated=federated,
            start=start_api,
        )
        app = EchoApp()
        await app.start()
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        config = SidecarConfig(
            spiffe_id=agent_id(name) if spiffe_id is True else spiffe_id or None,
            registry=self.registry.address,
            app=app.address,
            outbound="127.0.0.1:0",
            inbound="127.0.0.1:0",
            admin="127.0.0.1:0",
            data_dir=self.root / "sidecars" / name,
            limits=self.limits,
            spiffe_endpoint_socket=api.address,
            federated_bundles=federated_files or BundleSet(),
        )
        sidecar = Sidecar(config, tracer_provider=provider)
        node = Node(name, sidecar, app, exporter)
        self.nodes[name] = node  # before start(): stop() cleans up a failed start too
        await sidecar.start()
        if wait:
            await sidecar.wait_ready()
        return node

    async def stop(self) -> None:
        await super().stop()
        for api in self.apis.values():
            await api.stop()
        shutil.rmtree(self.sockets, ignore_errors=True)


@contextlib.asynccontextmanager
async def spiffe_mesh(
    tmp_path: Path, spire: Spire | None = None, *, limits: Limits = DEFAULT_LIMITS
) -> AsyncIterator[SpiffeMesh]:
    mesh = SpiffeMesh(tmp_path, spire or Spire(), limits=limits)
    try:
        await mesh.start()
        yield mesh
    finally:
        await mesh.stop()


# -- helpers ------------------------------------------------------------------------------------


async def outcome(outbound: str, target: str, **kw: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await unary(outbound, target, **kw)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def spy_chains(router: Any) -> list[tuple[bytes, ...]]:
    """The client chains (DER, leaf first) that a sidecar's TLS layer handed its router."""
    seen: list[tuple[bytes, ...]] = []
    route: Callable[[CallStart, CallControl], Forward | Reject] = router.route

    def recording(call: CallStart, control: CallControl) -> Forward | Reject:
        seen.append(tuple(call.peer_chain))
        return route(call, control)

    router.route = recording
    return seen


def serial(der_cert: bytes) -> str:
    return format(x509.load_der_x509_certificate(der_cert).serial_number, "x")


async def until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def health(sidecar: Sidecar) -> int:
    async with grpc.aio.insecure_channel(sidecar.admin_address) as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=2
        )
        return int(resp.status)


def selector_policy(
    name: str, callers: list[dict[str, str]], callees: list[dict[str, str]]
) -> dict[str, Any]:
    return {
        "apiVersion": "trustmesh.dev/v1alpha1",
        "kind": "AccessPolicy",
        "metadata": {"name": name},
        "spec": {"callers": callers, "callees": callees, "methods": [f"/{ECHO}/*"]},
    }


def foreign_agent(name: str, spiffe_id: SpiffeId) -> dict[str, Any]:
    doc = agent(name)
    doc["spec"]["spiffeId"] = str(spiffe_id)
    return doc
