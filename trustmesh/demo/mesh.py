"""A local mesh on loopback: an embedded registry and real sidecar processes.

Used by `trustmesh demo` and by the integration tests, so both exercise the real
thing: the registry's gRPC API over mTLS, join tokens, sidecar processes with their
own SVIDs, and OTLP export.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trustmesh.operator_client import OperatorClient
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.v1 import registry_pb2 as rpb

if TYPE_CHECKING:
    from trustmesh_registry.server import RegistryServer

__all__ = ["LocalMesh", "SidecarProcess"]


@dataclass
class SidecarProcess:
    name: str
    spiffe_id: SpiffeId
    process: asyncio.subprocess.Process
    outbound: str = ""
    inbound: str = ""
    admin: str = ""
    event_loop: str = ""  # as the sidecar reported it: uvloop or asyncio
    output: list[str] = field(default_factory=list)

    async def stop(self, timeout: float = 5.0) -> int:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        return self.process.returncode or 0


class LocalMesh:
    def __init__(
        self,
        root: Path,
        *,
        trust_domain: str = "demo.local",
        otlp_endpoint: str | None = None,
        svid_ttl_s: int = 3600,
        extra_env: dict[str, str] | None = None,
        log_dir: Path | None = None,
    ) -> None:
        """`log_dir`: write each sidecar's stderr (its logs and audit trail) to
        `<log_dir>/<name>.log` instead of reading it through a pipe into this process,
        as a deployment's log collector would; benchmarks use it so the process that
        times the calls does not also consume an audit line per call."""
        self.root = root
        self.log_dir = log_dir
        self.td = TrustDomain.parse(trust_domain)
        self.otlp_endpoint = otlp_endpoint
        self.svid_ttl_s = svid_ttl_s
        self.extra_env = extra_env or {}
        self.sidecars: dict[str, SidecarProcess] = {}
        self.registry: RegistryServer | None = None
        self.operator: OperatorClient | None = None

    def spiffe_id(self, name: str) -> SpiffeId:
        return SpiffeId.parse(f"spiffe://{self.td}/agents/{name}")

    async def start_registry(self) -> None:
        from datetime import timedelta

        from trustmesh_registry.datadir import DataDir
        from trustmesh_registry.server import RegistryServer, ServeConfig

        data = self.root / "registry"
        DataDir(data).init(self.td, now=datetime.now(UTC), registry_address="127.0.0.1:0")
        server = RegistryServer(
            ServeConfig(
                data,
                listen="127.0.0.1:0",
                bootstrap_listen="127.0.0.1:0",
                svid_ttl=timedelta(seconds=self.svid_ttl_s),
            )
        )
        await server.start()
        self.registry = server
        config = data / "config.yaml"
        self.operator = OperatorClient.from_config(config, registry=server.address)

    @property
    def bundle_path(self) -> Path:
        return self.root / "registry" / "bundle.pem"

    async def apply(self, documents: list[rpb.ManifestDocument]) -> list[str]:
        assert self.operator is not None
        resp = await self.operator.call(
            lambda s: s.Apply(rpb.ApplyRequest(documents=documents), timeout=10)
        )
        return list(resp.applied)

    async def token(self, spiffe_id: SpiffeId, uses: int = 1) -> str:
        assert self.operator is not None
        req = rpb.CreateJoinTokenRequest(spiffe_id=str(spiffe_id), ttl_seconds=600, uses=uses)
        resp = await self.operator.call(lambda s: s.CreateJoinToken(req, timeout=10))
        return str(resp.token)

    async def set_disabled(self, agent: str, disabled: bool, reason: str = "") -> int:
        assert self.operator is not None
        req = rpb.SetAgentStateRequest(agent=agent, disabled=disabled, reason=reason)
        resp = await self.operator.call(lambda s: s.SetAgentState(req, timeout=10))
        return int(resp.revision)

    async def start_sidecar(
        self,
        name: str,
        app: str,
        *,
        spiffe_id: SpiffeId | None = None,
        token: str | None = None,
        ready_timeout: float = 20.0,
        env_extra: dict[str, str] | None = None,
    ) -> SidecarProcess:
        assert self.registry is not None
        sid = spiffe_id or self.spiffe_id(name)
        token = token or await self.token(sid)
        env = dict(os.environ)
        env.update(
            {
                "TRUSTMESH_SPIFFE_ID": str(sid),
                "TRUSTMESH_REGISTRY": self.registry.address,
                "TRUSTMESH_REGISTRY_BOOTSTRAP": self.registry.bootstrap_address,
                "TRUSTMESH_JOIN_TOKEN": token,
                "TRUSTMESH_TRUST_BUNDLE": str(self.bundle_path),
                "TRUSTMESH_APP": app,
                "TRUSTMESH_OUTBOUND": "127.0.0.1:0",
                "TRUSTMESH_INBOUND": "127.0.0.1:0",
                "TRUSTMESH_ADMIN": "127.0.0.1:0",
                "TRUSTMESH_DATA_DIR": str(self.root / "sidecars" / name),
                "OTEL_SERVICE_NAME": f"sidecar-{name}",
                "OTEL_BSP_SCHEDULE_DELAY": "200",
            }
        )
        env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        if self.otlp_endpoint:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.otlp_endpoint
            env["OTEL_EXPORTER_OTLP_INSECURE"] = "true"
            env["OTEL_TRACES_EXPORTER"] = "otlp"
        else:
            env["OTEL_TRACES_EXPORTER"] = "none"
        env.update(self.extra_env)
        env.update(env_extra or {})
        stderr: int | IO[bytes] = asyncio.subprocess.STDOUT
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(
                self.log_dir / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
            )
            stderr = os.fdopen(fd, "ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "trustmesh",
                "sidecar",
                "run",
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env=env,
            )
        finally:
            if not isinstance(stderr, int):
                stderr.close()  # the child holds its own copy
        sc = SidecarProcess(name, sid, proc)
        self.sidecars[name] = sc
        await self._await_ready_line(sc, ready_timeout)
        await self.wait_serving(sc, ready_timeout)
        return sc

    async def _await_ready_line(self, sc: SidecarProcess, timeout: float) -> None:
        assert sc.process.stdout is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError(f"sidecar {sc.name} did not start:\n" + self._said(sc))
            line = await asyncio.wait_for(sc.process.stdout.readline(), left)
            if not line:
                raise RuntimeError(f"sidecar {sc.name} exited:\n" + self._said(sc))
            text = line.decode(errors="replace").rstrip()
            sc.output.append(text)
            if text.startswith("sidecar ") and "outbound=" in text:
                parts = dict(p.split("=", 1) for p in text.split() if "=" in p)
                sc.outbound, sc.inbound, sc.admin = (
                    parts["outbound"],
                    parts["inbound"],
                    parts["admin"],
                )
                sc.event_loop = parts.get("event_loop", "")
                asyncio.get_running_loop().create_task(self._drain(sc))
                return

    def _said(self, sc: SidecarProcess) -> str:
        """What a sidecar printed, for an error: its output, and its log file's end."""
        text = "\n".join(sc.output)
        if self.log_dir is not None:
            with contextlib.suppress(OSError):
                log = (self.log_dir / f"{sc.name}.log").read_text(errors="replace")
                text += "\n" + "\n".join(log.splitlines()[-50:])
        return text

    @staticmethod
    async def _drain(sc: SidecarProcess) -> None:
        assert sc.process.stdout is not None
        while line := await sc.process.stdout.readline():
            sc.output.append(line.decode(errors="replace").rstrip())
            del sc.output[:-500]

    async def wait_serving(self, sc: SidecarProcess, timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        async with grpc.aio.insecure_channel(sc.admin) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(
                        f"sidecar {sc.name} not SERVING:\n" + "\n".join(sc.output[-20:])
                    )
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        await asyncio.gather(*(sc.stop() for sc in self.sidecars.values()), return_exceptions=True)
        if self.registry is not None:
            await self.registry.stop()
