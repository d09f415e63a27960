"""A placeholder agent for the Kubernetes examples: a plain gRPC server on localhost.

Each example Deployment runs this with AGENT_ROLE set. It knows nothing of mTLS: the
injected sidecar terminates it and forwards allowed calls to 127.0.0.1:$AGENT_PORT.
* planner: serves /demo.Planner/Plan, answering with the caller the sidecar verified.
* orchestrator: serves /demo.Orchestrator/Run, and every AGENT_INTERVAL seconds calls
  the planner through its own sidecar (127.0.0.1:15001, `trustmesh-target: planner`),
  printing the outcome, so that traces appear without any client.
Payloads are JSON; only grpcio is needed (it is in the TrustMesh image).
"""

import asyncio
import json
import os

import grpc

ROLE = os.environ.get("AGENT_ROLE", "planner")
PORT = int(os.environ.get("AGENT_PORT", "50051"))
INTERVAL = float(os.environ.get("AGENT_INTERVAL", "30"))
OUTBOUND = os.environ.get("AGENT_OUTBOUND", "127.0.0.1:15001")


def caller(context: grpc.aio.ServicerContext) -> str:
    md = dict(context.invocation_metadata() or ())
    return str(md.get("trustmesh-caller", "(direct)"))


async def plan(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    task = json.loads(request or b"{}")
    return json.dumps({"planner": "ok", "task": task, "caller": caller(context)}).encode()


async def call_planner(task: dict[str, object]) -> dict[str, object]:
    async with grpc.aio.insecure_channel(OUTBOUND) as channel:
        try:
            reply = await channel.unary_unary("/demo.Planner/Plan")(
                json.dumps(task).encode(), metadata=[("trustmesh-target", "planner")], timeout=5
            )
            return {"ok": True, "reply": json.loads(reply)}
        except grpc.aio.AioRpcError as e:
            return {"ok": False, "code": e.code().name, "details": e.details()}


async def run(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return json.dumps(await call_planner(json.loads(request or b"{}"))).encode()


async def main() -> None:
    server = grpc.aio.server()
    handlers = {
        "planner": ("demo.Planner", {"Plan": grpc.unary_unary_rpc_method_handler(plan)}),
        "orchestrator": ("demo.Orchestrator", {"Run": grpc.unary_unary_rpc_method_handler(run)}),
    }
    service, methods = handlers[ROLE]
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, methods)])
    server.add_insecure_port(f"127.0.0.1:{PORT}")
    await server.start()
    print(f"{ROLE}: serving {service} on 127.0.0.1:{PORT}", flush=True)
    n = 0
    while ROLE == "orchestrator":
        await asyncio.sleep(INTERVAL)
        n += 1
        print(f"orchestrator: task {n}: {await call_planner({'task': n})}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
