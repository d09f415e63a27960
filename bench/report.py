"""The harness's report: the goals table, the other figures, and an optional chart.

Pure: takes the results dict that `bench.run` writes as JSON and returns Markdown.
A goal whose measure failed reads "n/a (error)"; a goal defined at a size the run
did not reach (quick mode) shows the figure with "n/a (quick: ...)" as its verdict.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import connect, control_plane, decisions, footprint, grpc_floor, latency, throughput

__all__ = ["GOALS", "chart", "goal_rows", "markdown"]

R = dict[str, Any]


@dataclass(frozen=True)
class Goal:
    label: str
    goal: str
    measure: str  # key of the results
    value: Callable[[R], float]
    passes: Callable[[float, float], bool]
    limit: float
    show: Callable[[R, float], str]
    # When the goal is defined at a scale: what the run reached, and the scale needed.
    scale: Callable[[R], int] | None = None
    needed: int = 0


def _x(v: float) -> str:
    return f"{v:.2f}x"


def _rss(r: R) -> float:
    return float(max(r["sidecar_rss_mb"]["load"].values()))


GOALS = (
    Goal(
        "mesh p50 / direct p50 (1 KiB unary, sequential)",
        "≤ 2.0",
        "latency",
        lambda r: r["ratio_p50"],
        operator.le,
        2.0,
        lambda r, v: (
            f"{_x(v)} ({r['paths']['mesh']['p50']:.2f} / {r['paths']['direct']['p50']:.2f} ms)"
        ),
    ),
    Goal(
        "mesh p99 / direct p99",
        "≤ 2.5",
        "latency",
        lambda r: r["ratio_p99"],
        operator.le,
        2.5,
        lambda r, v: (
            f"{_x(v)} ({r['paths']['mesh']['p99']:.2f} / {r['paths']['direct']['p99']:.2f} ms)"
        ),
    ),
    Goal(
        "mesh throughput / direct (32 in flight)",
        "≥ 0.5",
        "throughput",
        lambda r: r["ratio"],
        operator.ge,
        0.5,
        lambda r, v: (
            f"{_x(v)} ({r['calls_per_s']['mesh']:.0f} / {r['calls_per_s']['direct']:.0f} calls/s)"
        ),
    ),
    Goal(
        "decision cost 100k / 10, warm decision cache",
        "≤ 1.3",
        "decisions",
        lambda r: r["ratio_warm"],
        operator.le,
        1.3,
        lambda r, v: (
            f"{_x(v)} ({r['warm_us'][str(max(r['sizes']))]:.2f} / "
            f"{r['warm_us'][str(min(r['sizes']))]:.2f} µs)"
        ),
        lambda r: max(r["sizes"]),
        100_000,
    ),
    Goal(
        "decision cost 100k / 10, cold decision cache",
        "≤ 1.3",
        "decisions",
        lambda r: r["ratio_cold"],
        operator.le,
        1.3,
        lambda r, v: (
            f"{_x(v)} ({r['cold_us'][str(max(r['sizes']))]:.2f} / "
            f"{r['cold_us'][str(min(r['sizes']))]:.2f} µs)"
        ),
        lambda r: max(r["sizes"]),
        100_000,
    ),
    Goal(
        "revocation propagation p99, 50 sidecars",
        "< 500 ms",
        "revocation",
        lambda r: r["all_ms"]["p99"],
        operator.lt,
        500.0,
        lambda r, v: f"{v:.1f} ms (p50 {r['all_ms']['p50']:.1f} ms)",
        lambda r: int(r["watchers"]),
        50,
    ),
    Goal(
        "sidecar RSS under load",
        "≤ 80 MB",
        "throughput",
        _rss,
        operator.le,
        80.0,
        lambda r, v: f"{v:.1f} MB (idle {max(r['sidecar_rss_mb']['idle'].values()):.1f} MB)",
    ),
    Goal(
        "one-agent change pushed at 100,000 agents",
        "< 50 ms",
        "footprint",
        lambda r: r[str(max(r["sizes"]))]["receipt_ms"]["p50"],
        operator.lt,
        50.0,
        lambda r, v: f"{v:.2f} ms p50 (p99 {r[str(max(r['sizes']))]['receipt_ms']['p99']:.2f} ms)",
        lambda r: max(r["sizes"]),
        100_000,
    ),
)


def goal_rows(results: R) -> list[tuple[str, str, str, str]]:
    """(measure, measured, goal, verdict) per goal."""
    rows = []
    for g in GOALS:
        r = results.get("measures", {}).get(g.measure)
        if r is None:
            rows.append((g.label, "not run", g.goal, "n/a (not run)"))
            continue
        if "error" in r:
            rows.append((g.label, "error (see below)", g.goal, "n/a (error)"))
            continue
        value = g.value(r)
        verdict = "pass" if g.passes(value, g.limit) else "**FAIL**"
        if g.scale is not None and g.scale(r) < g.needed:
            verdict = f"n/a (quick: at {g.scale(r):,})"
        rows.append((g.label, g.show(r, value), g.goal, verdict))
    return rows


def _others(m: R) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []

    def ok(name: str) -> R | None:
        r = m.get(name)
        return r if r is not None and "error" not in r else None

    if (r := ok("latency")) is not None:
        t = r["tracing"]
        out.append(
            (
                "mesh, tracing on / off (p50, p99)",
                f"{_x(t['ratio_p50'])}, {_x(t['ratio_p99'])} ({t['spans_received']:,} spans exported)",
            )
        )
        d = r["delegation"]
        out.append(
            (
                "[slot] delegation chain depth 2: delegated / direct relay (p50, p99)",
                f"{_x(d['ratio_p50'])}, {_x(d['ratio_p99'])}"
                if d["status"] == "measured"
                else d["status"],
            )
        )
    if (r := ok("throughput")) is not None:
        s = r["stream"]
        out.append(
            (
                "server streaming, 64 KiB messages: mesh / direct",
                f"{_x(s['ratio'])} ({s['mb_per_s']['mesh']:.1f} / {s['mb_per_s']['direct']:.1f} MB/s)",
            )
        )
    if (r := ok("connect")) is not None:
        c, d = r["mesh"], r["direct"]
        out.append(
            (
                "first call to a new peer / warm call (mesh)",
                f"{c['ratio']:.1f}x ({c['first_ms']:.2f} / {c['warm_ms']:.2f} ms); "
                f"direct, new channel: {d['first_ms']:.2f} / {d['warm_ms']:.2f} ms"
                + (
                    f"; {c['first_attempts_failed']} first calls failed (UNAVAILABLE) and were retried"
                    if c.get("first_attempts_failed")
                    else ""
                ),
            )
        )
    if (r := ok("decisions")) is not None:
        big = str(max(r["sizes"]))
        out.append(
            (
                f"decision µs at {int(big):,} agents: warm, cold, cold with a full cache",
                f"{r['warm_us'][big]:.2f}, {r['cold_us'][big]:.2f}, {r['cold_full_cache_us']:.2f}",
            )
        )
        small = min(r["sizes"])
        out.append(
            (
                f"cold decision on the {int(big):,}-agent snapshot between {small:,} agents "
                f"only / cold at {small:,}",
                f"{_x(r['ratio_cold_local'])} ({r['cold_local_us']:.2f} µs)"
                + (
                    ": what grows with the registry is the memory touched (cache misses), "
                    "not the work"
                    if r["ratio_cold_local"] <= 1.15
                    else ""
                ),
            )
        )
    if (r := ok("revocation")) is not None:
        out.append(
            (
                "revocation applied at all watchers, from the SetAgentState call (p50, p99)",
                f"{r['all_from_call_ms']['p50']:.1f}, {r['all_from_call_ms']['p99']:.1f} ms",
            )
        )
    if (r := ok("footprint")) is not None:
        big, small = str(max(r["sizes"])), str(min(r["sizes"]))
        b = r[big]
        limit = r["max_message_bytes"]
        out.append(
            (
                f"registry RSS at {int(big):,} agents",
                f"{b['rss_mb']:.0f} MB ({b['policies']:,} policies)",
            )
        )
        out.append(
            (
                f"full snapshot at {int(big):,} agents",
                f"{b['snapshot_bytes']:,} bytes ({b['snapshot_bytes'] / limit:.2f}x the "
                f"{limit:,}-byte message limit); over gRPC: {b['wire_full']}",
            )
        )
        out.append(
            (
                f"one-agent push, delta received (p50): {int(big):,} / {int(small):,} agents",
                f"{_x(r['push_ratio'])} ({b['receipt_ms']['p50']:.2f} / "
                f"{r[small]['receipt_ms']['p50']:.2f} ms)",
            )
        )
    return out


_DETAILS: dict[str, tuple[str, Callable[[R], str]]] = {
    "latency": ("1. Sequential 1 KiB unary calls", latency.markdown),
    "throughput": ("2-3. Throughput, streaming, sidecar memory", throughput.markdown),
    "connect": ("4. New connection cost", connect.markdown),
    "engines": (
        "1-2 again: grpcio's floor and the two engines (bench/grpc_floor.py)",
        grpc_floor.markdown,
    ),
    "decisions": ("5. Authorization decision cost", decisions.markdown),
    "revocation": ("6. Revocation propagation", control_plane.markdown),
    "footprint": ("7. Registry footprint and one-agent push", footprint.markdown),
}


def markdown(results: R) -> str:
    mc = results["machine"]
    mode = "quick (tiny sizes: a smoke test, not a measurement)" if results["quick"] else "full"
    lines = [
        "# TrustMesh benchmarks",
        "",
        f"Machine: {mc['cpus']} cores ({mc['cpus_usable']} usable), Python {mc['python']}, "
        f"{mc['platform']}; load average {mc['load_avg_1m_at_start']} at start; "
        f"{mc['started']}; mode: {mode}; wall time {results.get('wall_s', 0):.0f} s.",
        "Shared machine: absolute figures are noisy; ratios (measured side by side, "
        "interleaved) are what count.",
    ]
    if results.get("operator_calls_retried"):
        lines.append(
            f"{results['operator_calls_retried']} operator calls failed with UNAVAILABLE and "
            "were retried (see bench/README.md, limits)."
        )
    lines += [
        "",
        "| measure | measured | goal | result |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in goal_rows(results)]
    others = _others(results["measures"])
    if others:
        lines += ["", "| other figures | measured |", "|---|---|"]
        lines += [f"| {a} | {b} |" for a, b in others]
    for name, (title, render) in _DETAILS.items():
        r = results["measures"].get(name)
        if r is None:
            continue
        lines += ["", f"## {title}", ""]
        lines.append(f"Error: `{r['error']}`" if "error" in r else render(r).rstrip())
    return "\n".join(lines) + "\n"


def chart(results: R, path: Path) -> bool:
    """A PNG of each goal's figure relative to its limit, if matplotlib is installed."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return False
    names, values = [], []
    for g in GOALS:
        r = results["measures"].get(g.measure)
        if r is None or "error" in r:
            continue
        v = g.value(r)
        # Below 1.0 meets the goal, whichever way the goal points.
        values.append(g.limit / v if g.passes is operator.ge and v else v / g.limit)
        names.append(g.label)
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(names) + 1.5))
    ax.barh(names, values, color=["tab:green" if v <= 1 else "tab:red" for v in values])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("measured / goal (≤ 1 meets the goal)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
