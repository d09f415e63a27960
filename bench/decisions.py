"""Measure 5: the cost of one `trustmesh.authz.authorize()` as the registry grows.

Pure and in-process: for each size N (10 -> 1,000 -> 10,000 -> 100,000 agents) a
`Snapshot` is built from one full `SnapshotUpdate` of protobuf records made by
`trustmesh.wire` (as the registry sends them), holding:

* 8 blueprints; agent i has blueprint bp-(i mod 8) and attributes team=t(i mod 16),
  env=prod|dev;
* one AccessPolicy per agent pair (a-2k may call a-2k+1: caller by name, callee by
  SPIFFE ID), so N/2 policies;
* 16 attribute policies (team=tK, env=prod may call blueprint bp-(K mod 8)) and
  8 blueprint policies (bp-K may call bp-(K+1)).

Requests (seeded): 70% allowed by a pair policy, 15% by an attribute policy, 15%
denied (no policy), every one with caller and callee drawn across the whole registry.

* warm: 512 such requests, cycled; every decision after the first pass is a cache hit.
* cold: every request has a method name never asked before, so the decision cache
  misses and steps 4-6 (blueprint, policy index lookups) run every time.
* cold, same agents: as cold, on the largest snapshot but only between the agents of
  the smallest (a-0 .. a-9). Equal to cold at the smallest size, it shows that what
  grows with the registry is the memory a decision touches (CPU cache misses), not
  the work it does.
* cold, cache full: as cold, at the largest size, after the bounded decision cache
  (`Limits.decision_cache` entries) has filled, so every miss also evicts.

Sizes are interleaved within each round. `python -m bench` runs this measure in a
child process of its own (`python -m bench.decisions PARAMS_JSON`), so that what
earlier measures left in the orchestrator (its heap, grpc's threads) does not weigh
on it. The heap left by building the snapshots is
frozen (`gc.freeze()`) so that a collection of the 100k snapshot does not land in
the 10-agent loop; figures are medians over rounds of µs per call.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from trustmesh import wire
from trustmesh.authz import authorize
from trustmesh.limits import DEFAULT_LIMITS
from trustmesh.resources import (
    AccessPolicy,
    AgentBlueprint,
    AgentState,
    AgentView,
    Attributes,
    MethodPattern,
    Selector,
    SelectorKind,
)
from trustmesh.snapshot import Snapshot
from trustmesh.spiffe_id import SpiffeId
from trustmesh.v1 import registry_pb2 as rpb

__all__ = ["build_snapshot", "markdown", "measure", "requests"]

TD = "bench.local"
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
BLUEPRINTS, TEAMS = 8, 16
SVC = MethodPattern.parse("/bench.Svc/*")
Request = tuple[SpiffeId, SpiffeId, str]


def _id(i: int) -> SpiffeId:
    return SpiffeId.parse(f"spiffe://{TD}/agents/a-{i}")


def _attrs(i: int) -> dict[str, str]:
    return {"team": f"t{i % TEAMS}", "env": "prod" if i % 2 else "dev"}


def _policy(name: str, callers: list[Selector], callees: list[Selector]) -> rpb.Change:
    p = AccessPolicy(name, tuple(callers), tuple(callees), (SVC,))
    return rpb.Change(put_policy=wire.policy_to_pb(p))


def build_snapshot(n: int) -> tuple[Snapshot, float, int]:
    """The snapshot for `n` agents, the seconds `Snapshot.apply` took, and its bytes."""
    changes = []
    for k in range(BLUEPRINTS):
        bp = AgentBlueprint(f"bp-{k}", (SVC,))
        changes.append(rpb.Change(put_blueprint=wire.blueprint_to_pb(bp)))
    for i in range(n):
        agent = AgentView(
            f"a-{i}",
            _id(i),
            f"bp-{i % BLUEPRINTS}",
            "bench",
            attributes=Attributes(_attrs(i)),
            state=AgentState.ACTIVE,
        )
        changes.append(rpb.Change(put_agent=_agent_pb(agent)))
    for i in range(0, n - 1, 2):
        changes.append(
            _policy(
                f"pair-{i}",
                [Selector(SelectorKind.NAME, f"a-{i}")],
                [Selector(SelectorKind.SPIFFE_ID, _id(i + 1))],
            )
        )
    for t in range(TEAMS):
        team = Attributes({"team": f"t{t}", "env": "prod"})
        changes.append(
            _policy(
                f"team-{t}",
                [Selector(SelectorKind.ATTRIBUTES, team)],
                [Selector(SelectorKind.BLUEPRINT, f"bp-{t % BLUEPRINTS}")],
            )
        )
    for k in range(BLUEPRINTS):
        changes.append(
            _policy(
                f"bp-{k}",
                [Selector(SelectorKind.BLUEPRINT, f"bp-{k}")],
                [Selector(SelectorKind.BLUEPRINT, f"bp-{(k + 1) % BLUEPRINTS}")],
            )
        )
    update = rpb.SnapshotUpdate(epoch="bench", revision=1, full=True, changes=changes)
    snapshot = Snapshot()
    start = time.perf_counter()
    snapshot.apply(update)
    return snapshot, time.perf_counter() - start, update.ByteSize()


def _agent_pb(agent: AgentView) -> Any:
    from trustmesh.resources import Agent

    return wire.agent_to_pb(
        Agent(
            agent.name, agent.spiffe_id, agent.blueprint, agent.sponsor, attributes=agent.attributes
        ),
        None,
        disabled=False,
        disabled_reason="",
    )


def requests(n: int, count: int, rng: random.Random, method: Callable[[], str]) -> list[Request]:
    """`count` requests of the mix over `n` agents (see the module docstring)."""
    out: list[Request] = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.70 and n >= 2:  # a pair policy
            i = 2 * rng.randrange(n // 2)
            out.append((_id(i), _id(i + 1), method()))
        elif roll < 0.85 and n >= 2:  # team=tK, env=prod -> any agent of blueprint bp-(K mod 8)
            i = rng.randrange(1, n, 2)
            k = (i % TEAMS) % BLUEPRINTS
            callees = range(k, n, BLUEPRINTS)
            out.append((_id(i), _id(callees[rng.randrange(len(callees))]), method()))
        else:  # unrelated agents: a denial unless a blueprint or team policy happens to match
            out.append((_id(rng.randrange(n)), _id(rng.randrange(n)), method()))
    return out


def _time(snapshot: Snapshot, reqs: list[Request]) -> float:
    """µs per `authorize()` over `reqs`."""
    start = time.perf_counter()
    for caller, callee, method in reqs:
        authorize(caller, callee, method, snapshot, now=NOW)
    return (time.perf_counter() - start) / len(reqs) * 1e6


def measure(
    *, sizes: tuple[int, ...], rounds: int, warm_calls: int, cold_calls: int, churn_calls: int
) -> dict[str, Any]:
    rng = random.Random(1)
    fresh = iter(range(1 << 40))

    def new_method() -> str:
        return f"/bench.Svc/C{next(fresh)}"

    snaps: dict[int, Snapshot] = {}
    built: dict[int, dict[str, float]] = {}
    working: dict[int, list[Request]] = {}
    for n in sizes:
        snap, apply_s, nbytes = build_snapshot(n)
        snaps[n] = snap
        built[n] = {"apply_s": apply_s, "update_bytes": nbytes, **snap.counts()}
        working[n] = requests(n, 512, rng, lambda: "/bench.Svc/Call")
    allowed = {
        n: sum(authorize(*r, snaps[n], now=NOW).allowed for r in working[n]) / 512 for n in sizes
    }
    gc.collect()
    gc.freeze()
    try:
        warm: dict[int, list[float]] = {n: [] for n in sizes}
        cold: dict[int, list[float]] = {n: [] for n in sizes}
        local: list[float] = []
        big, small = max(sizes), min(sizes)
        for r in range(rounds):
            order = sizes[r % len(sizes) :] + sizes[: r % len(sizes)]
            for n in order:
                reqs = working[n] * max(1, warm_calls // 512)
                _time(snaps[n], working[n])  # every key cached
                warm[n].append(_time(snaps[n], reqs))
                misses = requests(n, cold_calls, rng, new_method)
                cold[n].append(_time(snaps[n], misses))
            # The largest registry, asked only about the smallest one's agents.
            local.append(_time(snaps[big], requests(small, cold_calls, rng, new_method)))
        fill = requests(big, DEFAULT_LIMITS.decision_cache, rng, new_method)
        _time(snaps[big], fill)
        churn = _time(snaps[big], requests(big, churn_calls, rng, new_method))
    finally:
        gc.unfreeze()
    med = {
        "warm": {n: statistics.median(v) for n, v in warm.items()},
        "cold": {n: statistics.median(v) for n, v in cold.items()},
    }
    return {
        "rounds": rounds,
        "sizes": list(sizes),
        "built": {str(n): built[n] for n in sizes},
        "allowed_fraction": {str(n): allowed[n] for n in sizes},
        "warm_us": {str(n): v for n, v in med["warm"].items()},
        "cold_us": {str(n): v for n, v in med["cold"].items()},
        "ratio_warm": med["warm"][big] / med["warm"][small],
        "ratio_cold": med["cold"][big] / med["cold"][small],
        "cold_local_us": statistics.median(local),
        "ratio_cold_local": statistics.median(local) / med["cold"][small],
        "cold_full_cache_us": churn,
        "cold_full_cache_size": big,
        "churn_calls": churn_calls,
    }


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "| agents | policies | Snapshot.apply (s) | allowed | warm (µs) | cold (µs) |",
        "|---|---|---|---|---|---|",
    ]
    for n in r["sizes"]:
        b = r["built"][str(n)]
        lines.append(
            f"| {n:,} | {b['policies']:,} | {b['apply_s']:.2f} | {r['allowed_fraction'][str(n)]:.0%} "
            f"| {r['warm_us'][str(n)]:.2f} | {r['cold_us'][str(n)]:.2f} |"
        )
    big, small = max(r["sizes"]), min(r["sizes"])
    lines.append(
        f"| **{big:,} / {small:,}** | | | | **{r['ratio_warm']:.2f}x** | **{r['ratio_cold']:.2f}x** |"
    )
    lines.append(
        f"\nCold on the {big:,}-agent snapshot, between the {small:,} agents of the smallest: "
        f"{r['cold_local_us']:.2f} µs ({r['ratio_cold_local']:.2f}x cold at {small:,})."
    )
    lines.append(
        f"Cold with a full decision cache ({r['cold_full_cache_size']:,} agents, "
        f"{r['churn_calls']:,} misses, each evicting): {r['cold_full_cache_us']:.2f} µs per call."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    """`python -m bench.decisions '{"sizes": [10, 1000], "rounds": 3, ...}'`: the
    keyword arguments of `measure` as JSON; prints the result as JSON."""
    import json
    import sys

    params = json.loads(sys.argv[1])
    params["sizes"] = tuple(params["sizes"])
    json.dump(measure(**params), sys.stdout)


if __name__ == "__main__":
    main()
