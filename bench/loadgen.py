"""The load generator: the benchmark's client, in its own process.

Driven by the harness over JSON lines (`bench.common.Child`). It only makes calls
and times them, so nothing else (the registry, the sidecars' log drains) shares its
event loop. The same code drives every path; only the address and the metadata
differ (`trustmesh-target` for the mesh). Channels use a local subchannel pool so
that a "fresh" channel really opens a new connection instead of sharing one.

Ops (all bounded by a count and a deadline):
    unary       n sequential calls      -> {"ms": [latency per call]}
    concurrent  `calls` calls, `inflight` at a time -> {"done", "errors", "elapsed_s"}
    stream      one server stream of `messages` x `size` bytes -> {"bytes", "elapsed_s"}
    first_call  a brand-new channel: first call, then `warm` calls
                -> {"first_ms", "warm_ms", "failed": [UNAVAILABLE attempts before the first success]}
    probe       one call, the reply decoded as JSON -> {"reply": {...}}
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import grpc

from bench.common import serve

UNARY = "/bench.Echo/Unary"
STREAM = "/bench.Echo/ServerStream"
_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


class Loadgen:
    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._payloads: dict[int, bytes] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address, _OPTIONS)
        return channel

    def _payload(self, size: int) -> bytes:
        return self._payloads.setdefault(size, os.urandom(size))

    async def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg["op"]
        md = [tuple(kv) for kv in msg.get("md", [])]
        if op == "unary":
            return await self.unary(
                msg["address"], md, msg["n"], msg.get("size", 1024), msg.get("method", UNARY)
            )
        if op == "concurrent":
            return await self.concurrent(
                msg["address"],
                md,
                msg["calls"],
                msg["inflight"],
                msg.get("size", 1024),
                msg.get("deadline_s", 60.0),
            )
        if op == "stream":
            return await self.stream(msg["address"], md, msg["messages"], msg["size"])
        if op == "first_call":
            return await self.first_call(msg["address"], md, msg["warm"], msg.get("size", 1024))
        if op == "probe":
            channel = self._channel(msg["address"])
            reply = await channel.unary_unary(msg["method"])(b"", metadata=md, timeout=10)
            return {"reply": json.loads(reply or b"{}")}
        raise ValueError(f"unknown op {op!r}")

    async def unary(
        self, address: str, md: list[Any], n: int, size: int, method: str
    ) -> dict[str, Any]:
        call = self._channel(address).unary_unary(method)
        payload = self._payload(size)
        out = []
        for _ in range(n):
            t = time.perf_counter()
            await call(payload, metadata=md, timeout=5)
            out.append((time.perf_counter() - t) * 1e3)
        return {"ms": out}

    async def concurrent(
        self, address: str, md: list[Any], calls: int, inflight: int, size: int, deadline_s: float
    ) -> dict[str, Any]:
        call = self._channel(address).unary_unary(UNARY)
        payload = self._payload(size)
        left = calls
        done = errors = 0
        first_error = ""
        stop_at = time.perf_counter() + deadline_s

        async def worker() -> None:
            nonlocal left, done, errors, first_error
            while left > 0 and time.perf_counter() < stop_at:
                left -= 1
                try:
                    await call(payload, metadata=md, timeout=10)
                    done += 1
                except grpc.aio.AioRpcError as e:
                    errors += 1
                    first_error = first_error or f"{e.code().name}: {e.details()}"

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        elapsed = time.perf_counter() - start
        return {"done": done, "errors": errors, "elapsed_s": elapsed, "first_error": first_error}

    async def stream(self, address: str, md: list[Any], messages: int, size: int) -> dict[str, Any]:
        call = self._channel(address).unary_stream(STREAM)
        total = count = 0
        start = time.perf_counter()
        async for message in call(f"{messages},{size}".encode(), metadata=md, timeout=120):
            total += len(message)
            count += 1
        elapsed = time.perf_counter() - start
        if count != messages:
            raise RuntimeError(f"stream ended after {count} of {messages} messages")
        return {"bytes": total, "messages": count, "elapsed_s": elapsed}

    async def first_call(self, address: str, md: list[Any], warm: int, size: int) -> dict[str, Any]:
        payload = self._payload(size)
        failed: list[str] = []
        async with grpc.aio.insecure_channel(address, _OPTIONS) as channel:
            call = channel.unary_unary(UNARY)
            t = time.perf_counter()
            # A caller that retries UNAVAILABLE: `first_ms` runs to the first success and
            # `failed` says what failed before it (bounded: 3 attempts).
            for attempt in range(3):
                try:
                    await call(payload, metadata=md, timeout=10)
                    break
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == 2:
                        raise
                    failed.append(f"{e.code().name}: {e.details()}"[:200])
            first = (time.perf_counter() - t) * 1e3
            warm_ms = []
            for _ in range(warm):
                t = time.perf_counter()
                await call(payload, metadata=md, timeout=5)
                warm_ms.append((time.perf_counter() - t) * 1e3)
        return {"first_ms": first, "warm_ms": warm_ms, "failed": failed}

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


async def main() -> None:
    gen = Loadgen()
    try:
        await serve({"pid": os.getpid()}, gen.handle)
    finally:
        await gen.close()


if __name__ == "__main__":
    asyncio.run(main())
