"""In-process mesh for integration tests: a real registry and real sidecars.

Everything here is real: the registry's gRPC services over mTLS, join tokens, the CA,
sidecars with their own SVIDs, the TLS bridge, grpc listeners on loopback. What is
in-process is only the placement (one event loop), so tests can read spans from an
in-memory exporter and look at a sidecar's state. `trustmesh.demo.mesh.LocalMesh`
runs sidecars as separate processes; tests that need that use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from trustmesh.demo.mesh import LocalMesh, SidecarProcess
from trustmesh.limits import DEFAULT_LIMITS, Limits
from trustmesh.operator_client import OperatorClient
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh_registry.datadir import DataDir
from trustmesh_registry.server import RegistryServer, ServeConfig
from trustmesh_sidecar.engine_select import DEFAULT_ENGINE
from trustmesh_sidecar.runtime import Sidecar, SidecarConfig

TD = "test.local"
ECHO = "test.Echo"


def agent_id(name: str) -> SpiffeId:
    return SpiffeId.parse(f"spiffe://{TD}/agents/{name}")


def blueprint(name: str, methods: list[str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "trustmesh.dev/v1alpha1",
        "kind": "AgentBlueprint",
        "metadata": {"name": name},
        "spec": {"description": name, "allowedMethods": methods or ["*"]},
    }


def agent(name: str, bp: str = "any", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "trustmesh.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": {
            "spiffeId": str(agent_id(name)),
            "blueprint": bp,
            "sponsor": "test@example.com",
            **spec,
        },
    }


def policy(name: str, callers: list[str], callees: list[str], methods: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "trustmesh.dev/v1alpha1",
        "kind": "AccessPolicy",
        "metadata": {"name": name},
        "spec": {
            "callers": [{"name": c} for c in callers],
            "callees": [{"name": c} for c in callees],
            "methods": methods,
        },
    }


# -- the echo app ---------------------------------------------------------------------------


@dataclass
class EchoApp:
    """A plain gRPC server offering every call kind; records what it received."""

    received: list[dict[str, str | bytes]] = field(default_factory=list)
    server: grpc.aio.Server | None = None
    address: str = ""
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def _seen(self, context: grpc.aio.ServicerContext) -> None:
        self.received.append(dict(context.invocation_metadata() or ()))

    async def _unary(self, req: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self._seen(context)
        await context.send_initial_metadata((("x-initial", "hello"),))
        context.set_trailing_metadata((("x-trailing", "bye"),))
        return req

    async def _client_stream(
        self, reqs: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> bytes:
        self._seen(context)
        return b"|".join([r async for r in reqs])

    async def _server_stream(
        self, req: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        self._seen(context)
        n = int(req or b"3")
        for i in range(n):
            yield f"{i}".encode()

    async def _bidi(
        self, reqs: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        self._seen(context)
        async for r in reqs:
            yield r.upper()

    async def _sleep(self, req: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self._seen(context)
        try:
            await asyncio.sleep(float(req or b"10"))
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return b"woke"

    async def _fail(self, req: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self._seen(context)
        context.set_trailing_metadata((("x-error-detail", "quota"),))
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "app says no")
        return b""

    async def _hold(self, req: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """A long server stream: one message every 50 ms until cancelled."""
        self._seen(context)
        i = 0
        while True:
            yield str(i).encode()
            i += 1
            await asyncio.sleep(0.05)

    async def start(self) -> str:
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self._client_stream),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi),
            "Sleep": grpc.unary_unary_rpc_method_handler(self._sleep),
            "Fail": grpc.unary_unary_rpc_method_handler(self._fail),
            "Hold": grpc.unary_stream_rpc_method_handler(self._hold),
        }
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(ECHO, handlers)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self.server, self.address = server, f"127.0.0.1:{port}"
        return self.address

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)


# -- the mesh ---------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    sidecar: Sidecar
    app: EchoApp
    spans: InMemorySpanExporter

    @property
    def outbound(self) -> str:
        return self.sidecar.outbound_address

    @property
    def spiffe_id(self) -> SpiffeId:
        return self.sidecar.config.spiffe_id


class Mesh:
    def __init__(
        self,
        root: Path,
        *,
        svid_ttl: timedelta = timedelta(hours=1),
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.root = root
        self.svid_ttl = svid_ttl
        self.limits = limits
        self.nodes: dict[str, Node] = {}
        self.registry: RegistryServer | None = None
        self.operator: OperatorClient | None = None

    async def start(self) -> Mesh:
        data = self.root / "registry"
        DataDir(data).init(
            TrustDomain.parse(TD), now=datetime.now(UTC), registry_address="127.0.0.1:0"
        )
        self.registry = RegistryServer(
            ServeConfig(
                data, listen="127.0.0.1:0", bootstrap_listen="127.0.0.1:0", svid_ttl=self.svid_ttl
            )
        )
        await self.registry.start()
        self.operator = OperatorClient.from_config(
            data / "config.yaml", registry=self.registry.address
        )
        return self

    @property
    def bundle_path(self) -> Path:
        return self.root / "registry" / "bundle.pem"

    async def apply(self, *docs: dict[str, Any]) -> list[str]:
        assert self.operator is not None
        documents = [
            rpb.ManifestDocument(source=f"test#{i}", json=json.dumps(d)) for i, d in enumerate(docs)
        ]
        resp = await self.operator.call(
            lambda s: s.Apply(rpb.ApplyRequest(documents=documents), timeout=10)
        )
        return list(resp.applied)

    async def token(self, spiffe_id: SpiffeId, uses: int = 1, ttl: int = 600) -> str:
        assert self.operator is not None
        req = rpb.CreateJoinTokenRequest(spiffe_id=str(spiffe_id), ttl_seconds=ttl, uses=uses)
        return (await self.operator.call(lambda s: s.CreateJoinToken(req, timeout=10))).token

    async def disable(self, name: str, disabled: bool = True, reason: str = "test") -> None:
        assert self.operator is not None
        req = rpb.SetAgentStateRequest(agent=name, disabled=disabled, reason=reason)
        await self.operator.call(lambda s: s.SetAgentState(req, timeout=10))

    async def add(
        self,
        name: str,
        *,
        spiffe_id: SpiffeId | None = None,
        wait: bool = True,
        app: EchoApp | None = None,
    ) -> Node:
        """A sidecar for `name` in front of `app` (a fresh `EchoApp` by default)."""
        assert self.registry is not None
        sid = spiffe_id or agent_id(name)
        app = app or EchoApp()
        await app.start()
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        config = SidecarConfig(
            spiffe_id=sid,
            registry=self.registry.address,
            registry_bootstrap=self.registry.bootstrap_address,
            join_token=await self.token(sid),
            trust_bundle=self.bundle_path,
            app=app.address,
            outbound="127.0.0.1:0",
            inbound="127.0.0.1:0",
            admin="127.0.0.1:0",
            data_dir=self.root / "sidecars" / name,
            limits=self.limits,
            # TRUSTMESH_TEST_ENGINE=grpc runs the integration suite on the grpcio engine
            # (CI runs it on both); the default is the sidecar's default engine.
            engine=os.environ.get("TRUSTMESH_TEST_ENGINE", DEFAULT_ENGINE),
        )
        sidecar = Sidecar(config, tracer_provider=provider)
        await sidecar.start()
        if wait:
            await sidecar.wait_ready()
        node = Node(name, sidecar, app, exporter)
        self.nodes[name] = node
        return node

    async def wait_endpoints(self, *names: str, timeout: float = 5.0) -> None:
        """Wait until every node's snapshot lists an endpoint for each named agent."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if all(
                n.sidecar.state is not None and n.sidecar.state.snapshot.endpoints(agent_id(t))
                for n in self.nodes.values()
                for t in names
            ):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"endpoints for {names} not seen by every sidecar")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        for node in self.nodes.values():
            await node.sidecar.stop(0.2)
            await node.app.stop()
        if self.registry is not None:
            await self.registry.stop(0.2)


