"""`trustmesh.propagation`: a Python agent forwards the chain and the trace context it
received without copying metadata by hand.

The planner here is a real grpc.aio agent behind its own sidecar. Inside its handler
it calls the tool through `sidecar_channel` (or the A2A SDK's real `GrpcTransport`
with `a2a_channel_factory`), and never touches `trustmesh-delegation-bin` or
`traceparent` itself. The tool's sidecar only accepts the call as a delegated one
(orchestrator > planner > tool) if the chain arrived, and the tool's app only sees
the orchestrator's trace ID if `traceparent` was forwarded.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import pytest
from a2a.client.client import ClientConfig
from a2a.client.transports.grpc import GrpcTransport
from a2a.types import a2a_pb2 as a2a
from a2a.types import a2a_pb2_grpc as a2a_grpc

from trustmesh.delegation import METADATA_KEY
from trustmesh.delegation_parse import split_chain
from trustmesh.propagation import (
    CallerContext,
    InboundContextInterceptor,
    a2a_channel_factory,
    current,
    inbound,
    sidecar_channel,
)

from harness import (
    ECHO,
    EchoApp,
    Mesh,
    add_with_app,
    agent,
    agent_id,
    blueprint,
    delegation_policy,
    policy,
    unary,
)

WAIT = 5.0
PLAN = "/test.Planner/Plan"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
ORCH, PLANNER, TOOL = (str(agent_id(n)) for n in ("orchestrator", "planner", "tool"))

MANIFEST = [
    *(blueprint(b) for b in ("orchestrator", "planner", "tool")),
    agent("orchestrator", "orchestrator"), agent("planner", "planner"), agent("tool", "tool"),
    policy("orchestrator-plans", ["orchestrator"], ["planner"], ["/test.Planner/*"]),
    policy("planner-uses-tool", ["planner"], ["tool"], [f"/{ECHO}/*", "/lf.a2a.v1.A2AService/*"]),
    delegation_policy(
        "tool-via-planner", [{"blueprint": "tool"}], [{"blueprint": "orchestrator"}],
        [[{"blueprint": "orchestrator"}, {"blueprint": "planner"}]],
    ),
]  # fmt: skip


@dataclass
class AgentApp(EchoApp):
    """An agent's own gRPC server: `setup` adds its services, behind `interceptors`.
    `contexts` records `propagation.current()` as each handler saw it."""

    setup: Callable[[grpc.aio.Server], None] | None = None
    interceptors: list[grpc.aio.ServerInterceptor] = field(default_factory=list)
    contexts: list[CallerContext | None] = field(default_factory=list)

    async def start(self) -> str:
        server = grpc.aio.server(interceptors=self.interceptors)
        assert self.setup is not None
        self.setup(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self.server, self.address = server, f"127.0.0.1:{port}"
        return self.address


def planner_app(m: Mesh, mode: str, call_tool: Callable[[bytes], Awaitable[bytes]]) -> AgentApp:
    """The planner agent. `interceptor`: the server runs `InboundContextInterceptor`;
    `context-manager`: the handler wraps its work in `with inbound(context)`."""
    app = AgentApp(interceptors=[InboundContextInterceptor()] if mode == "interceptor" else [])

    async def plan(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        app._seen(context)
        if mode == "interceptor":
            app.contexts.append(current())
            return await call_tool(request)
        with inbound(context) as ctx:
            app.contexts.append(ctx)
            return await call_tool(request)

    app.setup = lambda server: server.add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler(
            "test.Planner", {"Plan": grpc.unary_unary_rpc_method_handler(plan)})
    ])  # fmt: skip
    return app


async def start(m: Mesh, planner: AgentApp, tool: EchoApp | None = None) -> Mesh:
    await m.apply(*MANIFEST)
    await m.add("orchestrator")
    await add_with_app(m, "planner", planner)
    await (add_with_app(m, "tool", tool) if tool else m.add("tool"))
    await m.wait_endpoints("orchestrator", "planner", "tool")
    return m


async def orchestrate(m: Mesh, body: bytes = b"plan this") -> bytes:
    """The orchestrator's app asks the planner, starting a trace."""
    reply, _ = await unary(m.nodes["orchestrator"].outbound, "planner", method=PLAN, body=body,
                           metadata=[("traceparent", TRACEPARENT)])  # fmt: skip
    return reply


