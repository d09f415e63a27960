"""Measure 1: 1 KiB unary calls, sequential: mesh against direct, tracing on against off.

    python -m bench.latency            # 7 rounds x 400 sequential 1 KiB unary calls
    python -m bench.latency --quick    # 1 round of 30 (a smoke test)

Paths, all from the same load generator process to the same echo app process:
    direct       loadgen -> app (plaintext)
    mesh         loadgen -> sidecar client -> mTLS -> sidecar server -> app
    mesh_traced  the same through a second pair of sidecars exporting every span over
                 OTLP/gRPC (BatchSpanProcessor, 200 ms schedule) to a sink process
    [slot]       delegation chain of depth 2: see `bench.delegation_slot`

"Tracing off" is the sidecars' default without an OTLP endpoint
(`OTEL_TRACES_EXPORTER=none`): the SDK still creates spans but exports none.
Every round measures every path, in a balanced order (`common.order_of_round`: each
path in each position and after each other path equally often), so machine noise hits
them alike; figures are medians over rounds of each round's p50 and p99. After the
traced path, the harness waits until the sink has every span of it (its sidecars
export every 200 ms): otherwise the export of its last spans, and the sink's parsing
of them, ran during whichever path came next, and with two cores that is where a p99
went (2.7-2.8x in two full runs, against 1.6-1.9x once drained). Each round's figures,
its order and the hypervisor's steal of CPU time are in the JSON (`per_round`,
`cpu_steal_fraction`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from bench import delegation_slot
from bench.common import (
    Child,
    cpu_times,
    machine,
    median_of,
    order_of_round,
    steal_fraction,
    summarize,
)
from bench.topology import BenchMesh

__all__ = ["markdown", "measure"]

UNARY = "/bench.Echo/Unary"
WARMUP = 50
SPANS_PER_CALL = 2  # a traced call: one span from each of the two sidecars
DRAIN_TIMEOUT_S = 5.0


async def _drained(sink: Child, expected: int) -> int:
    """Wait until the sink has `expected` spans (or `DRAIN_TIMEOUT_S` passed); the count."""
    deadline = asyncio.get_running_loop().time() + DRAIN_TIMEOUT_S
    while True:
        spans = int((await sink.request("count"))["spans"])
        if spans >= expected or asyncio.get_running_loop().time() > deadline:
            return spans
        await asyncio.sleep(0.02)


async def measure(bm: BenchMesh, *, rounds: int, calls: int, workdir: Path) -> dict[str, Any]:
    sink, hello = await Child.start("otlp-sink", "bench.otlp_sink", workdir=workdir)
    try:
        await bm.start_sidecar("client-traced", otlp_endpoint=hello["endpoint"])
        await bm.start_sidecar("server-traced", otlp_endpoint=hello["endpoint"])
        await bm.wait_synced("client-traced")
        paths: dict[str, tuple[str, list[tuple[str, str]], str]] = {
            "direct": (bm.app_address, [], UNARY),
            "mesh": (bm.sidecar("client").outbound, [("trustmesh-target", "server")], UNARY),
            "mesh_traced": (
                bm.sidecar("client-traced").outbound,
                [("trustmesh-target", "server-traced")],
                UNARY,
            ),
        }
        slot = await delegation_slot.prepare(bm)
        paths.update(slot.paths)
        for address, md, method in paths.values():  # connections, caches, JIT-free warm-up
            await bm.gen.request("unary", address=address, md=md, n=WARMUP, method=method)
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
        orders: list[list[str]] = []
        traced_calls = WARMUP
        times = cpu_times()
        for r in range(rounds):
            orders.append(order_of_round(list(paths), r))
            for name in orders[-1]:
                address, md, method = paths[name]
                got = await bm.gen.request(
                    "unary", address=address, md=md, n=calls, method=method, timeout=calls * 5 + 30
                )
                rows[name].append(summarize(got["ms"]))
                if name == "mesh_traced":
                    # Its sidecars export what is left of its spans (every 200 ms) before
                    # the next path starts, not while it is measured.
                    traced_calls += calls
                    await _drained(sink, SPANS_PER_CALL * traced_calls)
        steal = steal_fraction(times, cpu_times())
        spans = await _drained(sink, SPANS_PER_CALL * traced_calls)
    finally:
        for name in ("client-traced", "server-traced", "planner", "tool"):
            await bm.stop_sidecar(name)
        await sink.stop()
    result: dict[str, Any] = {"rounds": rounds, "calls_per_round": calls, "payload_bytes": 1024}
    # Each round's figures and order, and the share of CPU time the host took from this
    # machine (steal) while the rounds ran: a slow run can be told from a slow path.
    result["per_round"] = {"orders": orders, **rows}
    result["cpu_steal_fraction"] = steal
    result["paths"] = {
        name: {"p50": median_of(r, "p50"), "p99": median_of(r, "p99")} for name, r in rows.items()
    }
    p = result["paths"]
    result["ratio_p50"] = p["mesh"]["p50"] / p["direct"]["p50"]
    result["ratio_p99"] = p["mesh"]["p99"] / p["direct"]["p99"]
    result["tracing"] = {
        "ratio_p50": p["mesh_traced"]["p50"] / p["mesh"]["p50"],
        "ratio_p99": p["mesh_traced"]["p99"] / p["mesh"]["p99"],
        "spans_received": spans,
    }
    if slot.available:
        result["delegation"] = {
            "status": "measured",
            "ratio_p50": p["delegated"]["p50"] / p["relay_direct"]["p50"],
            "ratio_p99": p["delegated"]["p99"] / p["relay_direct"]["p99"],
        }
    else:
        result["delegation"] = {"status": slot.status}
    return result


def markdown(r: dict[str, Any]) -> str:
    p = r["paths"]
    lines = ["| path | p50 (ms) | p99 (ms) |", "|---|---|---|"]
    for name, label in (
        ("direct", "direct (loadgen -> app)"),
        ("mesh", "mesh (loadgen -> sidecar -> mTLS -> sidecar -> app)"),
        ("mesh_traced", "mesh, tracing on (OTLP export)"),
        ("relay_direct", "[slot] 2 hops, direct relay"),
        ("delegated", "[slot] 2 hops, mesh, delegation chain depth 2"),
    ):
        if name in p:
            lines.append(f"| {label} | {p[name]['p50']:.3f} | {p[name]['p99']:.3f} |")
    lines.append(f"| **mesh / direct** | **{r['ratio_p50']:.2f}x** | **{r['ratio_p99']:.2f}x** |")
    t = r["tracing"]
    lines.append(f"| tracing on / off (mesh) | {t['ratio_p50']:.2f}x | {t['ratio_p99']:.2f}x |")
    d = r["delegation"]
    if d["status"] == "measured":
        lines.append(
            f"| [slot] delegated / direct relay | {d['ratio_p50']:.2f}x | {d['ratio_p99']:.2f}x |"
        )
    else:
        lines.append(f"| [slot] delegation chain depth 2 | {d['status']} | |")
    return "\n".join(lines) + "\n"


async def main_async(rounds: int, calls: int, out_dir: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tm-bench-") as tmp:
        async with BenchMesh(Path(tmp)) as bm:
            result = await measure(bm, rounds=rounds, calls=calls, workdir=Path(tmp))
    result["machine"] = machine()
    table = markdown(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latency.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "latency.md").write_text(table)
    print(table)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="1 round of 30 calls (CI)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    rounds, calls = (1, 30) if args.quick else (args.rounds, args.calls)
    asyncio.run(main_async(rounds, calls, Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
