"""Shared pieces of the benchmark harness: statistics, helper processes, manifests.

Invariants every measure keeps:
* Traffic goes to 127.0.0.1 only.
* Every loop is bounded in count and in time; every wait has a timeout.
* Every process a measure starts is stopped in a `finally` (`Child.stop`, or
  `LocalMesh.stop` for sidecars). A helper process also exits on its own when its
  stdin closes, so it can't outlive the harness.

Helper processes (`Child`) speak JSON lines: the child prints one greeting line,
then answers each request line with one reply line; `{"op": "quit"}` or end of
input stops it. A reply holding `error` raises `ChildError` in the parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from trustmesh.errors import RegistryUnavailableError
from trustmesh.v1 import registry_pb2 as rpb

T = TypeVar("T")

__all__ = [
    "API",
    "REPO",
    "Child",
    "ChildError",
    "RssSampler",
    "agent_doc",
    "blueprint_doc",
    "cpu_times",
    "machine",
    "manifest",
    "order_of_round",
    "pct",
    "policy_doc",
    "registry_call",
    "rss_mb",
    "serve",
    "steal_fraction",
    "summarize",
]

API = "trustmesh.dev/v1alpha1"
REPO = Path(__file__).resolve().parents[1]
_LINE_LIMIT = 1 << 22  # bytes of one JSON line between processes


# -- statistics ---------------------------------------------------------------------------


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..1) of a non-empty sample."""
    if not values:
        raise ValueError("no samples")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def summarize(values: Sequence[float]) -> dict[str, float]:
    return {"p50": statistics.median(values), "p99": pct(values, 0.99), "n": len(values)}


