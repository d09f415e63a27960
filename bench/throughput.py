"""Measures 2 and 3, and the sidecars' memory under load (part of measure 7).

2. 32 calls in flight (1 KiB unary): calls/s, mesh against direct.
3. One server stream of 64 KiB messages per round: MB/s (10**6 bytes/s), mesh
   against direct.
7. Sidecar RSS: idle (read by `BenchMesh.start`, before any traffic) and under load
   (the peak of /proc/<pid>/status VmRSS, polled every 20 ms during the mesh rounds
   of both loads), for the client and the server sidecar.

Same topology as the latency measure (`bench.topology`); each round runs both paths
in a balanced order (`common.order_of_round`); figures are medians over rounds.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.common import RssSampler, order_of_round
from bench.topology import BenchMesh

__all__ = ["markdown", "measure"]

MSG = 64 * 1024


def _paths(bm: BenchMesh) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    return {
        "direct": (bm.app_address, []),
        "mesh": (bm.sidecar("client").outbound, [("trustmesh-target", "server")]),
    }


async def measure(
    bm: BenchMesh, *, rounds: int, calls: int, messages: int, inflight: int = 32
) -> dict[str, Any]:
    paths = _paths(bm)
    sampler = RssSampler({n: bm.sidecar(n).process.pid for n in ("client", "server")})
    deadline = max(30.0, calls / 50)  # a floor of 50 calls/s before a round gives up
    for address, md in paths.values():  # warm-up
        await bm.gen.request(
            "concurrent",
            address=address,
            md=md,
            calls=min(calls, 200),
            inflight=inflight,
            timeout=deadline + 30,
        )
        await bm.gen.request(
            "stream", address=address, md=md, messages=min(messages, 16), size=MSG, timeout=120
        )
    rate: dict[str, list[float]] = {n: [] for n in paths}
    mbps: dict[str, list[float]] = {n: [] for n in paths}
    errors = 0
    first_error = ""
    for r in range(rounds):
        for name in order_of_round(list(paths), r):
            address, md = paths[name]
            with sampler.during(name == "mesh"):
                got = await bm.gen.request(
                    "concurrent",
                    address=address,
                    md=md,
                    calls=calls,
                    inflight=inflight,
                    deadline_s=deadline,
                    timeout=deadline + 30,
                )
            rate[name].append(got["done"] / got["elapsed_s"])
            errors += got["errors"]
            first_error = first_error or got["first_error"]
        for name in order_of_round(list(paths), r):
            address, md = paths[name]
            with sampler.during(name == "mesh"):
                got = await bm.gen.request(
                    "stream", address=address, md=md, messages=messages, size=MSG, timeout=300
                )
            mbps[name].append(got["bytes"] / got["elapsed_s"] / 1e6)
    calls_s = {n: statistics.median(v) for n, v in rate.items()}
    stream = {n: statistics.median(v) for n, v in mbps.items()}
    return {
        "rounds": rounds,
        "inflight": inflight,
        "calls_per_round": calls,
        "calls_per_s": calls_s,
        "ratio": calls_s["mesh"] / calls_s["direct"],
        "errors": errors,
        "first_error": first_error,
        "stream": {
            "message_bytes": MSG,
            "messages_per_round": messages,
            "mb_per_s": stream,
            "ratio": stream["mesh"] / stream["direct"],
        },
        "sidecar_rss_mb": {"idle": dict(bm.idle_rss), "load": dict(sampler.peak)},
    }


def markdown(r: dict[str, Any]) -> str:
    c, s = r["calls_per_s"], r["stream"]["mb_per_s"]
    rss = r["sidecar_rss_mb"]
    lines = [
        "| path | calls/s (32 in flight, 1 KiB) | stream MB/s (64 KiB messages) |",
        "|---|---|---|",
        f"| direct | {c['direct']:.0f} | {s['direct']:.1f} |",
        f"| mesh | {c['mesh']:.0f} | {s['mesh']:.1f} |",
        f"| **mesh / direct** | **{r['ratio']:.2f}x** | **{r['stream']['ratio']:.2f}x** |",
        "",
        "| sidecar | RSS idle (MB) | RSS peak under load (MB) |",
        "|---|---|---|",
    ]
    for name in ("client", "server"):
        lines.append(
            f"| {name} | {rss['idle'].get(name, 0):.1f} | {rss['load'].get(name, 0):.1f} |"
        )
    if r["errors"]:
        lines.append(f"\n{r['errors']} calls failed under load; first: {r['first_error']}")
    return "\n".join(lines) + "\n"
