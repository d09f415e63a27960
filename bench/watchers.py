"""Helper process for the revocation measure: many real sidecar watch streams.

Each watcher is what a sidecar runs to follow the registry, minus the data plane:
its own key and SVID from its own join token (`RegistryCredentials.obtain`, the real
bootstrap), its own `MeshChannels` (TLS bridge, mTLS to the registry), a
`SidecarState`, and `trustmesh_sidecar.watch.watch_forever`. A snapshot listener
records, per watcher, the `time.monotonic()` at which each revision was applied
(CLOCK_MONOTONIC: comparable across processes on one Linux host).

Greeting: {"ready": n, "join_s": ...} once every watcher holds a snapshot.
Op `report` {revision, agent, wait_s}: waits until every watcher has applied
`revision`, then returns the time each first held it and how many see `agent` disabled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from bench.common import serve
from trustmesh.channels import MeshChannels
from trustmesh.spiffe_id import SpiffeId
from trustmesh_sidecar.credentials import RegistryCredentials
from trustmesh_sidecar.state import SidecarState, system_clock
from trustmesh_sidecar.watch import watch_forever

_KEEP = 256  # revisions remembered per watcher


class Watcher:
    def __init__(self, state: SidecarState, channels: MeshChannels) -> None:
        self.state = state
        self.channels = channels
        self.applied: dict[int, float] = {}
        state.on_snapshot(self._on_snapshot)

    def _on_snapshot(self) -> None:
        revision = self.state.snapshot.revision
        self.applied.setdefault(revision, time.monotonic())
        if len(self.applied) > _KEEP:
            del self.applied[min(self.applied)]

    def first_at(self, revision: int) -> float | None:
        times = [t for r, t in self.applied.items() if r >= revision]
        return min(times) if times else None


async def enroll(cfg: dict[str, Any], spiffe_id: str, token: str, data_dir: Path) -> Watcher:
    sid = SpiffeId.parse(spiffe_id)
    creds = RegistryCredentials(
        sid,
        registry=cfg["registry"],
        bootstrap=cfg["bootstrap"],
        data_dir=data_dir,
        clock=system_clock,
        join_token=token,
        bundle_file=Path(cfg["bundle"]),
    )
    svid = await creds.obtain()
    state = SidecarState(sid, svid, creds.current()[1])
    channels = MeshChannels(lambda: (state.svid, state.bundles), directory=data_dir / "br")
    return Watcher(state, channels)


async def main(config: Path) -> None:
    cfg = json.loads(config.read_text())
    start = time.monotonic()
    watchers: list[Watcher] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for spiffe_id, token, data_dir in cfg["identities"]:
            watchers.append(await enroll(cfg, spiffe_id, token, Path(data_dir)))
        join_s = time.monotonic() - start
        for i, w in enumerate(watchers):
            tasks.append(
                asyncio.get_running_loop().create_task(
                    watch_forever(
                        w.state,
                        w.channels,
                        registry=cfg["registry"],
                        registry_id=SpiffeId.parse(cfg["registry_id"]),
                        instance_id=f"bench-{i}",
                        advertise="",
                    )
                )
            )
        deadline = time.monotonic() + 60
        while not all(w.state.synced for w in watchers):
            if time.monotonic() > deadline:
                raise TimeoutError("watchers did not all receive a snapshot within 60 s")
            await asyncio.sleep(0.01)

        async def handle(msg: dict[str, Any]) -> dict[str, Any]:
            if msg["op"] != "report":
                raise ValueError(f"unknown op {msg['op']!r}")
            return await report(watchers, msg["revision"], msg["agent"], msg["wait_s"])

        await serve({"ready": len(watchers), "join_s": join_s}, handle)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for w in watchers:
            await w.channels.close()


async def report(
    watchers: list[Watcher], revision: int, agent: str, timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        times = [w.first_at(revision) for w in watchers]
        if all(t is not None for t in times):
            break
        left = deadline - time.monotonic()
        if left <= 0:
            missing = sum(t is None for t in times)
            raise TimeoutError(f"{missing} watchers lack revision {revision} after {timeout} s")
        await asyncio.sleep(0.005)  # the times come from the listeners, not from this poll
    disabled = 0
    for w in watchers:
        view = w.state.snapshot.agent_by_name(agent)
        disabled += bool(view is not None and view.disabled)
    return {"times": times, "disabled": disabled}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="revocation watchers (bench helper)")
    parser.add_argument("config", type=Path)
    asyncio.run(main(parser.parse_args().config))
