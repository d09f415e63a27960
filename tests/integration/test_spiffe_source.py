"""Sidecars and the registry on SPIRE-issued credentials (ADR 0007, docs/spire.md).

A real Workload API (`workload_api.py`, the stubs py-spiffe ships) serves each
workload on its own unix socket; py-spiffe's `X509Source` in the sidecar and in the
registry reads it. The SVIDs are SPIRE-shaped: a root CA in the bundle, an
intermediate that signs short-lived leaves with a URI SAN only and both EKUs, and
chains of leaf + intermediate. The registry runs with `--credentials spiffe` against
the same SPIRE, so every party trusts the same root; the operator keeps its
embedded-CA credential and trusts the SPIRE root to reach the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from spiffe._proto import workload_pb2, workload_pb2_grpc
from workload_api import HEADER, WorkloadApi

from trustmesh.ca import CertificateAuthority
from trustmesh.channels import MeshChannels
from trustmesh.client_config import ClientConfig
from trustmesh.errors import ConfigError
from trustmesh.limits import DEFAULT_LIMITS, Limits
from trustmesh.operator_client import OperatorClient
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.v1 import registry_pb2_grpc as rgrpc
from trustmesh.v1 import resources_pb2 as pb
from trustmesh.x509svid import (
    BundleSet,
    TrustBundle,
    X509Svid,
    generate_key,
    make_csr,
    spiffe_id_of,
)
from trustmesh_registry.datadir import DataDir
from trustmesh_registry.server import RegistryServer, ServeConfig
from trustmesh_sidecar.credentials import registry_id_for
from trustmesh_sidecar.engine import CallControl, CallStart, Forward, Reject
from trustmesh_sidecar.runtime import Sidecar, SidecarConfig
from trustmesh_sidecar.spiffe_source import WorkloadApiSource

from harness import ECHO, TD, EchoApp, Mesh, Node, agent, agent_id, blueprint, policy, unary

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


# -- the Workload API itself ---------------------------------------------------------------------


async def test_workload_api_requires_the_security_header(tmp_path: Path) -> None:
    """The test server refuses what SPIRE refuses, so py-spiffe is known to send it."""
    spire = Spire()
    sockets = Path(tempfile.mkdtemp(prefix="wl-"))
    api = WorkloadApi(sockets / "a.sock")
    api.push(spire.svid(agent_id("alice")), spire.bundle)
    await api.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{api.path}") as channel:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=WAIT):
                    break
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == "security header missing from request"
            call = stub.FetchX509SVID(
                workload_pb2.X509SVIDRequest(), metadata=(HEADER,), timeout=WAIT
            )
            first = await call.read()
            call.cancel()
            assert first.svids[0].spiffe_id == str(agent_id("alice"))
        assert api.refused == 1
    finally:
        await api.stop()
        shutil.rmtree(sockets, ignore_errors=True)


# -- 1: first fetch -----------------------------------------------------------------------------


async def test_first_fetch_serves_calls_over_spire_shaped_chains(tmp_path: Path) -> None:
    async with spiffe_mesh(tmp_path) as mesh:
        await mesh.apply(
            blueprint("any"),
            agent("alice"),
            agent("bob"),
            policy("alice-calls-bob", ["alice"], ["bob"], [f"/{ECHO}/*"]),
        )
        alice = await mesh.add_spiffe("alice")
        bob = await mesh.add_spiffe("bob", spiffe_id=None)  # identity from the SVID alone
        ghost = await mesh.add_spiffe("ghost")  # SPIRE issued it; no Agent record
        assert alice.sidecar.state and bob.sidecar.state
        assert bob.sidecar.state.spiffe_id == agent_id("bob")
        chains = spy_chains(bob.sidecar.inbound)
        await mesh.wait_endpoints("alice", "bob")

        reply, _ = await unary(alice.outbound, "bob", body=b"hi")
        assert reply == b"hi"
        assert bob.app.received[-1]["trustmesh-caller"] == str(agent_id("alice"))

        # The caller checked bob's exact ID on a leaf + intermediate chain...
        bob_svid = bob.sidecar.state.svid
        assert len(bob_svid.cert_chain) == 2
        assert alice.sidecar.peer_serials(bob.sidecar.inbound_address, agent_id("bob")) == [
            bob_svid.serial_hex
        ]
        # ...and bob's router got alice's leaf and SPIRE's intermediate from grpc.
        assert chains[-1] == alice.sidecar.state.svid.chain_der()

        # Issuance is not legitimacy: the registry still decides who is an agent.
        code, details = await outcome(ghost.outbound, "bob")
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert details.startswith("trustmesh: agent_not_registered: ")

        assert await health(bob.sidecar) == health_pb2.HealthCheckResponse.SERVING
        assert all(api.refused == 0 for api in mesh.apis.values())


async def test_spiffe_id_flag_that_differs_from_the_svid_refuses_to_start(
    tmp_path: Path,
) -> None:
    async with spiffe_mesh(tmp_path) as mesh:
        with pytest.raises(ConfigError) as err:
            await mesh.add_spiffe("alice", spiffe_id=agent_id("mallory"))
        assert err.value.message == (
            "the SPIFFE Workload API issued an SVID for spiffe://test.local/agents/alice, not "
            "spiffe://test.local/agents/mallory: refusing to start; fix --spiffe-id or the "
            "SPIRE registration entry"
        )


# -- 2: rotation pushed while calls run ---------------------------------------------------------


async def test_pushed_rotation_drops_no_calls(tmp_path: Path) -> None:
    # Connections age out every second, so every rotation reaches new handshakes; the
    # grace outlasts the test, so the open stream may only end if rotation breaks it.
    limits = Limits(max_connection_age_s=1.0, max_connection_age_grace_s=60.0)
    spire = Spire()
    async with spiffe_mesh(tmp_path, spire, limits=limits) as mesh:
        await mesh.apply(
            blueprint("any"),
            agent("alice"),
            agent("bob"),
            policy("alice-calls-bob", ["alice"], ["bob"], [f"/{ECHO}/*"]),
        )
        alice = await mesh.add_spiffe("alice")
        bob = await mesh.add_spiffe("bob")
        await mesh.wait_endpoints("alice", "bob")
        assert alice.sidecar.state and bob.sidecar.state
        first_alice = alice.sidecar.state.svid.serial_hex
        chains = spy_chains(bob.sidecar.inbound)

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        failures: list[tuple[grpc.StatusCode, str]] = []
        called: list[float] = []
        streamed: list[float] = []

        async def caller() -> None:
            while not stop.is_set():
                code, details = await outcome(alice.outbound, "bob", body=b"r", timeout=2.0)
                called.append(loop.time())
                if code is not grpc.StatusCode.OK:
                    failures.append((code, details))
                await asyncio.sleep(0.03)

        async def stream() -> None:
            """One server stream opened before the first rotation, read throughout."""
            async with grpc.aio.insecure_channel(alice.outbound) as channel:
                call = channel.unary_stream(f"/{ECHO}/Hold")(
                    b"", metadata=(("trustmesh-target", "bob"),), timeout=20
                )
                async for _ in call:
                    streamed.append(loop.time())
                    if stop.is_set():
                        call.cancel()
                        return

        tasks = [asyncio.ensure_future(caller()), asyncio.ensure_future(stream())]
        pushed: dict[str, list[X509Svid]] = {"alice": [], "bob": []}
        first_push = loop.time() + 0.4
        try:
            for round_ in range(4):
                if round_ == 2:
                    spire.rotate_intermediate()
                for name in ("alice", "bob"):  # SPIRE rotates workloads independently
                    await asyncio.sleep(0.4)
                    svid = spire.svid(agent_id(name))
                    pushed[name].append(svid)
                    mesh.apis[name].push(svid, spire.bundle)
            last_push = loop.time()
            await until(
                lambda: bob.sidecar.state is not None
                and bob.sidecar.state.svid.serial_hex == pushed["bob"][-1].serial_hex,
                "bob's last SVID",
            )
            await asyncio.sleep(1.5)  # past the connection age: new handshakes everywhere
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), WAIT)

        assert failures == [], failures[:3]
        assert called[0] < first_push and called[-1] > last_push and len(called) > 10
        assert streamed and streamed[-1] > last_push  # the open stream outlived rotation
        assert alice.sidecar.state.svid.serial_hex == pushed["alice"][-1].serial_hex
        assert bob.sidecar.state.svid.serial_hex == pushed["bob"][-1].serial_hex
        # the last SVIDs hang below the rotated intermediate
        assert bob.sidecar.state.svid.cert_chain[1] == spire.intermediate.cert
        bob_serials = alice.sidecar.peer_serials(bob.sidecar.inbound_address, agent_id("bob"))
        assert len(bob_serials) > 1 and bob_serials[-1] == pushed["bob"][-1].serial_hex
        alice_serials = {serial(c[0]) for c in chains if c}
        assert {first_alice, pushed["alice"][-1].serial_hex} <= alice_serials


# -- 3: a bundle update removes a CA --------------------------------------------------------------


async def test_bundle_update_that_removes_a_ca_rejects_its_peers(tmp_path: Path) -> None:
    limits = Limits(max_connection_age_s=1.0, max_connection_age_grace_s=1.0)
    old, new = Spire(name="old"), Spire(name="new")
    both = [old.root.cert, new.root.cert]
    async with spiffe_mesh(tmp_path, new, limits=limits) as mesh:
        await mesh.apply(
            blueprint("any"),
            agent("alice"),
            agent("bob"),
            agent("carol"),
            policy("to-bob", ["alice", "carol"], ["bob"], [f"/{ECHO}/*"]),
            policy("bob-to-alice", ["bob"], ["alice"], [f"/{ECHO}/*"]),
        )
        # SPIRE in mid root rotation: every bundle holds both roots, the registry's too.
        mesh.apis["registry"].push(new.svid(registry_id_for(new.td)), both)
        assert mesh.registry is not None
        registry = mesh.registry
        await until(
            lambda: len(registry.bundles()[0].x509_authorities) == 2, "the registry's bundle"
        )
        alice = await mesh.add_spiffe("alice", svid=old.svid(agent_id("alice")), bundle=both)
        bob = await mesh.add_spiffe("bob", bundle=both)
        carol = await mesh.add_spiffe("carol", bundle=both)
        await mesh.wait_endpoints("alice", "bob", "carol")
        for caller, target in (("alice", "bob"), ("bob", "alice"), ("carol", "bob")):
            assert await outcome(mesh.nodes[caller].outbound, target) == (grpc.StatusCode.OK, "")

        assert bob.sidecar.state is not None
        mesh.apis["bob"].push(bob.sidecar.state.svid, new.bundle)  # the old root is gone
        await until(
            lambda: bob.sidecar.state is not None
            and bob.sidecar.state.bundles.get(new.td) == TrustBundle(new.td, (new.root.cert,)),
            "bob's new bundle",
        )
        # Calls on connections opened before the update: bob re-verifies every call.
        code, details = await outcome(alice.outbound, "bob")
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert details.startswith(
            "trustmesh: peer_unauthenticated: certificate for spiffe://test.local/agents/alice "
            "does not chain to the trust bundle of test.local"
        )
        await asyncio.sleep(2.5)  # connection age + grace: every connection is new now
        code, details = await outcome(alice.outbound, "bob")
        assert code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE), details
        code, details = await outcome(bob.outbound, "alice")
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert details.startswith("trustmesh: peer_unauthenticated: TLS handshake with ")
        assert await outcome(carol.outbound, "bob") == (grpc.StatusCode.OK, "")

        # The registry still publishes the old root; a snapshot update must not bring it
        # back (the Workload API alone decides bundles in SPIFFE mode).
        await mesh.apply(blueprint("another"))
        await until(
            lambda: bob.sidecar.state is not None
            and bob.sidecar.state.snapshot.blueprint("another") is not None,
            "the snapshot delta",
        )
        assert bob.sidecar.state.bundles.get(new.td) == TrustBundle(new.td, (new.root.cert,))
        code, _ = await outcome(alice.outbound, "bob")
        assert code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE)


# -- 4: federation --------------------------------------------------------------------------------


class ForeignServer:
    """A workload of other.example that is not TrustMesh (say, a go-spiffe service):
    mTLS with its SPIRE-shaped SVID, trusting test.local's bundle for its clients."""

    def __init__(self, svid: X509Svid, trusted: Sequence[x509.Certificate]) -> None:
        self.svid = svid
        self.trusted = trusted
        self.callers: list[SpiffeId] = []
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def _unary(self, req: bytes, context: grpc.aio.ServicerContext) -> bytes:
        pem = context.auth_context()["x509_pem_cert"][0]
        self.callers.append(spiffe_id_of(x509.load_pem_x509_certificate(pem)))
        return b"tool:" + req

    async def start(self) -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    ECHO, {"Unary": grpc.unary_unary_rpc_method_handler(self._unary)}
                )
            ]
        )
        roots = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.trusted)
        creds = grpc.ssl_server_credentials(
            [(self.svid.key_pem(), self.svid.chain_pem())],
            root_certificates=roots,
            require_client_auth=True,
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        self.server, self.address = server, f"127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)


async def scout_calls(mesh: SpiffeMesh, node: Node, scout: X509Svid) -> tuple[bytes, str]:
    """other.example's scout dials `node`'s inbound port through TrustMesh's own TLS
    bridge, which checks the callee's exact ID against test.local's bundle."""
    trusted = mesh.spire_bundles()
    channels = MeshChannels(lambda: (scout, trusted))
    try:
        channel = await channels.get(node.sidecar.inbound_address, agent_id(node.name))
        try:
            reply: bytes = await channel.unary_unary(UNARY)(b"hello", timeout=WAIT)
        except grpc.aio.AioRpcError as e:
            return b"", e.code().name
        return reply, "OK"
    finally:
        await channels.close()


@pytest.mark.parametrize("source", ["workload-api", "file"])
async def test_federated_peers_are_verified_with_their_own_bundle(
    tmp_path: Path, source: str
) -> None:
    other = Spire(OTHER)
    federated = {OTHER: other.bundle}
    files = BundleSet.of(TrustBundle(OTHER, tuple(other.bundle)))
    async with spiffe_mesh(tmp_path) as mesh:
        tool = ForeignServer(other.svid(TOOL), mesh.spire.bundle)
        await tool.start()
        try:
            # Agent records and policies name other.example's IDs like any other.
            await mesh.apply(
                blueprint("any"),
                agent("alice"),
                agent("bob"),
                agent("carol"),
                foreign_agent("tool", TOOL),
                foreign_agent("scout", SCOUT),
                selector_policy(
                    "to-tool", [{"name": "alice"}, {"name": "carol"}], [{"spiffeId": str(TOOL)}]
                ),
                selector_policy(
                    "from-scout", [{"spiffeId": str(SCOUT)}], [{"name": "bob"}, {"name": "carol"}]
                ),
            )
            wl = source == "workload-api"
            alice = await mesh.add_spiffe(
                "alice", federated=federated if wl else None, federated_files=None if wl else files
            )
            bob = await mesh.add_spiffe(
                "bob", federated=federated if wl else None, federated_files=None if wl else files
            )
            carol = await mesh.add_spiffe("carol")  # not federated at all
            # A foreign workload can't report its endpoint to our registry (the registry
            # serves its own trust domain only): the test records it directly.
            assert mesh.registry is not None
            mesh.registry.state.put_endpoint(
                pb.Endpoint(spiffe_id=str(TOOL), instance_id="partner-1", address=tool.address)
            )
            await mesh.wait_endpoints("bob", "carol")
            await until(
                lambda: all(
                    n.sidecar.state is not None and n.sidecar.state.snapshot.endpoints(TOOL)
                    for n in (alice, carol)
                ),
                "the tool's endpoint",
            )

            # outbound: alice reaches other.example's tool and checks its exact ID
            reply, _ = await unary(alice.outbound, "tool", body=b"x")
            assert reply == b"tool:x"
            assert tool.callers == [agent_id("alice")]
            # inbound: other.example's scout reaches bob, who names it to the app
            scout = other.svid(SCOUT)
            assert await scout_calls(mesh, bob, scout) == (b"hello", "OK")
            assert bob.app.received[-1]["trustmesh-caller"] == str(SCOUT)

            # without other.example's bundle: refused, with the reason
            code, details = await outcome(carol.outbound, "tool")
            assert (code, details) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "trustmesh: peer_untrusted: no trust bundle for trust domain 'other.example'",
            )
            # inbound, grpc's TLS refuses the handshake: no root for other.example
            assert await scout_calls(mesh, carol, scout) == (b"", "UNAVAILABLE")
            assert carol.app.received == []

            if wl:  # the Workload API withdraws the federation: refused from then on
                assert alice.sidecar.state is not None
                mesh.apis["alice"].push(alice.sidecar.state.svid, mesh.spire.bundle)
                await until(
                    lambda: alice.sidecar.state is not None
                    and alice.sidecar.state.bundles.get(OTHER) is None,
                    "alice's bundles without other.example",
                )
                code, details = await outcome(alice.outbound, "tool")
                assert details == (
                    "trustmesh: peer_untrusted: no trust bundle for trust domain 'other.example'"
                )
        finally:
            await tool.stop()


