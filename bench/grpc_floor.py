"""Where grpcio's floor is: a do-nothing grpc.aio forwarder pair against the mesh.

    python -m bench.grpc_floor            # 5 rounds: 300 sequential + 2000 at 32 in flight
    python -m bench.grpc_floor --quick    # 1 short round (smoke)

The issue asks, if forwarding at the grpcio level cannot reach 2x a direct call, to
measure where its floor is and say why. The floor is a forwarder that does nothing
but forward: a grpc.aio server with one generic handler per method that passes the
request bytes (no deserializer) to a cached `unary_unary` of a channel upstream and
returns the response bytes. No policy, no spans, no metadata, no identity checks.

Paths, all on loopback, client and echo app in this process, each proxy its own
process, rounds interleaved:

* `direct`: client -> app.
* `floor`: client -> forwarder -> forwarder -> app, plaintext.
* `floor-tls`: the same with mutual TLS (grpc's own SSL credentials) between the two
  forwarders, as between two sidecars.
* `relay-tls`: the floor of any Python proxy pair, grpc or not: two asyncio byte
  relays with mutual TLS between them, parsing nothing (`bench/relay.py`).
* `mesh-grpc`, `mesh-h2`: client -> sidecar -> mTLS -> sidecar -> app with each engine
  (real registry, SVIDs, policy, spans created but not exported).

Besides latency and throughput it reports CPU per call per proxy process: user+system
time from /proc/PID/stat across the throughput phase, divided by the calls. That is
the cost that bounds a 2-core machine, and the one a faster engine has to cut.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.common import machine, order_of_round
from bench.inproc import cpu_seconds, echo_server, mesh_docs, pct, sequential, throughput
from bench.relay import relay
from trustmesh.demo.mesh import LocalMesh
from trustmesh.event_loop import loop_factory

HOST = "floor.test"  # the DNS name in the forwarders' certificates (grpc checks it)


# -- the forwarder (a child process) ----------------------------------------------------


async def forwarder(listen: str, upstream: str, tls_dir: Path | None, role: str) -> None:
    """`role` "outer" listens in plaintext and dials upstream over mTLS (when
    `tls_dir`); "inner" listens with mTLS and dials upstream in plaintext."""
    if tls_dir is not None and role == "outer":
        creds = grpc.ssl_channel_credentials(
            (tls_dir / "ca.pem").read_bytes(),
            (tls_dir / "outer.key").read_bytes(),
            (tls_dir / "outer.pem").read_bytes(),
        )
        channel = grpc.aio.secure_channel(
            upstream, creds, options=[("grpc.ssl_target_name_override", HOST)]
        )
    else:
        channel = grpc.aio.insecure_channel(upstream)
    handlers: dict[str, grpc.RpcMethodHandler] = {}

    class Forward(grpc.GenericRpcHandler):  # type: ignore[misc]
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            method = details.method
            found = handlers.get(method)
            if found is None:
                call = channel.unary_unary(method)

                async def handle(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
                    return await call(req, timeout=ctx.time_remaining())  # type: ignore[no-any-return]

                found = handlers[method] = grpc.unary_unary_rpc_method_handler(handle)
            return found

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([Forward()])
    if tls_dir is not None and role == "inner":
        server_creds = grpc.ssl_server_credentials(
            [((tls_dir / "inner.key").read_bytes(), (tls_dir / "inner.pem").read_bytes())],
            root_certificates=(tls_dir / "ca.pem").read_bytes(),
            require_client_auth=True,
        )
        port = server.add_secure_port(listen, server_creds)
    else:
        port = server.add_insecure_port(listen)
    await server.start()
    print(f"listening 127.0.0.1:{port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF
    await server.stop(0)


def _write_tls(directory: Path) -> None:
    """A throwaway CA and two leaves with DNS name `HOST` (0600, test material only)."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "grpc floor bench CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name in ("outer", "inner"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        key_path = directory / f"{name}.key"
        key_path.touch(mode=0o600)
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))  # fmt: skip
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# -- the harness ------------------------------------------------------------------------


def _cpu_ms(pid: int) -> float:
    return cpu_seconds([pid]) * 1000


async def _start_forwarder(
    upstream: str, tls_dir: Path | None, role: str, kind: str
) -> tuple[asyncio.subprocess.Process, str]:
    args = [sys.executable, "-m", "bench.grpc_floor", f"--{kind}", upstream, "--role", role]
    if tls_dir is not None:
        args += ["--tls-dir", str(tls_dir)]
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
    if not line.startswith("listening "):
        raise RuntimeError(f"forwarder did not start: {line!r}")
    return proc, line.split()[1]


async def _floor(
    app: str, tls_dir: Path | None, procs: list[asyncio.subprocess.Process], kind: str = "forward"
) -> tuple[str, list[int]]:
    inner, inner_addr = await _start_forwarder(app, tls_dir, "inner", kind)
    procs.append(inner)
    outer, outer_addr = await _start_forwarder(inner_addr, tls_dir, "outer", kind)
    procs.append(outer)
    return outer_addr, [outer.pid, inner.pid]


async def _mesh(root: Path, app: str, engine: str) -> tuple[LocalMesh, str, list[int]]:
    env = {"OTEL_TRACES_EXPORTER": "none", "TRUSTMESH_ENGINE": engine}
    mesh = LocalMesh(root, extra_env=env, log_dir=root / "logs")
    await mesh.start_registry()
    await mesh.apply(mesh_docs())
    client = await mesh.start_sidecar("client", "127.0.0.1:9")
    server = await mesh.start_sidecar("server", app)
    return mesh, client.outbound, [client.process.pid, server.process.pid]