def assert_delegated(seen: dict[str, str | bytes]) -> None:
    """What the tool's app got: the depth-2 chain, verified, and the orchestrator's trace."""
    assert seen["trustmesh-caller"] == PLANNER
    assert seen["trustmesh-chain"] == f"{ORCH} > {PLANNER} > {TOOL}"
    assert json.loads(seen["trustmesh-origin"]) == {"agent": ORCH}
    data = seen[METADATA_KEY]
    assert isinstance(data, bytes) and split_chain(data).count == 2
    traceparent = seen["traceparent"]
    assert isinstance(traceparent, str) and traceparent.split("-")[1] == TRACE_ID


@pytest.mark.parametrize("mode", ["interceptor", "context-manager"])
async def test_a_handler_forwards_its_chain_and_trace_through_sidecar_channel(
    mesh: Mesh, mode: str
) -> None:
    async def call_tool(request: bytes) -> bytes:
        async with sidecar_channel("tool", outbound=mesh.nodes["planner"].outbound) as ch:
            reply: bytes = await ch.unary_unary(f"/{ECHO}/Unary")(request, timeout=WAIT)
            return reply

    planner = planner_app(mesh, mode, call_tool)
    await start(mesh, planner)
    assert await orchestrate(mesh, b"step 1") == b"step 1"
    [ctx] = planner.contexts
    assert ctx is not None and ctx.caller == ORCH
    assert ctx.origin is not None and json.loads(ctx.origin) == {"agent": ORCH}
    assert {k for k, _ in ctx.metadata} == {METADATA_KEY, "traceparent"}
    assert_delegated(mesh.nodes["tool"].app.received[-1])

    # Outside any handler there is nothing to forward: a plain direct call.
    assert current() is None
    assert await call_tool(b"alone") == b"alone"
    seen = mesh.nodes["tool"].app.received[-1]
    assert "trustmesh-chain" not in seen and METADATA_KEY not in seen
    assert seen["trustmesh-caller"] == PLANNER


# -- the A2A SDK -----------------------------------------------------------------------------


class ToolServicer(a2a_grpc.A2AServiceServicer):
    """A tiny A2A agent: answers SendMessage, recording the metadata it got."""

    def __init__(self, app: EchoApp) -> None:
        self.app = app

    async def SendMessage(
        self, request: a2a.SendMessageRequest, context: grpc.aio.ServicerContext
    ) -> a2a.SendMessageResponse:
        self.app._seen(context)
        text = "".join(p.text for p in request.message.parts)
        reply = a2a.Message(message_id="reply-1", role=a2a.ROLE_AGENT,
                            parts=[a2a.Part(text=f"done: {text}")])  # fmt: skip
        return a2a.SendMessageResponse(message=reply)


def a2a_tool() -> AgentApp:
    app = AgentApp()
    app.setup = lambda server: a2a_grpc.add_A2AServiceServicer_to_server(ToolServicer(app), server)
    return app


@pytest.mark.parametrize(
    ("url", "agents"),
    [("grpc://tool:50051", None), (TOOL, None), ("https://cards.example/tool", {
        "https://cards.example/tool": "tool"})],
    ids=["host-name", "spiffe-id", "explicit-map"],
)  # fmt: skip
async def test_a2a_grpc_transport_goes_through_the_mesh_with_the_chain(
    mesh: Mesh, url: str, agents: dict[str, str] | None
) -> None:
    async def call_tool(request: bytes) -> bytes:
        factory = a2a_channel_factory(outbound=mesh.nodes["planner"].outbound, agents=agents)
        card = a2a.AgentCard(name="tool", description="a tool", version="1", supported_interfaces=[
            a2a.AgentInterface(url=url, protocol_binding="GRPC")])  # fmt: skip
        transport = GrpcTransport.create(card, url, ClientConfig(grpc_channel_factory=factory))
        try:
            message = a2a.Message(message_id="m-1", role=a2a.ROLE_USER,
                                  parts=[a2a.Part(text=request.decode())])  # fmt: skip
            response: a2a.SendMessageResponse = await transport.send_message(
                a2a.SendMessageRequest(message=message)
            )
        finally:
            await transport.close()
        text: str = response.message.parts[0].text
        return text.encode()

    tool = a2a_tool()
    await start(mesh, planner_app(mesh, "interceptor", call_tool), tool)
    assert await orchestrate(mesh, b"summarise") == b"done: summarise"
    [seen] = tool.received  # the SDK's own call, as the tool's sidecar forwarded it
    assert_delegated(seen)
    assert seen["a2a-version"]


def test_a2a_channel_factory_refuses_a_url_naming_no_agent() -> None:
    with pytest.raises(ValueError, match="cannot tell which agent"):
        a2a_channel_factory(outbound="127.0.0.1:1")("grpc://:50051")