# -- 5: the Workload API is down at start ---------------------------------------------------------


async def test_workload_api_down_at_start_is_retried_until_it_appears(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trustmesh_sidecar.spiffe_source")
    async with spiffe_mesh(tmp_path) as mesh:
        await mesh.apply(blueprint("any"), agent("alice"))
        path = mesh.sockets / "alice.sock"
        expected = (
            f"cannot reach the SPIFFE Workload API at unix://{path}: no socket at "
            f"{path} (is the SPIRE agent running, and is its socket mounted here?); "
            "retrying in "
        )
        starting = asyncio.ensure_future(mesh.add_spiffe("alice", start_api=False))
        try:

            def retried() -> int:
                return sum(r.getMessage().startswith(expected) for r in caplog.records)

            await until(lambda: retried() >= 2, "two logged retries")
            sidecar = mesh.nodes["alice"].sidecar
            assert sidecar.admin_address and not starting.done()
            assert await health(sidecar) == health_pb2.HealthCheckResponse.NOT_SERVING

            await mesh.apis["alice"].start()
            node = await asyncio.wait_for(starting, 15)
        finally:
            if not starting.done():
                starting.cancel()
        assert node.sidecar.state is not None
        assert node.sidecar.state.spiffe_id == agent_id("alice")
        assert await health(node.sidecar) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("failure", ["restart", "fatal-error"])
async def test_spire_agent_restart_is_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    """The agent goes away mid-run and comes back with a rotated SVID: the sidecar keeps
    its last SVID meanwhile, then takes the new one. After a plain restart py-spiffe
    reconnects by itself; after an error it does not retry, its source closes and the
    sidecar's own `follow()` reconnects."""
    caplog.set_level(logging.WARNING, logger="trustmesh_sidecar.spiffe_source")
    async with spiffe_mesh(tmp_path) as mesh:
        await mesh.apply(blueprint("any"), agent("alice"))
        alice = await mesh.add_spiffe("alice")
        assert alice.sidecar.state is not None
        before = alice.sidecar.state.svid.serial_hex
        api = mesh.apis["alice"]
        await api.stop()
        if failure == "fatal-error":
            api.failing = (grpc.StatusCode.INVALID_ARGUMENT, "agent broken")
            await api.start()
            await until(
                lambda: any("failed" in r.getMessage() for r in caplog.records),
                "the sidecar noticing py-spiffe gave up",
            )
            await api.stop()
            api.failing = None
        await asyncio.sleep(0.5)
        assert alice.sidecar.state.svid.serial_hex == before  # fail static
        rotated = mesh.spire.svid(agent_id("alice"))
        api.push(rotated, mesh.spire.bundle)
        await api.start()
        await until(
            lambda: alice.sidecar.state is not None
            and alice.sidecar.state.svid.serial_hex == rotated.serial_hex,
            "the SVID from the restarted agent",
            timeout=15,
        )


# -- the registry in SPIFFE mode ------------------------------------------------------------------


async def test_spiffe_mode_registry_issues_operator_credentials_only(tmp_path: Path) -> None:
    async with spiffe_mesh(tmp_path) as mesh:
        assert mesh.registry is not None
        registry_id = mesh.registry.registry_id
        # the registry's own SVID is SPIRE's
        assert mesh.registry.svid.cert_chain[1] == mesh.spire.intermediate.cert
        # operators (embedded-CA credential) still work: apply, tokens, renewal
        await mesh.apply(blueprint("any"), agent("alice"))
        token = await mesh.token(agent_id("alice"))
        assert mesh.operator is not None
        operator_id = mesh.operator.svid.spiffe_id
        key = generate_key()
        renewed = await mesh.operator.call(
            lambda s: s.RenewSvid(rpb.RenewSvidRequest(csr=make_csr(key, operator_id)), timeout=WAIT)
        )
        d = mesh.root / "registry"
        ca = CertificateAuthority.load((d / "ca.crt").read_bytes(), (d / "ca.key").read_bytes())
        operator = X509Svid.from_der(list(renewed.cert_chain), key)
        assert operator.spiffe_id == operator_id
        assert operator.leaf.issuer == ca.cert.subject

        # but the embedded CA no longer issues workload SVIDs
        channels = MeshChannels(lambda: (None, mesh.spire_bundles()))
        try:
            stub = rgrpc.BootstrapStub(await channels.get(mesh.registry.bootstrap_address,
                                                          registry_id))
            key = generate_key()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Join(
                    rpb.JoinRequest(token=token, csr=make_csr(key, agent_id("alice"))),
                    timeout=WAIT,
                )
        finally:
            await channels.close()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details() == (
            "trustmesh: issuance_disabled: this registry runs with --credentials spiffe: SPIRE "
            "issues workload SVIDs and the embedded CA only operator credentials; not issuing "
            "spiffe://test.local/agents/alice"
        )

        # and a workload SVID from the embedded CA proves nothing here
        forged = issue(ca, agent_id("alice"), now=datetime.now(UTC))
        channels = MeshChannels(lambda: (forged, mesh.spire_bundles()))
        try:
            registry = rgrpc.RegistryStub(await channels.get(mesh.registry.address, registry_id))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in registry.Watch(rpb.WatchRequest(), timeout=WAIT):
                    break
        finally:
            await channels.close()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (err.value.details() or "").startswith(
            "trustmesh: peer_unauthenticated: certificate for spiffe://test.local/agents/alice "
            "does not chain to the trust bundle of test.local"
        )