def median_of(rows: Iterable[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def order_of_round(items: Sequence[str], round_no: int) -> list[str]:
    """The measuring order of round `round_no`: a balanced (Williams) Latin square.

    Over one cycle of the design (n rounds for an even number of paths, 2n for an odd
    one) every path is measured in every position equally often, and right after every
    other path equally often. Order matters on a small machine: a path's processes come
    back to caches warmed or cooled by whatever ran just before (the shared libraries'
    pages among them), and a plain rotation keeps each path's predecessor the same in
    every round: two identical meshes measured that way differed by ~8 %.
    """
    n = len(items)
    if n == 0:
        return []
    first = [0]
    low, high = 1, n - 1
    while len(first) < n:  # 0, 1, n-1, 2, n-2, ...
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    rows = [[(j + i) % n for j in first] for i in range(n)]
    if n % 2:  # odd: the mirrored rows balance the predecessors
        rows = [row for i in range(n) for row in (rows[i], rows[i][::-1])]
    return [items[k] for k in rows[round_no % len(rows)]]


def cpu_times() -> tuple[int, int]:
    """(steal, total) CPU time of the machine so far, in ticks, from /proc/stat; (0, 0)
    where it is missing. See `steal_fraction`."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields)


def steal_fraction(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of CPU time between two `cpu_times()` samples that the hypervisor gave
    to other guests (steal): a run slowed by its host can be told from a slow path."""
    total = after[1] - before[1]
    return round((after[0] - before[0]) / total, 4) if total > 0 else 0.0


def machine() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "load_avg_1m_at_start": round(load[0], 2),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# -- memory ---------------------------------------------------------------------------------


def rss_mb(pid: int | None = None, field: str = "VmRSS") -> float:
    """Resident set size of a process (MB = 2**20 bytes), from /proc/<pid>/status."""
    path = Path(f"/proc/{pid or 'self'}/status")
    for line in path.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in {path}")


class RssSampler:
    """Polls the RSS of some processes while a load runs; keeps the maximum per name."""

    def __init__(self, pids: dict[str, int], interval: float = 0.02) -> None:
        self.pids = pids
        self.interval = interval
        self.peak: dict[str, float] = dict.fromkeys(pids, 0.0)

    def _sample(self) -> None:
        for name, pid in self.pids.items():
            # A process that is gone is not a sample; the run reports its failure.
            with contextlib.suppress(OSError, RuntimeError):
                self.peak[name] = max(self.peak[name], rss_mb(pid))

    async def _loop(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(self.interval)

    @contextlib.contextmanager
    def during(self, active: bool = True) -> Iterator[None]:
        """Sample while the block runs (or do nothing when not `active`)."""
        if not active:
            yield
            return
        task = asyncio.get_running_loop().create_task(self._loop())
        try:
            yield
        finally:
            task.cancel()
            self._sample()


# -- manifests ------------------------------------------------------------------------------


def _doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": kind, "metadata": {"name": name}, "spec": spec}


def blueprint_doc(name: str, methods: list[str]) -> dict[str, Any]:
    return _doc("AgentBlueprint", name, {"allowedMethods": methods})


def agent_doc(
    name: str, td: str, blueprint: str, attributes: dict[str, str] | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "spiffeId": f"spiffe://{td}/agents/{name}",
        "blueprint": blueprint,
        "sponsor": "bench@example.com",
    }
    if attributes:
        spec["attributes"] = attributes
    return _doc("Agent", name, spec)


def policy_doc(
    name: str, callers: list[dict[str, Any]], callees: list[dict[str, Any]], methods: list[str]
) -> dict[str, Any]:
    return _doc("AccessPolicy", name, {"callers": callers, "callees": callees, "methods": methods})


def manifest(docs: Iterable[dict[str, Any]]) -> list[rpb.ManifestDocument]:
    return [
        rpb.ManifestDocument(source=f"bench/{d['metadata']['name']}", json=json.dumps(d))
        for d in docs
    ]


# -- operator calls ---------------------------------------------------------------------------

# Operator calls that failed with UNAVAILABLE and were retried, across the run.
RETRIED: dict[str, int] = {"operator_calls": 0}


async def registry_call(fn: Callable[[], Awaitable[T]], *, attempts: int = 5) -> T:
    """An operator call (LocalMesh.apply/token/set_disabled), retried if briefly unreachable.

    Why: `OperatorClient` opens a new channel per call, and
    `trustmesh.grpc_tls.channel_options` sets `grpc.min_reconnect_backoff_ms` = 100,
    which grpc core also takes as the minimum connect timeout. On a loaded machine a
    TLS handshake through the bridge can take longer, and the call fails with
    UNAVAILABLE before anything reached the registry, so a retry is safe.
    """
    for attempt in range(attempts):
        try:
            return await fn()
        except RegistryUnavailableError:
            if attempt == attempts - 1:
                raise
            RETRIED["operator_calls"] += 1
            await asyncio.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


# -- helper processes ----------------------------------------------------------------------


class ChildError(RuntimeError):
    """A helper process failed or answered with an error."""


class Child:
    """A helper process (`python -m bench.<module>`) driven over JSON lines."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log

    @classmethod
    async def start(
        cls, name: str, module: str, *args: str, workdir: Path, timeout: float = 60.0
    ) -> tuple[Child, dict[str, Any]]:
        """Start the child and return it with its greeting."""
        workdir.mkdir(parents=True, exist_ok=True)
        log = workdir / f"{name}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                module,
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=REPO,
                env=env,
                limit=_LINE_LIMIT,
            )
        child = cls(name, proc, log)
        try:
            hello = await child._read(timeout)
        except BaseException:
            await child.stop()
            raise
        return child, hello

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    async def request(self, op: str, *, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        if self.proc.stdin is None or self.proc.returncode is not None:
            raise ChildError(f"{self.name} is not running:\n{self.tail()}")
        self.proc.stdin.write((json.dumps({"op": op, **fields}) + "\n").encode())
        await self.proc.stdin.drain()
        return await self._read(timeout)

    async def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise ChildError(f"{self.name}: no answer within {timeout:.0f} s") from None
        if not line:
            await asyncio.wait_for(self.proc.wait(), 5)
            raise ChildError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
        msg: dict[str, Any] = json.loads(line)
        if "error" in msg:
            raise ChildError(f"{self.name}: {msg['error']}")
        return msg

    async def stop(self, timeout: float = 10.0) -> None:
        if self.proc.returncode is None:
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.write(b'{"op": "quit"}\n')
                    self.proc.stdin.close()
                await asyncio.wait_for(self.proc.wait(), timeout)
            except (TimeoutError, ConnectionError, OSError):
                self.proc.kill()
                await self.proc.wait()


def _send(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def serve(
    hello: dict[str, Any], handle: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
) -> None:
    """Child side: greet, then answer one line per request until quit or end of input."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    _send(hello)
    while line := await reader.readline():
        msg = json.loads(line)
        if msg.get("op") == "quit":
            return
        try:
            reply = await handle(msg)
        except Exception as e:  # the parent gets one line, the log gets the detail
            print(f"{msg.get('op')}: {type(e).__name__}: {e}", file=sys.stderr)
            reply = {"error": f"{msg.get('op')}: {type(e).__name__}: {e}"}
        _send(reply)
