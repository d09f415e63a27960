"""The data-plane topology shared by the latency, throughput and connection measures.

    loadgen (process) --------------------------------------------> echo app (process)
    loadgen (process) -> sidecar "client" -> mTLS -> sidecar "server" -> echo app

Both paths end at the same app process and start in the same load generator, so
they differ only by the mesh. The sidecars are real processes started by
`trustmesh.demo.mesh.LocalMesh` (their own SVIDs from join tokens, the registry's
mTLS watch); the registry runs in this process and is idle during the data-plane
measures. Extra sidecars (traced pair, fresh peers, the delegation slot) are started
on demand and stopped by `stop_sidecar` or, at the latest, by `stop()`.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import grpc

from bench.common import (
    Child,
    agent_doc,
    blueprint_doc,
    manifest,
    policy_doc,
    registry_call,
    rss_mb,
)
from trustmesh.demo.mesh import LocalMesh, SidecarProcess
from trustmesh.v1 import sidecar_pb2 as spb
from trustmesh.v1 import sidecar_pb2_grpc as sgrpc

__all__ = ["BenchMesh"]

TD = "demo.local"  # LocalMesh's trust domain
CALLERS = ("client", "client-traced", "planner")
SERVERS = ("server", "server-traced", "tool")


def mesh_docs(peers: int) -> list[dict[str, Any]]:
    """One blueprint, the callers, the callees (servers, fresh peers), one policy."""
    docs = [blueprint_doc("bench", ["/bench.Echo/*"])]
    callees = [*SERVERS, *(f"peer-{i}" for i in range(peers))]
    docs += [agent_doc(name, TD, "bench") for name in (*CALLERS, *callees)]
    docs.append(
        policy_doc(
            "bench",
            [{"name": c} for c in CALLERS],
            [{"blueprint": "bench"}],
            ["/bench.Echo/*"],
        )
    )
    return docs


class BenchMesh:
    def __init__(
        self, root: Path, *, peers: int = 0, sidecar_env: dict[str, str] | None = None
    ) -> None:
        self.root = root
        self.peers = peers
        # Extra environment for every sidecar (e.g. to pick an engine); LocalMesh
        # applies it last.
        self.mesh = LocalMesh(root / "mesh", extra_env=sidecar_env, log_dir=root / "logs")
        self.app: Child | None = None
        self.loadgen: Child | None = None
        self.app_address = ""
        self.idle_rss: dict[str, float] = {}

    @property
    def gen(self) -> Child:
        assert self.loadgen is not None, "start() first"
        return self.loadgen

    def sidecar(self, name: str) -> SidecarProcess:
        return self.mesh.sidecars[name]

    async def start(self) -> BenchMesh:
        self.app, hello = await Child.start("echo-app", "bench.echo_app", workdir=self.root)
        self.app_address = hello["address"]
        self.loadgen, _ = await Child.start("loadgen", "bench.loadgen", workdir=self.root)
        await self.mesh.start_registry()
        await registry_call(lambda: self.mesh.apply(manifest(mesh_docs(self.peers))))
        await self.start_sidecar("client", app="127.0.0.1:9")  # takes no inbound calls
        await self.start_sidecar("server")
        await self.wait_synced("client")
        await asyncio.sleep(0.5)  # let start-up work settle before reading "idle"
        self.idle_rss = {n: rss_mb(self.sidecar(n).process.pid) for n in ("client", "server")}
        return self

    async def start_sidecar(
        self, name: str, *, app: str = "", otlp_endpoint: str | None = None
    ) -> SidecarProcess:
        """A sidecar in front of the echo app; traced (OTLP) when an endpoint is given."""
        token = await registry_call(lambda: self.mesh.token(self.mesh.spiffe_id(name)))
        self.mesh.otlp_endpoint = otlp_endpoint
        try:
            return await self.mesh.start_sidecar(name, app or self.app_address, token=token)
        finally:
            self.mesh.otlp_endpoint = None

    async def stop_sidecar(self, name: str) -> None:
        sc = self.mesh.sidecars.pop(name, None)
        if sc is not None:
            await sc.stop()

    async def wait_synced(self, name: str, timeout: float = 10.0) -> None:
        """Wait until sidecar `name` holds every revision the registry has published."""
        assert self.mesh.registry is not None
        want = self.mesh.registry.state.revision
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with grpc.aio.insecure_channel(self.sidecar(name).admin) as channel:
            stub = sgrpc.SidecarAdminStub(channel)
            while True:
                status = await stub.Status(spb.StatusRequest(), timeout=2)
                if status.snapshot_revision >= want:
                    return
                if loop.time() > deadline:
                    raise TimeoutError(
                        f"sidecar {name} stuck at revision {status.snapshot_revision} < {want}"
                    )
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.mesh.stop()
        for child in (self.loadgen, self.app):
            if child is not None:
                await child.stop()

    async def __aenter__(self) -> BenchMesh:
        try:
            return await self.start()
        except BaseException:
            await self.stop()
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
