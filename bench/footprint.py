"""Measure 7 (registry side): registry RSS, full snapshot size, one-agent push time.

For each size (1,000 and 100,000 agents) a helper process (`python -m bench.footprint
--probe N DIR`) runs a real `RegistryServer` (SQLite store, mTLS listeners) and:

1. loads N agents and the policy mix of `bench.decisions` through
   `RegistryState.apply` in batches of 1,000 documents (the most one Apply takes);
2. reads its own VmRSS (after a collection) and builds the full snapshot a new
   sidecar would receive: its size in bytes and the time to build it;
3. checks whether that full snapshot can cross the wire: a real watch stream
   (join token, SVID, mTLS through the TLS bridge) asks for it from revision 0;
4. opens a second watch stream resumed at the current (epoch, revision), so only
   deltas flow, with a client `Snapshot` built from the full snapshot in-process.

Then, per `push` request, it changes one agent (one attribute) with
`RegistryState.apply` and times: the apply itself, the delta's receipt by the
watcher, and the delta applied to the client snapshot. The harness alternates the
two sizes sample by sample, so the 100k / 1k ratio is measured side by side.
(Sidecar RSS is read by the throughput measure from the LocalMesh processes.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from bench.common import (
    Child,
    agent_doc,
    blueprint_doc,
    order_of_round,
    policy_doc,
    rss_mb,
    serve,
    summarize,
)
from trustmesh.channels import MeshChannels
from trustmesh.limits import DEFAULT_LIMITS
from trustmesh.snapshot import Snapshot
from trustmesh.spiffe_id import TrustDomain
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.v1 import registry_pb2_grpc as rgrpc
from trustmesh_registry.datadir import DataDir
from trustmesh_registry.server import RegistryServer, ServeConfig
from trustmesh_registry.state import RegistryState
from trustmesh_sidecar.credentials import RegistryCredentials
from trustmesh_sidecar.state import system_clock

__all__ = ["markdown", "measure"]

TD = "bench.local"
BATCH = 1000
PUSHED = "a-3"


def _attrs(i: int, **extra: str) -> dict[str, str]:
    return {"team": f"t{i % 16}", "env": "prod" if i % 2 else "dev", **extra}


def load(state: RegistryState, n: int) -> int:
    """N agents and the policy mix of bench.decisions; returns the policy count."""
    docs: list[dict[str, Any]] = [blueprint_doc(f"bp-{k}", ["/bench.Svc/*"]) for k in range(8)]
    policies = 0
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        state.apply([("bench", d) for d in pending])
        pending.clear()

    state.apply([("bench", d) for d in docs])
    for i in range(n):
        pending.append(agent_doc(f"a-{i}", TD, f"bp-{i % 8}", _attrs(i)))
        if i % 2:
            pending.append(
                policy_doc(
                    f"pair-{i - 1}",
                    [{"name": f"a-{i - 1}"}],
                    [{"spiffeId": f"spiffe://{TD}/agents/a-{i}"}],
                    ["/bench.Svc/*"],
                )
            )
            policies += 1
        if len(pending) >= BATCH - 1:
            flush()
    for t in range(16):
        pending.append(
            policy_doc(
                f"team-{t}",
                [{"attributes": {"team": f"t{t}", "env": "prod"}}],
                [{"blueprint": f"bp-{t % 8}"}],
                ["/bench.Svc/*"],
            )
        )
    for k in range(8):
        pending.append(
            policy_doc(
                f"bp-{k}",
                [{"blueprint": f"bp-{k}"}],
                [{"blueprint": f"bp-{(k + 1) % 8}"}],
                ["/bench.Svc/*"],
            )
        )
    flush()
    return policies + 24


async def _first(call: Any, timeout: float) -> tuple[str, float]:
    """Read the first message of a watch stream: ("ok", seconds) or (the error, seconds)."""
    start = time.perf_counter()
    try:
        msg = await asyncio.wait_for(call.read(), timeout)
    except grpc.aio.AioRpcError as e:
        return f"{e.code().name}: {(e.details() or '')[:120]}", time.perf_counter() - start
    except TimeoutError:
        return f"no message within {timeout:.0f} s", time.perf_counter() - start
    if msg is grpc.aio.EOF:
        return "the stream ended", time.perf_counter() - start
    return "ok", time.perf_counter() - start


async def probe(n: int, root: Path) -> None:
    data = root / "registry"
    DataDir(data).init(TrustDomain.parse(TD), now=datetime.now(UTC), registry_address="127.0.0.1:0")
    server = RegistryServer(ServeConfig(data, listen="127.0.0.1:0", bootstrap_listen="127.0.0.1:0"))
    await server.start()
    state = server.state
    channels: MeshChannels | None = None
    calls: list[Any] = []
    try:
        start = time.perf_counter()
        policies = load(state, n)
        load_s = time.perf_counter() - start
        gc.collect()
        rss, hwm = rss_mb(), rss_mb(field="VmHWM")
        start = time.perf_counter()
        full = state.full_snapshot()
        full_s, full_bytes = time.perf_counter() - start, full.ByteSize()

        sid = server.registry_id.trust_domain
        watcher_id = f"spiffe://{sid}/agents/watcher"
        from trustmesh.spiffe_id import SpiffeId

        token, _ = server.attestor.create(
            SpiffeId.parse(watcher_id), ttl_s=600, uses=1, now=server.clock()
        )
        creds = RegistryCredentials(
            SpiffeId.parse(watcher_id),
            registry=server.address,
            bootstrap=server.bootstrap_address,
            data_dir=root / "w",
            clock=system_clock,
            join_token=token,
            bundle_file=data / "bundle.pem",
        )
        svid = await creds.obtain()
        bundles = creds.current()[1]
        # As a sidecar does (runtime.py): a full snapshot outgrows ordinary messages.
        channels = MeshChannels(
            lambda: (svid, bundles),
            directory=root / "br",
            receive_bytes=DEFAULT_LIMITS.max_snapshot_bytes,
        )
        stub = rgrpc.RegistryStub(await channels.get(server.address, server.registry_id))
        full_call = stub.Watch(rpb.WatchRequest(instance_id="probe-full"))
        wire, wire_s = await _first(full_call, 120)
        full_call.cancel()

        snap = Snapshot()
        start = time.perf_counter()
        snap.apply(full)
        client_apply_s = time.perf_counter() - start
        del full
        call = stub.Watch(
            rpb.WatchRequest(instance_id="probe", epoch=state.epoch, revision=state.revision)
        )
        calls.append(call)
        deadline = time.monotonic() + 30
        while state.watcher_count != 1:  # the resumed stream is subscribed, the first one gone
            if time.monotonic() > deadline:
                raise TimeoutError(f"{state.watcher_count} watchers subscribed, expected 1")
            await asyncio.sleep(0.01)
        pushes = iter(range(1 << 30))

        async def push(msg: dict[str, Any]) -> dict[str, Any]:
            if msg["op"] != "push":
                raise ValueError(f"unknown op {msg['op']!r}")
            doc = agent_doc(PUSHED, TD, "bp-3", _attrs(3, rev=str(next(pushes))))
            t0 = time.perf_counter()
            result = state.apply([("bench/push", doc)])
            t1 = time.perf_counter()
            update = await asyncio.wait_for(call.read(), 10)
            t2 = time.perf_counter()
            applied = snap.apply(update)
            t3 = time.perf_counter()
            if update.revision != result.revision or not applied:
                raise RuntimeError(
                    f"delta {update.revision} for revision {result.revision}, applied={applied}"
                )
            return {
                "apply_ms": (t1 - t0) * 1e3,
                "receipt_ms": (t2 - t0) * 1e3,
                "applied_ms": (t3 - t0) * 1e3,
                "changes": len(update.changes),
                "delta_bytes": update.ByteSize(),
            }

        await serve(
            {
                "agents": n,
                "policies": policies,
                "load_s": load_s,
                "rss_mb": rss,
                "hwm_mb": hwm,
                "snapshot_bytes": full_bytes,
                "full_snapshot_s": full_s,
                "wire_full": wire,
                "wire_full_s": wire_s,
                "client_apply_s": client_apply_s,
            },
            push,
        )
    finally:
        for c in calls:
            c.cancel()
        if channels is not None:
            await channels.close()
        with contextlib.suppress(Exception):
            await server.stop(0.2)


async def measure(*, sizes: tuple[int, int], samples: int, workdir: Path) -> dict[str, Any]:
    probes: dict[str, Child] = {}
    out: dict[str, Any] = {
        "sizes": list(sizes),
        "samples": samples,
        "max_message_bytes": DEFAULT_LIMITS.max_message_bytes,
    }
    try:
        for n in sizes:
            child, hello = await Child.start(
                f"registry-{n}",
                "bench.footprint",
                "--probe",
                str(n),
                str(workdir / f"reg-{n}"),
                workdir=workdir,
                timeout=900,
            )
            probes[str(n)] = child
            out[str(n)] = hello
        rows: dict[str, list[dict[str, float]]] = {k: [] for k in probes}
        for i in range(samples):
            for key in order_of_round(list(probes), i):
                rows[key].append(await probes[key].request("push", timeout=30))
                await asyncio.sleep(0.05)
    finally:
        for child in probes.values():
            await child.stop(30)
    for key, samples_ in rows.items():
        for metric in ("apply_ms", "receipt_ms", "applied_ms"):
            out[key][metric] = summarize([s[metric] for s in samples_])
        out[key]["delta_changes"] = max(s["changes"] for s in samples_)
    small, big = str(min(sizes)), str(max(sizes))
    out["push_ratio"] = out[big]["receipt_ms"]["p50"] / out[small]["receipt_ms"]["p50"]
    return out


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "| agents | policies | registry RSS (MB) | full snapshot (bytes) | full snapshot over gRPC | "
        "push: apply (ms) | push: delta received (ms) p50 / p99 | push: delta applied (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in r["sizes"]:
        s = r[str(n)]
        lines.append(
            f"| {n:,} | {s['policies']:,} | {s['rss_mb']:.0f} | {s['snapshot_bytes']:,} | {s['wire_full']} "
            f"| {s['apply_ms']['p50']:.2f} | {s['receipt_ms']['p50']:.2f} / {s['receipt_ms']['p99']:.2f} "
            f"| {s['applied_ms']['p50']:.2f} |"
        )
    lines.append(
        f"\nOne-agent push, {max(r['sizes']):,} / {min(r['sizes']):,} agents: "
        f"{r['push_ratio']:.2f}x (delta received, p50)."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="registry footprint probe (bench helper)")
    parser.add_argument("--probe", type=int, required=True, metavar="AGENTS")
    parser.add_argument("dir", type=Path)
    args = parser.parse_args()
    asyncio.run(probe(args.probe, args.dir))
