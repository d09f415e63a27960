"""Measure 4: the cost of a first call to a new peer, against a warm call.

Each sample starts a fresh peer sidecar `peer-i` (a registered agent the client
sidecar has never called) in front of the echo app, waits until the client sidecar's
snapshot holds its endpoint, then, from the load generator:

* mesh: a brand-new channel to the client sidecar, first call to `peer-i` (new
  loopback connection, new TLS bridge route, mTLS handshake with SPIFFE ID checks,
  the peer's first decision and its new channel to the app), then `warm` calls on
  the same channel;
* direct: a brand-new channel to the app, first call (TCP + HTTP/2 set-up), then
  `warm` calls.

A first call that fails with UNAVAILABLE is retried (at most twice) and counted; its
time runs to the first success. The peer is stopped after its sample. Figures are
medians over samples of the first call and of each sample's median warm call; the
order of mesh and direct is balanced (`common.order_of_round`).
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.common import order_of_round
from bench.topology import BenchMesh

__all__ = ["markdown", "measure"]


async def measure(bm: BenchMesh, *, samples: int, warm: int = 20) -> dict[str, Any]:
    if samples > bm.peers:
        raise ValueError(f"{samples} samples need {samples} peers; BenchMesh has {bm.peers}")
    first: dict[str, list[float]] = {"mesh": [], "direct": []}
    warm_ms: dict[str, list[float]] = {"mesh": [], "direct": []}
    failed: dict[str, list[str]] = {"mesh": [], "direct": []}
    client = bm.sidecar("client").outbound
    for i in range(samples):
        peer = f"peer-{i}"
        await bm.start_sidecar(peer)
        try:
            await bm.wait_synced("client")
            paths = {
                "mesh": (client, [("trustmesh-target", peer)]),
                "direct": (bm.app_address, []),
            }
            for name in order_of_round(list(paths), i):
                address, md = paths[name]
                got = await bm.gen.request("first_call", address=address, md=md, warm=warm)
                first[name].append(got["first_ms"])
                warm_ms[name].append(statistics.median(got["warm_ms"]))
                failed[name] += got["failed"]
        finally:
            await bm.stop_sidecar(peer)
    out: dict[str, Any] = {"samples": samples, "warm_calls": warm}
    for name in ("mesh", "direct"):
        f, w = statistics.median(first[name]), statistics.median(warm_ms[name])
        out[name] = {
            "first_ms": f,
            "warm_ms": w,
            "ratio": f / w,
            "first_samples": first[name],
            "first_attempts_failed": len(failed[name]),
            "failures": failed[name][:3],
        }
    return out


def markdown(r: dict[str, Any]) -> str:
    lines = ["| path | first call (ms) | warm call (ms) | first / warm |", "|---|---|---|---|"]
    for name, label in (("mesh", "mesh, new peer"), ("direct", "direct, new channel")):
        m = r[name]
        lines.append(f"| {label} | {m['first_ms']:.2f} | {m['warm_ms']:.3f} | {m['ratio']:.1f}x |")
    for name in ("mesh", "direct"):
        if r[name]["first_attempts_failed"]:
            lines.append(
                f"\n{name}: {r[name]['first_attempts_failed']} first calls failed and were "
                f"retried (first_ms includes them); e.g. {r[name]['failures'][0]}"
            )
    return "\n".join(lines) + "\n"