async def run(rounds: int, calls: int, tput_calls: int, inflight: int) -> dict[str, Any]:
    server, app = await echo_server()
    procs: list[asyncio.subprocess.Process] = []
    meshes: list[LocalMesh] = []
    channels: list[grpc.aio.Channel] = []
    with tempfile.TemporaryDirectory(prefix="tm-bench-floor-") as tmp:
        try:
            tls_dir = Path(tmp) / "tls"
            _write_tls(tls_dir)
            targets: dict[str, tuple[str, list[tuple[str, str]], list[int]]] = {
                "direct": (app, [], [])
            }
            addr, pids = await _floor(app, None, procs)
            targets["floor"] = (addr, [], pids)
            addr, pids = await _floor(app, tls_dir, procs)
            targets["floor-tls"] = (addr, [], pids)
            addr, pids = await _floor(app, tls_dir, procs, "relay")
            targets["relay-tls"] = (addr, [], pids)
            for engine in ("grpc", "h2"):
                mesh, outbound, pids = await _mesh(Path(tmp) / engine, app, engine)
                meshes.append(mesh)
                targets[f"mesh-{engine}"] = (outbound, [("trustmesh-target", "server")], pids)
            paths = {}
            for name, (address, md, pids) in targets.items():
                channel = grpc.aio.insecure_channel(address)
                channels.append(channel)
                paths[name] = (channel, md, pids)
                await sequential(channel, md, 50)  # warm: connections, caches
            rows: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
            for r in range(rounds):
                for name in order_of_round(list(paths), r):
                    channel, md, pids = paths[name]
                    lat = await sequential(channel, md, calls)
                    before = [_cpu_ms(p) for p in pids]
                    rate = await throughput(channel, md, tput_calls, inflight)
                    cpu = [(_cpu_ms(p) - b) / tput_calls for p, b in zip(pids, before, strict=True)]
                    rows[name].append({
                        "p50": statistics.median(lat),
                        "p99": pct(lat, 0.99),
                        "rps": rate,
                        "cpu_ms_per_call_per_proxy": statistics.mean(cpu) if cpu else 0.0,
                    })  # fmt: skip
        finally:
            for channel in channels:
                await channel.close()
            for proc in procs:
                if proc.stdin is not None:
                    proc.stdin.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 5)
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            for mesh in meshes:
                await mesh.stop()
            await server.stop(0)
    keys = ("p50", "p99", "rps", "cpu_ms_per_call_per_proxy")
    summary: dict[str, Any] = {
        "machine": machine(),
        "rounds": rounds,
        "calls_per_round": calls,
        "throughput_calls": tput_calls,
        "inflight": inflight,
        "paths": {
            n: {k: statistics.median(r[k] for r in v) for k in keys} for n, v in rows.items()
        },
    }
    direct = summary["paths"]["direct"]
    for values in summary["paths"].values():
        values["ratio_p50"] = values["p50"] / direct["p50"]
        values["ratio_p99"] = values["p99"] / direct["p99"]
        values["ratio_rps"] = values["rps"] / direct["rps"]
    return summary


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['rounds']} rounds x ({summary['calls_per_round']} sequential + "
        f"{summary['throughput_calls']} at {summary['inflight']} in flight), medians over "
        f"rounds; {summary['machine'].get('cpus', '?')} cores",
        "",
        "| path | p50 (ms) | p99 (ms) | calls/s | p50 / direct | p99 / direct "
        "| throughput / direct | CPU ms per call per proxy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in summary["paths"].items():
        cpu = f"{v['cpu_ms_per_call_per_proxy']:.2f}" if name != "direct" else "-"
        lines.append(
            f"| {name} | {v['p50']:.3f} | {v['p99']:.3f} | {v['rps']:.0f} | "
            f"{v['ratio_p50']:.2f}x | {v['ratio_p99']:.2f}x | {v['ratio_rps']:.2f}x | {cpu} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--throughput-calls", type=int, default=2000)
    parser.add_argument("--inflight", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="1 round of 30 + 200 calls")
    parser.add_argument("--out", default="", help="directory for grpc_floor.{json,md}")
    parser.add_argument("--forward", metavar="UPSTREAM", help=argparse.SUPPRESS)
    parser.add_argument("--relay", metavar="UPSTREAM", help=argparse.SUPPRESS)
    parser.add_argument("--role", choices=("outer", "inner"), help=argparse.SUPPRESS)
    parser.add_argument("--tls-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # The proxy floors run on the event loop a sidecar runs on (`--event-loop auto`).
    if args.forward:
        with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
            runner.run(forwarder("127.0.0.1:0", args.forward, args.tls_dir, args.role))
        return
    if args.relay:
        with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
            runner.run(relay("127.0.0.1:0", args.relay, args.tls_dir, args.role))
        return
    rounds, calls, tput = (1, 30, 200) if args.quick else (
        args.rounds, args.calls, args.throughput_calls)  # fmt: skip
    summary = asyncio.run(run(rounds, calls, tput, args.inflight))
    table = markdown(summary)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "grpc_floor.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "grpc_floor.md").write_text(table)


if __name__ == "__main__":
    main()
