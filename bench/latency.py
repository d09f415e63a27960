"""Mesh latency against a direct call, measured side by side in one run.

    python -m bench.latency            # 7 rounds x 400 sequential 1 KiB unary calls
    python -m bench.latency --quick    # what CI runs, so the harness can't rot

Topology (all on loopback): the client and the app live in this process; the mesh
path goes client -> sidecar A (process) -> mTLS -> sidecar B (process) -> app. Rounds
interleave direct and mesh so machine noise hits both alike. Results: JSON and a
Markdown table in bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from trustmesh.demo.mesh import LocalMesh
from trustmesh.v1 import registry_pb2 as rpb

METHOD = "/bench.Echo/Unary"
PAYLOAD = os.urandom(1024)


def _docs() -> list[rpb.ManifestDocument]:
    def doc(kind: str, name: str, spec: dict[str, Any]) -> rpb.ManifestDocument:
        body = {
            "apiVersion": "trustmesh.dev/v1alpha1",
            "kind": kind,
            "metadata": {"name": name},
            "spec": spec,
        }
        return rpb.ManifestDocument(source=f"bench/{name}", json=json.dumps(body))

    return [
        doc("AgentBlueprint", "bench", {"allowedMethods": ["/bench.Echo/*"]}),
        doc(
            "Agent",
            "client",
            {
                "spiffeId": "spiffe://demo.local/agents/client",
                "blueprint": "bench",
                "sponsor": "bench@example.com",
            },
        ),
        doc(
            "Agent",
            "server",
            {
                "spiffeId": "spiffe://demo.local/agents/server",
                "blueprint": "bench",
                "sponsor": "bench@example.com",
            },
        ),
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


async def _echo_server() -> tuple[grpc.aio.Server, str]:
    async def unary(req: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return req

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "bench.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _run(channel: grpc.aio.Channel, metadata: list[tuple[str, str]], n: int) -> list[float]:
    call = channel.unary_unary(METHOD)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await call(PAYLOAD, metadata=metadata, timeout=5)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def main_async(rounds: int, calls: int, out_dir: Path) -> dict[str, Any]:
    server, app = await _echo_server()
    with tempfile.TemporaryDirectory(prefix="tm-bench-") as tmp:
        mesh = LocalMesh(Path(tmp), extra_env={"OTEL_TRACES_EXPORTER": "none"})
        try:
            await mesh.start_registry()
            await mesh.apply(_docs())
            client = await mesh.start_sidecar("client", "127.0.0.1:9")
            await mesh.start_sidecar("server", app)
            direct = grpc.aio.insecure_channel(app)
            via = grpc.aio.insecure_channel(client.outbound)
            md = [("trustmesh-target", "server")]
            await _run(direct, [], 50)  # warm both paths: connections, caches
            await _run(via, md, 50)
            results: dict[str, list[dict[str, float]]] = {"direct": [], "mesh": []}
            for _ in range(rounds):
                for name, ch, meta in (("direct", direct, []), ("mesh", via, md)):
                    lat = await _run(ch, meta, calls)
                    results[name].append({"p50": statistics.median(lat), "p99": _pct(lat, 0.99)})
            await direct.close()
            await via.close()
        finally:
            await mesh.stop()
            await server.stop(0)
    summary: dict[str, Any] = {
        "rounds": rounds,
        "calls_per_round": calls,
        "payload_bytes": len(PAYLOAD),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    for name, rows in results.items():
        summary[name] = {k: statistics.median(r[k] for r in rows) for k in ("p50", "p99")}
    summary["ratio_p50"] = summary["mesh"]["p50"] / summary["direct"]["p50"]
    summary["ratio_p99"] = summary["mesh"]["p99"] / summary["direct"]["p99"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latency.json").write_text(json.dumps(summary, indent=2))
    table = (
        "| path | p50 (ms) | p99 (ms) |\n|---|---|---|\n"
        f"| direct | {summary['direct']['p50']:.3f} | {summary['direct']['p99']:.3f} |\n"
        f"| mesh | {summary['mesh']['p50']:.3f} | {summary['mesh']['p99']:.3f} |\n"
        f"| mesh / direct | {summary['ratio_p50']:.2f}x | {summary['ratio_p99']:.2f}x |\n"
    )
    (out_dir / "latency.md").write_text(table)
    print(table)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="1 round of 30 calls (CI)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    rounds, calls = (1, 30) if args.quick else (args.rounds, args.calls)
    asyncio.run(main_async(rounds, calls, Path(args.out)))


if __name__ == "__main__":
    main()
