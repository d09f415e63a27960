"""The benchmark's app: a plain gRPC server in its own process (`bench.Echo`).

    Unary         echoes the request bytes
    ServerStream  request b"COUNT,SIZE": COUNT messages of SIZE bytes
    Probe         the trustmesh-* text headers it received, as JSON (nothing else)
    Relay         calls onward, as an agent in the middle of a chain would: header
                  `x-bench-relay: ADDRESS|TARGET|METHOD`, copying an incoming
                  `trustmesh-delegation-bin` into the onward call (docs/delegation.md)

It runs as a separate process so that the load generator's event loop measures
and does nothing else. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc

from bench.common import serve

DELEGATION = "trustmesh-delegation-bin"
_MAX_STREAM = 1 << 16  # messages in one stream: a bound, not a target


class Echo:
    def __init__(self) -> None:
        self._onward: dict[str, grpc.aio.Channel] = {}
        self._blobs: dict[int, bytes] = {}

    async def unary(self, req: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return req

    async def server_stream(
        self, req: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        count, size = (int(x) for x in req.decode().split(","))
        blob = self._blobs.setdefault(size, b"\x5a" * size)
        for _ in range(min(count, _MAX_STREAM)):
            yield blob

    async def probe(self, req: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen = {
            k: v
            for k, v in context.invocation_metadata() or ()
            if k.startswith("trustmesh-") and isinstance(v, str)
        }
        return json.dumps(seen).encode()

    async def relay(self, req: bytes, context: grpc.aio.ServicerContext) -> bytes:
        md = list(context.invocation_metadata() or ())
        spec = next((v for k, v in md if k == "x-bench-relay"), "")
        address, target, method = str(spec).split("|")
        onward: list[tuple[str, str | bytes]] = [("trustmesh-target", target)] if target else []
        onward += [(k, v) for k, v in md if k == DELEGATION]
        channel = self._onward.get(address)
        if channel is None:
            channel = self._onward[address] = grpc.aio.insecure_channel(address)
        reply: bytes = await channel.unary_unary(method)(req, metadata=onward, timeout=5)
        return reply

    def handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "bench.Echo",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
                "Probe": grpc.unary_unary_rpc_method_handler(self.probe),
                "Relay": grpc.unary_unary_rpc_method_handler(self.relay),
            },
        )

    async def close(self) -> None:
        for channel in self._onward.values():
            await channel.close()


async def main() -> None:
    echo = Echo()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([echo.handlers()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    async def handle(msg: dict[str, object]) -> dict[str, object]:
        raise ValueError(f"unknown op {msg.get('op')!r}")

    try:
        await serve({"address": f"127.0.0.1:{port}"}, handle)
    finally:
        await echo.close()
        await server.stop(0)


if __name__ == "__main__":
    asyncio.run(main())
