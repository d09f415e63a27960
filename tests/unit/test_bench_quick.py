"""The benchmark harness's pure parts: statistics, the decision mix, the goals table.

No network and no processes: `.ci/run` runs the harness itself (`python -m bench --quick`).
"""

from __future__ import annotations

import itertools
import random
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `bench` lives at the repo root

from bench import decisions, report
from bench.common import order_of_round, pct, steal_fraction
from trustmesh.authz import authorize
from trustmesh.decision import Reason

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("values", "p", "want"),
    [
        ([5.0], 0.99, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 0.5, 3.0),
        ([float(i) for i in range(100)], 0.99, 99.0),
        ([float(i) for i in range(400)], 0.99, 396.0),
    ],
)
def test_pct(values: list[float], p: float, want: float) -> None:
    assert pct(values, p) == want


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7])
def test_round_orders_are_balanced(n: int) -> None:
    paths = [f"p{i}" for i in range(n)]
    cycle = n if n % 2 == 0 else 2 * n
    orders = [order_of_round(paths, r) for r in range(cycle)]
    assert all(sorted(o) == paths for o in orders)  # each round measures every path once
    positions = Counter((i, name) for o in orders for i, name in enumerate(o))
    assert set(positions.values()) == {cycle // n}  # every path in every position alike
    after = Counter(pair for o in orders for pair in itertools.pairwise(o))
    if n > 1:  # every path right after every other path, equally often
        assert len(after) == n * (n - 1)
        assert len(set(after.values())) == 1
    assert order_of_round(paths, cycle) == orders[0]  # and then the design repeats


@pytest.mark.parametrize(
    ("before", "after", "want"),
    [((10, 1000), (20, 2000), 0.01), ((0, 0), (0, 0), 0.0), ((5, 100), (5, 600), 0.0)],
    ids=["one-percent", "no-proc-stat", "none-stolen"],
)
def test_steal_fraction(before: tuple[int, int], after: tuple[int, int], want: float) -> None:
    assert steal_fraction(before, after) == want


def test_decision_mix_is_what_the_docstring_says() -> None:
    snapshot, _, _ = decisions.build_snapshot(100)
    assert snapshot.counts()["agents"] == 100
    assert snapshot.counts()["policies"] == 50 + 16 + 8
    rng = random.Random(7)
    reqs = decisions.requests(100, 400, rng, lambda: "/bench.Svc/Call")
    results = [authorize(c, e, m, snapshot, now=NOW) for c, e, m in reqs]
    allowed = sum(d.allowed for d in results) / len(results)
    assert 0.8 <= allowed <= 0.95
    assert {d.reason for d in results} <= {Reason.ALLOWED, Reason.NO_MATCHING_POLICY}
    assert any(d.policy and d.policy.startswith("team-") for d in results)


def _results(**measures: Any) -> dict[str, Any]:
    machine = {"cpus": 2, "cpus_usable": 2, "python": "3.11.7", "platform": "Linux x86_64",
               "load_avg_1m_at_start": 0.5, "started": "2025-06-01T12:00:00Z"}  # fmt: skip
    return {"machine": machine, "quick": False, "measures": measures, "wall_s": 1.0}


LATENCY = {
    "paths": {"direct": {"p50": 0.5, "p99": 1.0}, "mesh": {"p50": 0.9, "p99": 3.0},
              "mesh_traced": {"p50": 1.0, "p99": 3.3}},
    "ratio_p50": 1.8, "ratio_p99": 3.0, "rounds": 1, "calls_per_round": 10, "payload_bytes": 1024,
    "tracing": {"ratio_p50": 1.1, "ratio_p99": 1.1, "spans_received": 20},
    "delegation": {"status": "n/a (delegation not available: not built yet)"},
}  # fmt: skip


@pytest.mark.parametrize(
    ("measures", "label", "verdict"),
    [
        ({"latency": LATENCY}, "mesh p50 / direct p50 (1 KiB unary, sequential)", "pass"),
        ({"latency": LATENCY}, "mesh p99 / direct p99", "**FAIL**"),
        ({"latency": {"error": "ChildError: boom"}}, "mesh p99 / direct p99", "n/a (error)"),
        ({}, "mesh p99 / direct p99", "n/a (not run)"),
        (
            {"revocation": {"watchers": 10, "all_ms": {"p50": 1.0, "p99": 2.0}}},
            "revocation propagation p99, 50 sidecars",
            "n/a (quick: at 10)",
        ),
        (
            {"revocation": {"watchers": 50, "all_ms": {"p50": 1.0, "p99": 600.0}}},
            "revocation propagation p99, 50 sidecars",
            "**FAIL**",
        ),
    ],
)
def test_goal_verdicts(measures: dict[str, Any], label: str, verdict: str) -> None:
    rows = {row[0]: row[3] for row in report.goal_rows(_results(**measures))}
    assert rows[label] == verdict


def test_markdown_keeps_the_delegation_slot_and_machine() -> None:
    text = report.markdown(_results(latency=LATENCY))
    assert "2 cores" in text and "Python 3.11.7" in text
    assert "| [slot] delegation chain depth 2" in text
    assert "n/a (delegation not available: not built yet)" in text
