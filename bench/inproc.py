"""Pieces shared by the benchmarks that run their client and echo app in-process
(`latency_h2.py`, `grpc_floor.py`): the mesh's documents, the echo server, timed
sequential and concurrent unary calls, and a process's CPU time."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import grpc

from trustmesh.v1 import registry_pb2 as rpb

__all__ = ["METHOD", "PAYLOAD", "cpu_seconds", "echo_server", "mesh_docs", "pct", "sequential",
           "throughput"]  # fmt: skip

METHOD = "/bench.Echo/Unary"
PAYLOAD = os.urandom(1024)


def mesh_docs() -> list[rpb.ManifestDocument]:
    """A blueprint, agents `client` and `server`, and a policy letting client call server."""

    def doc(kind: str, name: str, spec: dict[str, Any]) -> rpb.ManifestDocument:
        body = {"apiVersion": "trustmesh.dev/v1alpha1", "kind": kind,
                "metadata": {"name": name}, "spec": spec}  # fmt: skip
        return rpb.ManifestDocument(source=f"bench/{name}", json=json.dumps(body))

    def agent(name: str) -> rpb.ManifestDocument:
        return doc(
            "Agent",
            name,
            {
                "spiffeId": f"spiffe://demo.local/agents/{name}",
                "blueprint": "bench",
                "sponsor": "bench@example.com",
            },
        )

    return [
        doc("AgentBlueprint", "bench", {"allowedMethods": ["/bench.Echo/*"]}),
        agent("client"),
        agent("server"),
        doc(
            "AccessPolicy",
            "bench",
            {
                "callers": [{"name": "client"}],
                "callees": [{"name": "server"}],
                "methods": ["/bench.Echo/*"],
            },
        ),
    ]


async def echo_server() -> tuple[grpc.aio.Server, str]:
    """`bench.Echo/Unary` on 127.0.0.1, in this process; returns it and its address."""

    async def unary(req: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return req

    server = grpc.aio.server()
    handlers = {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Echo", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def sequential(
    channel: grpc.aio.Channel, metadata: list[tuple[str, str]], n: int
) -> list[float]:
    """`n` 1 KiB unary calls one after another; each one's latency in ms."""
    call = channel.unary_unary(METHOD)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await call(PAYLOAD, metadata=metadata, timeout=5)
        out.append((time.perf_counter() - t) * 1e3)
    return out


async def throughput(
    channel: grpc.aio.Channel, metadata: list[tuple[str, str]], n: int, inflight: int
) -> float:
    """Calls per second for `n` 1 KiB unary calls, `inflight` at a time."""
    call = channel.unary_unary(METHOD)
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call(PAYLOAD, metadata=metadata, timeout=10)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return n / (time.perf_counter() - start)


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far (Linux /proc; 0 elsewhere)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")
