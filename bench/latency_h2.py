"""The frame-level engine against the grpcio engine and a direct call, in one run.

    python -m bench.latency_h2                # 7 rounds: 300 sequential + 2000 at 32 in flight
    python -m bench.latency_h2 --quick        # 1 short round (smoke)
    python -m bench.latency_h2 --no-grpc --tree base=/tmp/base   # A/B against other code

`--tree LABEL=DIR` adds the path `mesh-h2-LABEL`: an h2 mesh whose sidecar processes
import trustmesh from DIR (a copy of the repository, e.g. of the previous commit)
instead of this checkout, so two versions are measured side by side in one run.

Topology as in bench/latency.py (all on loopback): the client and the echo app live in
this process; each mesh path goes client -> sidecar A (process) -> mTLS -> sidecar B
(process) -> app. Two meshes run side by side, one per engine; the sidecar processes
of each mesh get their engine through `TRUSTMESH_ENGINE` (and, for older code given
with `--tree`, a `sitecustomize` that swaps `trustmesh_sidecar.runtime.GrpcEngine`).
Rounds interleave the three paths so machine noise hits them alike; the summary is
the median over rounds. Results: JSON and Markdown in bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import grpc

from bench.common import order_of_round
from bench.inproc import (
    PAYLOAD,
    cpu_seconds,
    echo_server,
    mesh_docs,
    pct,
    sequential,
    throughput,
)
from trustmesh.demo.mesh import LocalMesh

_SITECUSTOMIZE = """
import os
if os.environ.get("TRUSTMESH_BENCH_ENGINE") == "h2":
    import trustmesh_sidecar.runtime as _runtime
    from trustmesh_sidecar.h2 import H2Engine
    _runtime.GrpcEngine = H2Engine
"""


async def _mesh(
    root: Path, app: str, engine: str, site: Path, tree: Path | None = None
) -> tuple[LocalMesh, str]:
    # TRUSTMESH_ENGINE selects the engine; the sitecustomize swap covers trees from
    # before the sidecar could select one.
    env = {
        "OTEL_TRACES_EXPORTER": "none",
        "TRUSTMESH_ENGINE": engine,
        "TRUSTMESH_BENCH_ENGINE": engine,
    }
    code = [str(tree), str(tree / "sidecar"), str(tree / "registry")] if tree else []
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(site), *code, os.environ.get("PYTHONPATH")])
    )
    mesh = LocalMesh(root, extra_env=env, log_dir=root / "logs")
    await mesh.start_registry()
    await mesh.apply(mesh_docs())
    client = await mesh.start_sidecar("client", "127.0.0.1:9")
    await mesh.start_sidecar("server", app)
    return mesh, client.outbound


async def main_async(
    rounds: int,
    calls: int,
    tput_calls: int,
    inflight: int,
    out_dir: Path,
    *,
    trees: dict[str, Path] | None = None,
    grpc_engine: bool = True,
) -> dict[str, Any]:
    server, app = await echo_server()
    meshes: list[LocalMesh] = []
    with tempfile.TemporaryDirectory(prefix="tm-bench-h2-") as tmp:
        site = Path(tmp) / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        try:
            paths: dict[str, tuple[grpc.aio.Channel, list[tuple[str, str]]]] = {
                "direct": (grpc.aio.insecure_channel(app), [])
            }
            pids: dict[str, list[int]] = {"direct": []}
            meshes_wanted: list[tuple[str, str, Path | None]] = [
                *([("mesh-grpc", "grpc", None)] if grpc_engine else []),
                ("mesh-h2", "h2", None),
                *((f"mesh-h2-{label}", "h2", tree) for label, tree in (trees or {}).items()),
            ]
            for name, engine, tree in meshes_wanted:
                mesh, outbound = await _mesh(Path(tmp) / name, app, engine, site, tree)
                meshes.append(mesh)
                pids[name] = [sc.process.pid for sc in mesh.sidecars.values()]
                paths[name] = (
                    grpc.aio.insecure_channel(outbound),
                    [("trustmesh-target", "server")],
                )
            for ch, md in paths.values():  # warm: connections, caches
                await sequential(ch, md, 50)
            rows: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
            for r in range(rounds):
                for name in order_of_round(list(paths), r):  # balanced orders (common.py)
                    ch, md = paths[name]
                    cpu = cpu_seconds(pids[name])
                    lat = await sequential(ch, md, calls)
                    cpu_seq = cpu_seconds(pids[name]) - cpu
                    rate = await throughput(ch, md, tput_calls, inflight)
                    cpu_tput = cpu_seconds(pids[name]) - cpu - cpu_seq
                    rows[name].append(
                        {
                            "p50": statistics.median(lat),
                            "p99": pct(lat, 0.99),
                            "rps": rate,
                            # CPU of the path's sidecar processes per call (both
                            # sidecars together): steadier than latency on a busy host.
                            "cpu_us": cpu_seq / calls * 1e6,
                            "cpu_us_tput": cpu_tput / tput_calls * 1e6,
                        }
                    )
            for ch, _ in paths.values():
                await ch.close()
        finally:
            for mesh in meshes:
                await mesh.stop()
            await server.stop(0)
    summary: dict[str, Any] = {
        "rounds": rounds,
        "calls_per_round": calls,
        "throughput_calls": tput_calls,
        "inflight": inflight,
        "payload_bytes": len(PAYLOAD),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    for name, values in rows.items():
        summary[name] = {
            k: statistics.median(r[k] for r in values)
            for k in ("p50", "p99", "rps", "cpu_us", "cpu_us_tput")
        }
    direct = summary["direct"]
    lines = [
        "| path | p50 (ms) | p99 (ms) | calls/s at 32 in flight | p50 / direct "
        "| p99 / direct | throughput / direct | sidecar CPU µs/call (sequential, 32 in flight) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in rows:
        s = summary[name]
        s["ratio_p50"] = s["p50"] / direct["p50"]
        s["ratio_p99"] = s["p99"] / direct["p99"]
        s["ratio_rps"] = s["rps"] / direct["rps"]
        lines.append(
            f"| {name} | {s['p50']:.3f} | {s['p99']:.3f} | {s['rps']:.0f} | "
            f"{s['ratio_p50']:.2f}x | {s['ratio_p99']:.2f}x | {s['ratio_rps']:.2f}x | "
            f"{s['cpu_us']:.0f}, {s['cpu_us_tput']:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latency_h2.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "latency_h2.md").write_text(table)
    print(table)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--throughput-calls", type=int, default=2000)
    parser.add_argument("--inflight", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="1 round of 30 + 200 calls")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="also measure an h2 mesh running the code in DIR, as path mesh-h2-LABEL",
    )
    parser.add_argument("--no-grpc", action="store_true", help="leave out the grpcio mesh")
    args = parser.parse_args()
    trees: dict[str, Path] = {}
    for spec in args.tree:
        label, sep, where = spec.partition("=")
        tree = Path(where).resolve()
        if not sep or not label or not (tree / "trustmesh").is_dir():
            parser.error(f"--tree wants LABEL=DIR with DIR/trustmesh in it, got {spec!r}")
        trees[label] = tree
    rounds, calls, tput = (
        (1, 30, 200) if args.quick else (args.rounds, args.calls, args.throughput_calls)
    )
    asyncio.run(
        main_async(
            rounds,
            calls,
            tput,
            args.inflight,
            Path(args.out),
            trees=trees,
            grpc_engine=not args.no_grpc,
        )
    )


if __name__ == "__main__":
    main()
