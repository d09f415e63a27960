"""Run every benchmark in one go and write JSON, Markdown and (optionally) a PNG.

    python -m bench                 # full run (several minutes)
    python -m bench --quick         # every measure at tiny sizes, < 60 s (what CI runs)
    python -m bench --only latency,decisions --out /tmp/results
    python -m bench --sidecar-env TRUSTMESH_X=1   # extra environment for every sidecar

Writes bench.json, bench.md and, when matplotlib is installed, bench.png to --out
(default bench/results). Exit status: 0 when every measure ran (goals met or not:
this is a measurement, not a gate), 1 when a measure failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import (
    connect,
    control_plane,
    footprint,
    grpc_floor,
    latency,
    report,
    throughput,
)
from bench.common import RETRIED, machine
from bench.topology import BenchMesh

__all__ = ["FULL", "QUICK", "Params", "main"]

MEASURES = ("latency", "throughput", "connect", "engines", "decisions", "revocation", "footprint")
DATA_PLANE = ("latency", "throughput", "connect")


@dataclass(frozen=True)
class Params:
    rounds: int  # rounds of the interleaved data-plane and decision measures
    latency_calls: int
    throughput_calls: int
    stream_messages: int
    connect_samples: int
    connect_warm: int
    decision_sizes: tuple[int, ...]
    decision_warm: int
    decision_cold: int
    decision_churn: int
    watchers: int
    revocations: int
    footprint_sizes: tuple[int, int]
    push_samples: int
    cap_s: float  # the most any one measure may take before it is abandoned


FULL = Params(
    rounds=7,
    latency_calls=400,
    throughput_calls=2000,
    stream_messages=256,
    connect_samples=8,
    connect_warm=20,
    decision_sizes=(10, 1_000, 10_000, 100_000),
    decision_warm=20_000,
    decision_cold=10_000,
    decision_churn=65_536,
    watchers=50,
    revocations=20,
    footprint_sizes=(1_000, 100_000),
    push_samples=15,
    cap_s=1800,
)
QUICK = Params(
    rounds=1,
    latency_calls=30,
    throughput_calls=100,
    stream_messages=8,
    connect_samples=1,
    connect_warm=5,
    decision_sizes=(10, 1_000),
    decision_warm=1_024,
    decision_cold=200,
    decision_churn=1_000,
    watchers=10,
    revocations=3,
    footprint_sizes=(100, 1_000),
    push_samples=3,
    cap_s=120,
)


async def _guarded(
    results: dict[str, Any],
    name: str,
    run: Callable[[], Awaitable[dict[str, Any]]],
    cap_s: float,
    verbose: bool,
) -> None:
    start = time.perf_counter()
    print(f"bench: {name} ...", file=sys.stderr, flush=True)
    try:
        results[name] = await asyncio.wait_for(run(), cap_s)
    except Exception as e:
        if verbose:
            traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        results[name] = {"error": f"{type(e).__name__}: {first}"[:300]}
        print(f"bench: {name} failed: {results[name]['error']}", file=sys.stderr)
    results[name]["seconds"] = time.perf_counter() - start


async def run(
    p: Params, only: tuple[str, ...], tmp: Path, sidecar_env: dict[str, str], verbose: bool
) -> dict[str, Any]:
    m: dict[str, Any] = {}
    wanted = [n for n in DATA_PLANE if n in only]
    if wanted:
        bm = BenchMesh(tmp / "mesh", peers=p.connect_samples, sidecar_env=sidecar_env)
        try:
            await asyncio.wait_for(bm.start(), 120)
        except Exception as e:
            if verbose:
                traceback.print_exc()
            await bm.stop()
            for n in wanted:
                m[n] = {"error": f"the mesh did not start: {type(e).__name__}: {e}"[:300]}
        else:
            try:
                jobs: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
                    "latency": lambda: latency.measure(
                        bm, rounds=p.rounds, calls=p.latency_calls, workdir=tmp / "latency"
                    ),
                    "throughput": lambda: throughput.measure(
                        bm, rounds=p.rounds, calls=p.throughput_calls, messages=p.stream_messages
                    ),
                    "connect": lambda: connect.measure(
                        bm, samples=p.connect_samples, warm=p.connect_warm
                    ),
                }
                for n in wanted:
                    await _guarded(m, n, jobs[n], p.cap_s, verbose)
            finally:
                await bm.stop()
    if "engines" in only:
        await _guarded(
            m,
            "engines",
            lambda: grpc_floor.run(p.rounds, p.latency_calls, p.throughput_calls, 32),
            p.cap_s,
            verbose,
        )
    if "decisions" in only:

        async def decide() -> dict[str, Any]:
            params = {
                "sizes": list(p.decision_sizes),
                "rounds": p.rounds,
                "warm_calls": p.decision_warm,
                "cold_calls": p.decision_cold,
                "churn_calls": p.decision_churn,
            }
            # A child process of its own: a clean heap, no grpc threads from earlier measures.
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.decisions",
                json.dumps(params),
                cwd=Path(__file__).resolve().parent.parent,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                out, err = await child.communicate()
            finally:
                if child.returncode is None:
                    child.kill()
                    await child.wait()
            if child.returncode != 0:
                raise RuntimeError(err.decode(errors="replace").strip()[-300:])
            result: dict[str, Any] = json.loads(out)
            return result

        await _guarded(m, "decisions", decide, p.cap_s, verbose)
    if "revocation" in only:
        await _guarded(
            m,
            "revocation",
            lambda: control_plane.measure(
                watchers=p.watchers, revocations=p.revocations, workdir=tmp / "rev"
            ),
            p.cap_s,
            verbose,
        )
    if "footprint" in only:
        await _guarded(
            m,
            "footprint",
            lambda: footprint.measure(
                sizes=p.footprint_sizes, samples=p.push_samples, workdir=tmp / "fp"
            ),
            p.cap_s,
            verbose,
        )
    return m


async def _cancellable(job: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """Run `job`; SIGINT or SIGTERM cancel it, so every `finally` stops its processes."""
    task = asyncio.ensure_future(job)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _env_pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--sidecar-env wants KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, < 60 s (CI)")
    parser.add_argument("--out", default="bench/results", help="directory for the results")
    parser.add_argument(
        "--only", default=",".join(MEASURES), help=f"comma-separated: {','.join(MEASURES)}"
    )
    parser.add_argument("--sidecar-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--verbose", action="store_true", help="tracebacks for failures")
    args = parser.parse_args(argv)
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in only if s not in MEASURES]
    try:
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown measure(s) {', '.join(unknown)}")
        sidecar_env = _env_pairs(args.sidecar_env)
    except argparse.ArgumentTypeError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    params = QUICK if args.quick else FULL
    results: dict[str, Any] = {
        "machine": machine(),
        "quick": args.quick,
        "params": asdict(params),
        "sidecar_env": sidecar_env,
    }
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="tmb-") as tmp:
            results["measures"] = asyncio.run(
                _cancellable(run(params, only, Path(tmp), sidecar_env, args.verbose))
            )
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130
    results["wall_s"] = time.perf_counter() - start
    results["operator_calls_retried"] = RETRIED["operator_calls"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    text = report.markdown(results)
    (out / "bench.md").write_text(text)
    charted = report.chart(results, out / "bench.png")
    print(text)
    print(
        f"bench: wrote {out / 'bench.json'}, {out / 'bench.md'}"
        + (", bench.png" if charted else ""),
        file=sys.stderr,
    )
    failed = [n for n, r in results["measures"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