async def unary(
    outbound: str,
    target: str,
    method: str = f"/{ECHO}/Unary",
    body: bytes = b"ping",
    metadata: list[tuple[str, str | bytes]] | None = None,
    timeout: float = 5.0,
) -> tuple[bytes, Any]:
    """Call through a sidecar; returns (reply, call) or raises grpc.aio.AioRpcError."""
    md: list[tuple[str, str | bytes]] = [("trustmesh-target", target), *(metadata or [])]
    async with grpc.aio.insecure_channel(outbound) as channel:
        call = channel.unary_unary(method)(body, metadata=md, timeout=timeout)
        reply = await call
        return reply, call


# -- delegation ------------------------------------------------------------------------------


def delegation_policy(
    name: str,
    callees: list[dict[str, Any]],
    origins: list[dict[str, Any]],
    paths: list[list[dict[str, Any] | str]],
    **spec: Any,
) -> dict[str, Any]:
    """A DelegationPolicy document; `spec` adds maxDepth, requiredScopes, requireUserOrigin."""
    return {
        "apiVersion": "trustmesh.dev/v1alpha1",
        "kind": "DelegationPolicy",
        "metadata": {"name": name},
        "spec": {"callees": callees, "allowedOrigins": origins, "allowedPaths": paths, **spec},
    }


