"""An OTLP/gRPC trace sink for the tracing measure: `trustmesh.demo.otlp_receiver`
in its own process, so receiving spans does not share the load generator's or the
harness's event loop (a collector runs elsewhere too). Answers `count`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench.common import serve
from trustmesh.demo.otlp_receiver import OtlpReceiver


async def main() -> None:
    receiver = OtlpReceiver()
    endpoint = await receiver.start("127.0.0.1:0")
    received = 0

    async def handle(msg: dict[str, Any]) -> dict[str, Any]:
        nonlocal received
        if msg["op"] != "count":
            raise ValueError(f"unknown op {msg['op']!r}")
        received += len(receiver.spans)
        receiver.spans.clear()  # keep the count, not the spans
        return {"spans": received}

    try:
        await serve({"endpoint": endpoint}, handle)
    finally:
        await receiver.stop()


if __name__ == "__main__":
    asyncio.run(main())
