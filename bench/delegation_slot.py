"""[slot] Mesh latency with a delegation chain of depth 2 (client -> planner -> tool).

Delegation is being built elsewhere; this slot reports
"n/a (delegation not available: WHY)" until all of these hold at run time:

1. `trustmesh.delegation` imports and offers `extend_chain`, `verify_chain` and
   `CHAIN_HEADER`;
2. the registry accepts `DelegationPolicy` documents (`trustmesh_registry.state.KINDS`);
3. end to end, the tool's app receives a verified `trustmesh-chain` naming
   client > planner > tool (a probe through the real mesh, so a sidecar that drops
   chains can't pass for one that verifies them).

Paths once available (both through the echo app's Relay, which copies the incoming
`trustmesh-delegation-bin` into its onward call, as docs/delegation.md asks an app to):
    delegated     loadgen -> client -> planner -> app Relay -> planner -> tool -> app
    relay_direct  loadgen -> app Relay -> app          (the same two hops, no mesh)
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from typing import Any

from bench.common import manifest, registry_call
from bench.topology import TD, BenchMesh

__all__ = ["RELAY", "Slot", "prepare", "unavailable"]

RELAY = "/bench.Echo/Relay"
NA = "n/a (delegation not available: {})"


@dataclass
class Slot:
    status: str  # "available" or the n/a text
    # name -> (address, metadata, method)
    paths: dict[str, tuple[str, list[tuple[str, str]], str]] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return not self.status.startswith("n/a")


def unavailable() -> str | None:
    """Why the slot can't run in this tree (checks 1 and 2), or None."""
    try:
        delegation = importlib.import_module("trustmesh.delegation")
    except ImportError as e:
        return f"trustmesh.delegation does not import: {e}"
    missing = [
        n for n in ("extend_chain", "verify_chain", "CHAIN_HEADER") if not hasattr(delegation, n)
    ]
    if missing:
        return f"trustmesh.delegation lacks {', '.join(missing)}"
    from trustmesh_registry.state import KINDS

    if "DelegationPolicy" not in KINDS:
        return "the registry does not accept DelegationPolicy documents yet"
    return None


def _policy() -> dict[str, Any]:
    return {
        "apiVersion": "trustmesh.dev/v1alpha1",
        "kind": "DelegationPolicy",
        "metadata": {"name": "bench-chain"},
        "spec": {
            "callees": [{"name": "tool"}],
            "allowedOrigins": [{"name": "client"}],
            # Exactly client then planner: only the planner may forward a chain, so
            # the client signs hops to the planner alone and the other paths of the
            # latency measure carry no chain (docs/delegation.md, "When to sign").
            "allowedPaths": [[{"name": "client"}, {"name": "planner"}]],
        },
    }


async def prepare(bm: BenchMesh) -> Slot:
    """Check availability; when available, start planner and tool and probe the chain."""
    why = unavailable()
    if why is not None:
        return Slot(NA.format(why))
    await registry_call(lambda: bm.mesh.apply(manifest([_policy()])))
    return await start_and_probe(bm)


async def start_and_probe(bm: BenchMesh) -> Slot:
    """Start the planner and tool sidecars, then check check 3 with a probe."""
    planner = await bm.start_sidecar("planner")
    await bm.start_sidecar("tool")
    await bm.wait_synced("client")
    await bm.wait_synced("planner")
    client = bm.sidecar("client").outbound
    hop = [("trustmesh-target", "planner")]
    probe = await bm.gen.request(
        "probe",
        address=client,
        method=RELAY,
        md=[*hop, ("x-bench-relay", f"{planner.outbound}|tool|/bench.Echo/Probe")],
    )
    from trustmesh.delegation import CHAIN_HEADER  # checked by unavailable()

    plain = await bm.gen.request(
        "probe", address=client, method="/bench.Echo/Probe", md=[("trustmesh-target", "server")]
    )
    if CHAIN_HEADER in plain["reply"]:
        # The slot's policy must not change what the other paths measure.
        raise RuntimeError(f"plain mesh calls now carry a chain: {plain['reply'][CHAIN_HEADER]}")
    chain = str(probe["reply"].get(CHAIN_HEADER, ""))
    want = " > ".join(f"spiffe://{TD}/agents/{n}" for n in ("client", "planner", "tool"))
    if chain != want:
        seen = json.dumps(probe["reply"])[:200]
        return Slot(NA.format(f"the tool's app got no verified depth-2 chain (it saw {seen})"))
    return Slot(
        "available",
        {
            "delegated": (
                client,
                [*hop, ("x-bench-relay", f"{planner.outbound}|tool|/bench.Echo/Unary")],
                RELAY,
            ),
            "relay_direct": (
                bm.app_address,
                [("x-bench-relay", f"{bm.app_address}||/bench.Echo/Unary")],
                RELAY,
            ),
        },
    )