def trust_user_tokens(node: Node, issuers_file: Path) -> None:
    """Make `node`'s sidecar verify user access tokens from the issuers listed in
    `issuers_file` (the `--oidc-issuers` YAML), as `SidecarConfig.user_token_issuers`
    does at start."""
    from trustmesh.user_token import UserTokenVerifier
    from trustmesh_sidecar.oidc_config import load_issuers

    state = node.sidecar.state
    assert state is not None, "start the node first"
    state.user_tokens = UserTokenVerifier(
        load_issuers(issuers_file), limits=node.sidecar.config.limits
    )


async def add_with_app(mesh: Mesh, name: str, app: EchoApp) -> Node:
    """`Mesh.add`, but the sidecar forwards to `app`: an `EchoApp` subclass whose
    `start()` serves the test's own services (started here)."""
    return await mesh.add(name, app=app)


@contextlib.asynccontextmanager
async def process_pair(
    root: Path, **mesh_options: Any
) -> AsyncIterator[tuple[LocalMesh, SidecarProcess, SidecarProcess, dict[str, EchoApp]]]:
    """A `LocalMesh` (registry and sidecars as `trustmesh` processes) where alice may
    call bob's `test.Echo`: yields the mesh, alice's and bob's sidecar processes and
    their apps. On the way out the sidecars must exit 0 on SIGTERM."""
    mesh = LocalMesh(root, trust_domain=TD, **mesh_options)
    apps = {"alice": EchoApp(), "bob": EchoApp()}
    docs = [
        blueprint("any"),
        agent("alice"),
        agent("bob"),
        policy("alice-calls-bob", ["alice"], ["bob"], [f"/{ECHO}/*"]),
    ]
    try:
        await asyncio.wait_for(mesh.start_registry(), 10)
        await mesh.apply(
            [
                rpb.ManifestDocument(source=f"pair#{i}", json=json.dumps(d))
                for i, d in enumerate(docs)
            ]
        )
        for app in apps.values():
            await app.start()
        alice, bob = await asyncio.wait_for(
            asyncio.gather(
                *(mesh.start_sidecar(n, a.address, ready_timeout=10) for n, a in apps.items())
            ),
            12,
        )
        yield mesh, alice, bob, apps
        codes = await asyncio.gather(*(sc.stop() for sc in mesh.sidecars.values()))
        assert codes == [0, 0], [sc.output[-10:] for sc in mesh.sidecars.values()]
    finally:
        await mesh.stop()  # sidecars flush their spans on SIGTERM
        for app in apps.values():
            await app.stop()


@dataclass
class RotationRun:
    calls: int
    failures: list[tuple[grpc.StatusCode, str]]
    callee_serials: list[str]  # the callee's SVID serials the caller's handshakes saw
    callee_serial: str  # the callee's SVID serial at the last call
    caller_serial: str  # the caller's, at the last call


async def calls_across_rotations(caller: Node, callee: Node, seconds: float) -> RotationRun:
    """Calls from `caller` to `callee` every 50 ms for `seconds` while their SVIDs rotate;
    then on until the caller's newest handshake shows the callee's current SVID (a
    pooled connection lives at most its maximum age, so a renewal in the last moments
    reaches a handshake a little later), at most 3 s more. The serials are read right
    after the last call returns, with no await in between: no renewal can slip in."""
    loop = asyncio.get_running_loop()
    run = RotationRun(0, [], [], "", "")
    end = loop.time() + seconds
    while True:
        await asyncio.sleep(0.05)
        try:
            await unary(caller.outbound, callee.name, body=b"r", timeout=2.0)
        except grpc.aio.AioRpcError as e:
            run.failures.append((e.code(), e.details() or ""))
        run.calls += 1
        caller_state, callee_state = caller.sidecar.state, callee.sidecar.state
        assert caller_state is not None and callee_state is not None
        run.caller_serial = caller_state.svid.serial_hex
        run.callee_serial = callee_state.svid.serial_hex
        run.callee_serials = caller.sidecar.peer_serials(
            callee.sidecar.inbound_address, callee.spiffe_id
        )
        seen = bool(run.callee_serials) and run.callee_serials[-1] == run.callee_serial
        if loop.time() >= end and (seen or loop.time() >= end + 3.0):
            return run
