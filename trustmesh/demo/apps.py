"""The demo's agent apps: plain gRPC servers that know nothing of mTLS.

Each app calls the next agent through its own sidecar's outbound port, naming the
peer in `trustmesh-target`, and copies the W3C `traceparent` it received so that one
task is one trace. Payloads are small JSON documents; the sidecars never parse them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

__all__ = ["AgentApp", "call_through"]


def _md(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


# What an agent copies from the call it serves into the calls it makes: the trace
# context, the delegation chain its sidecar verified, and (the first agent only) the
# user's bearer token, which its own sidecar verifies and does not forward.
_CARRIED = ("traceparent", "trustmesh-delegation-bin", "authorization")


def carried(context: grpc.aio.ServicerContext) -> list[tuple[str, str | bytes]]:
    return [(k, v) for k, v in (context.invocation_metadata() or ()) if k in _CARRIED]


async def call_through(
    outbound: str,
    target: str,
    method: str,
    payload: dict[str, Any],
    *,
    traceparent: str | None = None,
    carry: list[tuple[str, str | bytes]] | None = None,
    stream: bool = False,
    timeout: float = 5.0,
) -> dict[str, Any]:
    """One call through a sidecar; returns the outcome as data (never raises)."""
    metadata: list[tuple[str, str | bytes]] = [("trustmesh-target", target), *(carry or [])]
    if traceparent:
        metadata.append(("traceparent", traceparent))
    body = json.dumps(payload).encode()
    async with grpc.aio.insecure_channel(outbound) as channel:
        try:
            if stream:
                call = channel.unary_stream(method)(body, metadata=metadata, timeout=timeout)
                items = [json.loads(m) async for m in call]
                return {"ok": True, "items": items}
            reply = await channel.unary_unary(method)(body, metadata=metadata, timeout=timeout)
            return {"ok": True, "reply": json.loads(reply)}
        except grpc.aio.AioRpcError as e:
            return {"ok": False, "code": e.code().name, "details": e.details()}


@dataclass
class AgentApp:
    name: str
    outbound: str = ""  # the app's own sidecar, set once the sidecar is up
    seen_callers: list[str] = field(default_factory=list)
    server: grpc.aio.Server | None = None
    address: str = ""

    async def start(self) -> str:
        server = grpc.aio.server()
        handlers = {
            "orchestrator": {
                "Run": grpc.unary_unary_rpc_method_handler(self._run),
                "Shortcut": grpc.unary_unary_rpc_method_handler(self._shortcut),
            },
            "planner": {
                "Plan": grpc.unary_unary_rpc_method_handler(self._plan),
                "StreamPlan": grpc.unary_stream_rpc_method_handler(self._stream_plan),
            },
            "tool": {
                "Invoke": grpc.unary_unary_rpc_method_handler(self._invoke),
                "Admin": grpc.unary_unary_rpc_method_handler(self._invoke),
            },
        }[self.name]
        service = f"demo.{self.name.capitalize()}"
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, handlers)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self.server = server
        self.address = f"127.0.0.1:{port}"
        return self.address

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0.5)

    def _note(self, context: grpc.aio.ServicerContext) -> dict[str, str]:
        md = _md(context)
        self.seen_callers.append(md.get("trustmesh-caller", "(direct)"))
        return md

    async def _run(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self._note(context)
        task = json.loads(request)
        carry = carried(context)
        plan = await call_through(self.outbound, "planner", "/demo.Planner/Plan", task, carry=carry)
        steps = await call_through(
            self.outbound, "planner", "/demo.Planner/StreamPlan", task, carry=carry, stream=True
        )
        return json.dumps({"plan": plan, "steps": steps}).encode()

    async def _shortcut(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self._note(context)
        result = await call_through(
            self.outbound, "tool", "/demo.Tool/Invoke", json.loads(request), carry=carried(context)
        )
        return json.dumps(result).encode()

    async def _plan(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self._note(context)
        tool = await call_through(
            self.outbound, "tool", "/demo.Tool/Invoke", json.loads(request), carry=carried(context)
        )
        return json.dumps({"planner": "ok", "tool": tool}).encode()

    async def _stream_plan(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        self._note(context)
        for i in range(3):
            yield json.dumps({"step": i + 1, "of": 3}).encode()

    async def _invoke(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        md = self._note(context)
        reply = {"tool": "done", "caller": md.get("trustmesh-caller")}
        if "trustmesh-origin" in md:  # a delegated call: who started it, and the path
            reply |= {"origin": md["trustmesh-origin"], "chain": md.get("trustmesh-chain")}
        return json.dumps(reply).encode()
