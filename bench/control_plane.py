"""Measure 6: revocation propagation to many sidecars' watch streams.

A real `RegistryServer` (embedded by `LocalMesh`, in this process) and `watchers`
real watch streams (`bench.watchers`), split over `procs` helper processes: each
stream has its own SVID from its own join token and its own mTLS connection, and
applies updates to its own `Snapshot` exactly as a sidecar does.

One sample: the operator disables a fresh agent with `SetAgentState` over the
registry's mTLS API; the sample is the time from that call returning until the
delta has been applied by every watcher (the slowest of them). `from_call` is the
same from the moment the call was made (the delta may be applied before the
operator hears back, so `from_return` may be small or even negative for a few
watchers). Samples are 200 ms apart; p50 and p99 over samples, and over every
(sample, watcher) pair.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from bench.common import Child, agent_doc, blueprint_doc, manifest, registry_call, summarize
from trustmesh.demo.mesh import LocalMesh

__all__ = ["markdown", "measure"]

TD = "demo.local"


async def measure(
    *, watchers: int, revocations: int, workdir: Path, procs: int = 2
) -> dict[str, Any]:
    mesh = LocalMesh(workdir / "mesh", log_dir=workdir / "logs")
    children: list[Child] = []
    try:
        await mesh.start_registry()
        assert mesh.registry is not None
        docs = [blueprint_doc("bench", ["/bench.Echo/*"])]
        docs += [agent_doc(f"watcher-{i}", TD, "bench") for i in range(watchers)]
        docs += [agent_doc(f"victim-{k}", TD, "bench") for k in range(revocations)]
        await registry_call(lambda: mesh.apply(manifest(docs)))
        groups: list[list[tuple[str, str, str]]] = [[] for _ in range(procs)]
        for i in range(watchers):
            sid = mesh.spiffe_id(f"watcher-{i}")
            data = workdir / "w" / str(i)
            token = await registry_call(lambda sid=sid: mesh.token(sid))  # type: ignore[misc]
            groups[i % procs].append((str(sid), token, str(data)))
        base = {
            "registry": mesh.registry.address,
            "bootstrap": mesh.registry.bootstrap_address,
            "bundle": str(mesh.bundle_path),
            "registry_id": str(mesh.registry.registry_id),
        }
        join_s = 0.0
        for k, group in enumerate(groups):
            config = workdir / f"watchers-{k}.json"
            config.write_text(json.dumps({**base, "identities": group}))
            child, hello = await Child.start(
                f"watchers-{k}", "bench.watchers", str(config), workdir=workdir, timeout=120
            )
            children.append(child)
            join_s = max(join_s, hello["join_s"])
        await asyncio.sleep(0.5)
        from_return: list[float] = []
        from_call: list[float] = []
        per_watcher: list[float] = []
        for k in range(revocations):
            victim = f"victim-{k}"
            t_call = time.monotonic()
            revision = await registry_call(
                lambda victim=victim: mesh.set_disabled(victim, True, "bench revocation")  # type: ignore[misc]
            )
            t_return = time.monotonic()
            reports = await asyncio.gather(
                *(
                    c.request("report", revision=revision, agent=victim, wait_s=10, timeout=30)
                    for c in children
                )
            )
            times = [t for rep in reports for t in rep["times"]]
            disabled = sum(rep["disabled"] for rep in reports)
            if disabled != watchers:
                raise RuntimeError(f"{victim} is disabled at {disabled} of {watchers} watchers")
            from_return.append((max(times) - t_return) * 1e3)
            from_call.append((max(times) - t_call) * 1e3)
            per_watcher += [(t - t_return) * 1e3 for t in times]
            await asyncio.sleep(0.2)
    finally:
        for child in children:
            await child.stop()
        await mesh.stop()
    return {
        "watchers": watchers,
        "processes": procs,
        "revocations": revocations,
        "enroll_s": join_s,
        "all_ms": summarize(from_return),
        "all_from_call_ms": summarize(from_call),
        "per_watcher_ms": summarize(per_watcher),
        "samples_ms": from_return,
    }


def markdown(r: dict[str, Any]) -> str:
    a, c, w = r["all_ms"], r["all_from_call_ms"], r["per_watcher_ms"]
    return (
        f"{r['revocations']} revocations, {r['watchers']} watch streams in {r['processes']} processes\n\n"
        "| revocation applied ... | p50 (ms) | p99 (ms) |\n|---|---|---|\n"
        f"| at all watchers, after SetAgentState returned | {a['p50']:.1f} | {a['p99']:.1f} |\n"
        f"| at all watchers, after SetAgentState was called | {c['p50']:.1f} | {c['p99']:.1f} |\n"
        f"| at one watcher, after SetAgentState returned | {w['p50']:.1f} | {w['p99']:.1f} |\n"
    )
