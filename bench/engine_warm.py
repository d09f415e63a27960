"""The h2 engine's own per-call cost, warm: one sidecar's engine, in memory.

    python -m bench.engine_warm                  # 5 rounds of 5,000 calls
    python -m bench.engine_warm --profile        # cProfile of one round, by own time
    python -m bench.engine_warm --tree DIR      # the engine of another checkout (A/B)

A white-box microbenchmark: it builds an `H2Engine` with a throwaway CA, accepts one
downstream (agent-side) connection and puts one upstream connection in the engine's
pool, both on in-memory transports, and drives 1 KiB unary calls through them with a
router that forwards everything (no policy, spans or audit). Request and response
bytes are encoded before the clock starts, so only the engine's work is timed: both
traversals of one sidecar (request in, upstream; response in, downstream), frames,
HPACK, gRPC header checks, the call's bookkeeping and the writes to the transports.

It measures code, not the machine: no sockets, no TLS, no other processes, and caches
as warm as they get. Under sequential load the same code runs ~3x slower inside a
sidecar (README, Performance); use `python -m bench.latency_h2 --tree` for that.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hpack

from trustmesh.ca import CertificateAuthority
from trustmesh.errors import Code
from trustmesh.event_loop import loop_factory
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.x509svid import BundleSet, X509Svid, generate_key, make_csr
from trustmesh_sidecar import headers as hdr
from trustmesh_sidecar.engine import CallControl, CallStart, Forward, Headers, Upstream
from trustmesh_sidecar.h2 import H2Engine
from trustmesh_sidecar.h2 import frames as f
from trustmesh_sidecar.h2.connection import H2Connection

__all__ = ["main"]

APP = "127.0.0.1:1"  # never dialled: the pool already holds a connection to it
BODY = b"\x00" + (1024).to_bytes(4, "big") + b"x" * 1024  # one 1 KiB gRPC message


class _Transport(asyncio.Transport):
    """Collects what the engine writes; nothing is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 4242) if name == "peername" else default


class _Observer:
    def response_headers(self, headers: Headers) -> Headers:
        return hdr.kept(headers)

    def finished(self, code: Code, details: str) -> None:
        pass


class _Router:
    def __init__(self) -> None:
        self._upstream = Upstream(APP, None)

    def route(self, call: CallStart, control: CallControl) -> Forward:
        return Forward(self._upstream, tuple(hdr.strip_reserved(call.headers)), _Observer())


def _engine() -> H2Engine:
    now = datetime.now(UTC)
    td = TrustDomain.parse("bench.local")
    ca = CertificateAuthority.create(td, now=now)
    sid = SpiffeId.parse("spiffe://bench.local/agents/bench")
    key = generate_key()
    cert = ca.sign_csr(make_csr(key, sid), sid, now=now, ttl=timedelta(hours=1))
    return H2Engine(X509Svid(sid, (cert,), key), BundleSet.of(ca.bundle()))


def _calls(n: int) -> list[tuple[bytes, bytes]]:
    """Request bytes from the agent and response bytes from the app, call by call, as
    grpc-python sends them. Its deadline is sent rounded, and grpc-core's encoder
    reuses the table entry of a recent timeout within a few percent of it, so in a
    steady stream of calls with the same deadline (5 s) the block is all indexed
    fields, alternating between a couple of timeout entries (captured from grpcio 1.68+:
    `5S`, then `5010m`)."""
    agent, app = hpack.Encoder(), hpack.Encoder()
    out = []
    for i in range(n):
        sid = 2 * i + 1  # the agent's stream ids, and the engine's upstream ones
        block = agent.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/bench.Echo/Unary"),
                (":authority", "127.0.0.1:15001"),
                ("grpc-timeout", "5010m" if i % 3 else "5S"),
                ("te", "trailers"),
                ("content-type", "application/grpc"),
                ("user-agent", "grpc-python-asyncio/1.68.0 grpc-c/44.0.0 (linux; chttp2)"),
                ("grpc-accept-encoding", "identity, deflate, gzip"),
                ("trustmesh-target", "server"),
            ]
        )
        request = f.headers_frames(sid, block, False, 16384) + f.data_frame(sid, BODY, True)
        headers = app.encode([(":status", "200"), ("content-type", "application/grpc")])
        trailers = app.encode([("grpc-status", "0")])
        response = (
            f.headers_frames(sid, headers, False, 16384)
            + f.data_frame(sid, BODY, False)
            + f.headers_frames(sid, trailers, True, 16384)
            + f.window_update_frame(0, len(BODY))  # the app's credit for the request
        )
        out.append((request, response))
    return out


async def _run(rounds: int, calls: int, profile: bool) -> list[float]:
    # White-box: the engine's private parts stand in for its listeners and dialler.
    engine = _engine()
    engine._loop = asyncio.get_running_loop()
    down = engine._server_connection(_Router())
    down_out = _Transport()
    down.connection_made(down_out)
    down.data_received(f.PREFACE + f.settings_frame({}) + f.settings_frame(ack=True))
    up = H2Connection(engine.config, client=True)
    up_out = _Transport()
    up.connection_made(up_out)
    up.data_received(f.settings_frame({}) + f.settings_frame(ack=True))
    engine._pool[(APP, None)] = [up]
    engine._generations[up] = 0
    warm = 2000
    traffic = _calls(warm + rounds * calls)
    credit = f.window_update_frame(0, len(BODY))  # the agent's credit for the response

    def one(i: int) -> None:
        request, response = traffic[i]
        down.data_received(request)
        up.data_received(response)
        down.data_received(credit)
        down_out.out.clear()
        up_out.out.clear()

    for i in range(warm):
        one(i)
    if up._next_id != 2 * warm + 1:
        raise RuntimeError("the engine did not forward every call on the pooled connection")
    results = []
    for r in range(rounds):
        start = warm + r * calls
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            profiler.enable()
        t = time.perf_counter()
        for i in range(start, start + calls):
            one(i)
        results.append((time.perf_counter() - t) / calls * 1e6)
        if profiler is not None:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            break
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_warm", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--profile", action="store_true", help="cProfile one round")
    parser.add_argument("--tree", type=Path, help="measure the engine of this checkout")
    args = parser.parse_args(argv)
    if args.tree is not None:  # this file, run with the other tree first on the path
        tree = args.tree.resolve()
        paths = [str(tree), str(tree / "sidecar"), str(tree / "registry")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        rest = ["--rounds", str(args.rounds), "--calls", str(args.calls)]
        rest += ["--profile"] if args.profile else []
        return subprocess.call([sys.executable, __file__, *rest], env=env, cwd=tree)
    with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:  # the sidecar's loop
        results = runner.run(_run(args.rounds, args.calls, args.profile))
    if not args.profile:
        rounds = " ".join(f"{r:.1f}" for r in results)
        print(
            f"h2 engine, one sidecar, both traversals, warm: "
            f"{statistics.median(results):.1f} us per call (median; rounds: {rounds}); "
            f"engine from {Path(sys.modules[H2Engine.__module__].__file__ or '?').parent}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
