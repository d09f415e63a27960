"""How long a registry's event loop stalls while it builds a full snapshot.

    python -m bench.registry_build              # 100,000 agents
    python -m bench.registry_build --agents 10000

A `RegistryState` holding N agents builds its first full snapshot, as it does when
the first sidecar watches after a start, while a heartbeat task on the same loop
sleeps 1 ms at a time; the figure is the longest gap between two beats (a loop that
builds on itself stalls for the whole build). Prints the build time, the snapshot's
size and the worst stall.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from trustmesh_registry.state import RegistryState
from trustmesh_registry.store import MemoryStore

API = "trustmesh.dev/v1alpha1"


def _state(agents: int) -> RegistryState:
    state = RegistryState(MemoryStore(), lambda: [])
    docs = [
        {"apiVersion": API, "kind": "AgentBlueprint", "metadata": {"name": "bp"},
         "spec": {"allowedMethods": ["/bench.Svc/*"]}},
        *(
            {"apiVersion": API, "kind": "Agent", "metadata": {"name": f"a-{i}"},
             "spec": {"spiffeId": f"spiffe://bench.local/agents/a-{i}", "blueprint": "bp",
                      "sponsor": "bench"}}
            for i in range(agents)
        ),
    ]  # fmt: skip
    for at in range(0, len(docs), 1000):  # the registry takes 1,000 documents per apply
        state.apply([(f"bench/{d['metadata']['name']}", d) for d in docs[at : at + 1000]])
    return state


async def measure(agents: int) -> dict[str, float]:
    state = _state(agents)
    worst, running = 0.0, True

    async def beat() -> None:
        nonlocal worst
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst, last = max(worst, now - last), now

    beating = asyncio.ensure_future(beat())
    await asyncio.sleep(0.05)
    start = time.perf_counter()
    backlog, _ = await state.full_backlog_async()
    took = time.perf_counter() - start
    running = False
    await beating
    size = len(backlog[0]) if isinstance(backlog[0], bytes) else backlog[0].ByteSize()
    return {"agents": agents, "build_s": took, "bytes": size, "worst_stall_ms": worst * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--agents", type=int, default=100_000)
    args = parser.parse_args()
    r = asyncio.run(measure(args.agents))
    print(
        f"{r['agents']:,} agents: full snapshot built in {r['build_s']:.2f} s, "
        f"{r['bytes'] / 1e6:.1f} MB; worst event-loop stall meanwhile {r['worst_stall_ms']:.0f} ms"
    )


if __name__ == "__main__":
    main()
