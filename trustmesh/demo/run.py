"""`trustmesh demo`: the whole mesh on loopback, end to end, in a few seconds.

orchestrator ──> planner ──> tool, each agent a small gRPC app behind a real sidecar
process, plus an impostor that holds a valid SVID but no Agent record. The report
is built only from the spans that the sidecars exported over OTLP.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from trustmesh.demo.apps import AgentApp, call_through
from trustmesh.demo.idp import DemoIdp
from trustmesh.demo.mesh import LocalMesh
from trustmesh.demo.otlp_receiver import OtlpReceiver
from trustmesh.demo.report import render_table, render_tree
from trustmesh.manifest import parse_sourced, to_document
from trustmesh.v1 import registry_pb2 as rpb

__all__ = ["run_demo"]


def _traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def manifest_documents() -> list[rpb.ManifestDocument]:
    text = resources.files("trustmesh.demo").joinpath("mesh.yaml").read_text()
    return [
        rpb.ManifestDocument(source=s.source, json=json.dumps(to_document(s.resource), default=str))
        for s in parse_sourced(text, "mesh.yaml")
    ]


def say(text: str) -> None:
    print(text, flush=True)


async def _scenario(root: Path) -> int:
    receiver = OtlpReceiver()
    await receiver.start()
    mesh = LocalMesh(root, otlp_endpoint=receiver.endpoint)
    apps = {name: AgentApp(name) for name in ("orchestrator", "planner", "tool")}
    idp = DemoIdp(root / "idp")
    oidc = {"TRUSTMESH_OIDC_ISSUERS": str(idp.config_path)}
    try:
        t0 = time.monotonic()
        await mesh.start_registry()
        assert mesh.registry is not None
        say(
            f"registry   {mesh.registry.address} (mTLS), {mesh.registry.bootstrap_address} (bootstrap)"
        )
        for line in await mesh.apply(manifest_documents()):
            say(f"  applied  {line}")
        for app in apps.values():
            await app.start()
        sidecars = await asyncio.gather(
            *(
                mesh.start_sidecar(
                    name, app.address, env_extra=oidc if name == "orchestrator" else None
                )
                for name, app in apps.items()
            ),
            mesh.start_sidecar("impostor", "127.0.0.1:9", spiffe_id=mesh.spiffe_id("impostor")),
        )
        for sc in sidecars:
            say(f"sidecar    {sc.name:<12} {sc.spiffe_id}  inbound {sc.inbound}")
            if sc.name in apps:
                apps[sc.name].outbound = sc.outbound
        say(f"mesh up in {time.monotonic() - t0:.1f}s\n")

        orch = apps["orchestrator"]
        say("1. a task: orchestrator -> planner (unary + server streaming) -> tool")
        r = await _direct(orch.address, "/demo.Orchestrator/Run", {"task": "summarise the quarter"})
        say(f"   {_brief(r)}")

        say("2. the orchestrator calls the tool directly: no policy allows it")
        r = await _direct(orch.address, "/demo.Orchestrator/Shortcut", {"task": "skip the planner"})
        say(f"   {_brief(r)}")

        say("3. an impostor with a valid SVID but no Agent record calls the planner")
        imp = mesh.sidecars["impostor"]
        r = await call_through(
            imp.outbound,
            "planner",
            "/demo.Planner/Plan",
            {"task": "exfiltrate"},
            traceparent=_traceparent(),
        )
        say(f"   {_brief(r)}")

        say("4. on behalf of a user: alice (analysts) asks; the tool sees who started it, and how")
        token = idp.token("alice@example.com", ["analysts"])
        r = await _direct(
            orch.address, "/demo.Orchestrator/Run", {"task": "quarterly numbers"}, bearer=token
        )
        say(f"   {_brief(r)}")

        say("5. mallory (interns) asks the same: the planner's DelegationPolicy refuses the chain")
        token = idp.token("mallory@example.com", ["interns"])
        r = await _direct(
            orch.address, "/demo.Orchestrator/Run", {"task": "quarterly numbers"}, bearer=token
        )
        say(f"   {_brief(r)}")

        say("6. an operator disables the planner mid-run; the same task is now refused")
        await mesh.set_disabled("planner", True, "incident INC-1234")
        await asyncio.sleep(0.3)
        r = await _direct(orch.address, "/demo.Orchestrator/Run", {"task": "summarise the quarter"})
        say(f"   {_brief(r)}\n")
    finally:
        await mesh.stop()  # sidecars flush their spans on SIGTERM
        for app in apps.values():
            await app.stop()
        await receiver.stop()

    spans = [s for s in receiver.spans if s.attributes.get("trustmesh.side")]
    say(render_table(spans))
    say("")
    say(render_tree(spans))
    return 0


async def _direct(
    address: str, method: str, payload: dict[str, object], *, bearer: str | None = None
) -> dict[str, object]:
    """The driver starts a task by calling the orchestrator app (the user's entry point)."""
    import grpc

    metadata = [("traceparent", _traceparent())]
    if bearer:
        metadata.append(("authorization", f"Bearer {bearer}"))
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await channel.unary_unary(method)(
                json.dumps(payload).encode(), metadata=metadata, timeout=10
            )
            return {"ok": True, "reply": json.loads(reply)}
        except grpc.aio.AioRpcError as e:
            return {"ok": False, "code": e.code().name, "details": e.details()}


def _brief(result: dict[str, object]) -> str:
    text = json.dumps(result)
    return text if len(text) < 220 else text[:217] + "..."


def run_demo(*, keep: bool = False, verbose: bool = False) -> int:
    root = Path(tempfile.mkdtemp(prefix="trustmesh-demo-"))
    started = time.monotonic()
    try:
        code = asyncio.run(_scenario(root))
    finally:
        if keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    say(f"\ndemo finished in {time.monotonic() - started:.1f}s")
    return code
