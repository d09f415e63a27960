"""The CLI's commands. `trustmesh.cli.main` parses; this module acts.

This is the composition root: it may import the sidecar and the registry packages,
which never import each other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import yaml

from trustmesh import event_loop
from trustmesh.client_config import default_config_path
from trustmesh.errors import ConfigError, RegistryUnavailableError
from trustmesh.manifest import parse_sourced, to_document
from trustmesh.operator_client import OperatorClient
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.x509svid import (
    BundleSet,
    TrustBundle,
    X509Svid,
    generate_key,
    make_csr,
    write_private_file,
    write_public_file,
)

__all__ = ["dispatch", "parse_duration"]

_DURATION = re.compile(r"^([0-9]{1,12})(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


_MAX_DURATION_S = 3650 * 86400


def parse_duration(text: str) -> timedelta:
    m = _DURATION.match(text.strip())
    if not m:
        raise ConfigError(
            f"bad duration {text!r}: use a number and a unit, like 90s, 30m, 1h or 7d"
        )
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if not 0 < seconds <= _MAX_DURATION_S:
        raise ConfigError(f"bad duration {text!r}: must be more than 0s and at most 3650d")
    return timedelta(seconds=seconds)


def now() -> datetime:
    return datetime.now(UTC)


def _client(args: argparse.Namespace) -> OperatorClient:
    if args.credentials:
        if not args.trust_bundle or not args.registry:
            raise ConfigError("--credentials needs --trust-bundle and --registry too")
        return OperatorClient.from_pem(
            Path(args.credentials), Path(args.trust_bundle), args.registry
        )
    path = Path(args.config) if args.config else default_config_path()
    return OperatorClient.from_config(path, registry=args.registry)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e


def _print(data: Any, output: str) -> None:
    if output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
    elif output == "yaml":
        print(yaml.safe_dump(data, sort_keys=False), end="")
    elif isinstance(data, list):
        for line in data:
            print(line)
    else:
        print(data)


# -- commands ------------------------------------------------------------------------------


def cmd_apply(args: argparse.Namespace) -> int:
    documents = []
    for name in args.filename:
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read {name}: {e.strerror}") from e
        for doc in parse_sourced(text, "stdin" if name == "-" else name):
            documents.append(
                rpb.ManifestDocument(
                    source=doc.source, json=json.dumps(to_document(doc.resource), default=str)
                )
            )
    client = _client(args)
    resp = asyncio.run(
        client.call(
            lambda s: s.Apply(
                rpb.ApplyRequest(documents=documents, dry_run=args.dry_run), timeout=30
            )
        )
    )
    suffix = " (dry run)" if args.dry_run else ""
    _print(
        [f"{line}{suffix}" for line in resp.applied]
        if args.output == "text"
        else {"applied": list(resp.applied), "revision": resp.revision},
        args.output,
    )
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    client = _client(args)
    resp = asyncio.run(
        client.call(lambda s: s.Get(rpb.GetRequest(kind=args.kind, name=args.name), timeout=30))
    )
    docs = [json.loads(j) for j in resp.json]
    if args.output != "text":
        _print(docs if not args.name else docs[0], args.output)
        return 0
    rows = [("KIND", "NAME", "DETAIL")]
    for d in docs:
        spec, status = d.get("spec", {}), d.get("status", {})
        detail = (
            spec.get("spiffeId", "")
            or spec.get("description", "")
            or ",".join(spec.get("methods", []))
        )
        if status:
            detail += f"  {status.get('state')}  endpoints={len(status.get('endpoints', []))}"
        rows.append((d["kind"], d["metadata"]["name"], detail))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    client = _client(args)
    asyncio.run(
        client.call(
            lambda s: s.Delete(rpb.DeleteRequest(kind=args.kind, name=args.name), timeout=30)
        )
    )
    print(f"{args.kind}/{args.name} deleted")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    spiffe_id = SpiffeId.parse(args.spiffe_id)
    ttl = parse_duration(args.ttl)
    if not 1 <= args.uses <= 10_000:
        raise ConfigError(f"--uses must be between 1 and 10000, got {args.uses}")
    client = _client(args)
    req = rpb.CreateJoinTokenRequest(
        spiffe_id=str(spiffe_id), ttl_seconds=int(ttl.total_seconds()), uses=args.uses
    )
    resp = asyncio.run(client.call(lambda s: s.CreateJoinToken(req, timeout=30)))
    if args.output == "json":
        _print(
            {"token": resp.token, "expiresAt": resp.expires_at, "spiffeId": str(spiffe_id)}, "json"
        )
    else:
        print(resp.token)
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    disabled = args.agent_command == "disable"
    client = _client(args)
    req = rpb.SetAgentStateRequest(
        agent=args.agent, disabled=disabled, reason=getattr(args, "reason", "") or ""
    )
    resp = asyncio.run(client.call(lambda s: s.SetAgentState(req, timeout=30)))
    print(f"agent {args.agent} {'disabled' if disabled else 'enabled'} (revision {resp.revision})")
    return 0


def cmd_operator_renew(args: argparse.Namespace) -> int:
    client = _client(args)
    if client.config is None:
        raise ConfigError("operator renew writes the files named by a client config; pass --config")
    key = generate_key()
    csr = make_csr(key, client.svid.spiffe_id)
    resp = asyncio.run(
        client.call(lambda s: s.RenewSvid(rpb.RenewSvidRequest(csr=csr), timeout=30))
    )
    svid = X509Svid.from_der(list(resp.cert_chain), key)
    write_private_file(client.config.key, svid.key_pem())
    write_public_file(client.config.certificate, svid.chain_pem())
    print(
        f"renewed {svid.spiffe_id}: serial {svid.serial_hex}, expires {svid.not_after:%Y-%m-%d %H:%M}Z"
    )
    return 0


def cmd_registry_init(args: argparse.Namespace) -> int:
    from trustmesh_registry.datadir import DataDir

    td = TrustDomain.parse(args.trust_domain)
    cfg = DataDir(Path(args.data_dir)).init(td, now=now(), registry_address=args.registry)
    data = Path(args.data_dir).resolve()
    print(f"initialised trust domain {td} in {data}")
    print(f"  CA fingerprint: {_fingerprint(cfg.bundle)}")
    print(f"  operator credential: {cfg.certificate}")
    print(
        f"  client config: {data / 'config.yaml'}  (export TRUSTMESH_CONFIG={data / 'config.yaml'})"
    )
    return 0


def _fingerprint(bundle: Path) -> str:
    from cryptography import x509

    from trustmesh.x509svid import ca_fingerprint

    return ca_fingerprint(x509.load_pem_x509_certificates(bundle.read_bytes())[0])


def _run_until_signal(
    start: Callable[[], Awaitable[Any]],
    stop: Callable[[], Awaitable[Any]],
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> int:
    async def body() -> None:
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, done.set)
        # A signal also ends a start that is still waiting: with --credentials spiffe,
        # start() retries for as long as the Workload API stays away.
        starting = asyncio.ensure_future(start())
        signalled = asyncio.ensure_future(done.wait())
        try:
            await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                return
            starting.result()
            await signalled
        finally:
            signalled.cancel()
            await stop()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(body())
    return 0


_CA_FLAGS = (
    ("join_token", "--join-token"),
    ("trust_bundle", "--trust-bundle"),
    ("ca_fingerprint", "--ca-fingerprint"),
)


def _credentials_mode(args: argparse.Namespace, *, auto: bool) -> str:
    """`ca` or `spiffe`. With `auto` (the sidecar), SPIFFE_ENDPOINT_SOCKET alone, with
    no embedded-CA flag, selects `spiffe`."""
    mode = args.credentials
    if mode not in (None, "", "ca", "spiffe"):
        raise ConfigError(f"--credentials {mode!r}: use ca (the embedded CA) or spiffe (SPIRE)")
    if not mode:
        ca_flags = any(getattr(args, name, None) for name, _ in _CA_FLAGS)
        mode = "spiffe" if auto and args.spiffe_endpoint_socket and not ca_flags else "ca"
    if mode == "spiffe":
        if not args.spiffe_endpoint_socket:
            raise ConfigError(
                "--credentials spiffe needs the Workload API socket: set SPIFFE_ENDPOINT_SOCKET "
                "or pass --spiffe-endpoint-socket unix:///run/spire/agent.sock"
            )
        from trustmesh_sidecar.spiffe_source import endpoint_socket

        endpoint_socket(args.spiffe_endpoint_socket)
    return str(mode)


def _federated_bundles(args: argparse.Namespace) -> BundleSet:
    values = args.federated_bundle
    if values is None:
        env = os.environ.get("TRUSTMESH_FEDERATED_BUNDLES", "")
        values = [v for v in env.split(",") if v.strip()]
    result = BundleSet()
    for value in values:
        name, sep, path = value.partition("=")
        name = name.strip().removeprefix("spiffe://")
        if not sep or not name or not path.strip():
            raise ConfigError(
                f"--federated-bundle {value!r}: expected TRUST_DOMAIN=PATH, "
                "e.g. partner.example=/etc/trustmesh/partner.pem"
            )
        td = TrustDomain.parse(name)
        if result.get(td) is not None:
            raise ConfigError(f"--federated-bundle names trust domain '{td}' twice")
        bundle = TrustBundle.from_pem(td, _read(Path(path.strip())))
        if not bundle.authorities:
            raise ConfigError(f"--federated-bundle {td}: {path.strip()} holds no certificate")
        result = result.with_bundle(bundle)
    return result


def cmd_registry_serve(args: argparse.Namespace) -> int:
    from trustmesh.telemetry import configure_tracing
    from trustmesh_registry.server import RegistryServer, ServeConfig

    federated = _federated_bundles(args)
    workload_api = None
    if _credentials_mode(args, auto=False) == "spiffe":
        # The composition root lends the sidecar's Workload API source to the registry.
        from trustmesh_sidecar.spiffe_source import WorkloadApiSource

        workload_api = WorkloadApiSource(args.spiffe_endpoint_socket, federated=federated)
        federated = BundleSet()
    configure_tracing("trustmesh-registry")
    config = ServeConfig(
        Path(args.data_dir),
        listen=args.listen,
        bootstrap_listen=args.bootstrap_listen,
        health_listen=args.health_listen,
        svid_ttl=parse_duration(args.svid_ttl),
        federated_bundles=federated,
    )
    server = RegistryServer(config, workload_api=workload_api)

    async def start() -> None:
        await server.start()
        print(
            f"registry serving on {server.address} (mTLS) and {server.bootstrap_address} (bootstrap)",
            flush=True,
        )

    return _run_until_signal(start, server.stop)


def _audit_flush_ms(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 10_000:
        raise ConfigError(
            f"--audit-flush-ms {text!r}: expected whole milliseconds from 0 to 10000 "
            "(0 writes every audit line at once)"
        )
    return value


def cmd_sidecar_run(args: argparse.Namespace) -> int:
    from trustmesh.telemetry import configure_tracing
    from trustmesh_sidecar.oidc_config import load_issuers
    from trustmesh_sidecar.runtime import Sidecar, SidecarConfig

    spiffe = _credentials_mode(args, auto=True) == "spiffe"
    # In SPIFFE mode the identity is the SVID's; --spiffe-id, if given, must match it.
    required = ["registry", "app", "data_dir"]
    if not spiffe:
        required.insert(0, "spiffe_id")
    missing = [f"--{f.replace('_', '-')}" for f in required if not getattr(args, f)]
    if missing:
        raise ConfigError(
            f"sidecar run needs {', '.join(missing)} (or their TRUSTMESH_* variables)"
        )
    if spiffe:
        given = [flag for name, flag in _CA_FLAGS if getattr(args, name)]
        if given:
            raise ConfigError(
                f"{', '.join(given)}: embedded-CA flags, but this sidecar takes its SVID from "
                "the SPIFFE Workload API; drop them, or pass --credentials ca"
            )
    loop_factory = event_loop.loop_factory(args.event_loop)  # a bad choice fails first
    audit_flush_ms = _audit_flush_ms(args.audit_flush_ms)
    provider = configure_tracing(f"trustmesh-sidecar {args.spiffe_id or '(spiffe)'}")
    config = SidecarConfig(
        spiffe_id=SpiffeId.parse(args.spiffe_id) if args.spiffe_id else None,
        spiffe_endpoint_socket=args.spiffe_endpoint_socket if spiffe else None,
        federated_bundles=_federated_bundles(args),
        registry=args.registry,
        registry_bootstrap=args.registry_bootstrap or "",
        join_token=args.join_token,
        trust_bundle=Path(args.trust_bundle) if args.trust_bundle else None,
        ca_fingerprint=args.ca_fingerprint,
        app=args.app,
        outbound=args.outbound,
        inbound=args.inbound,
        advertise=args.advertise or "",
        admin=args.admin,
        data_dir=Path(args.data_dir),
        user_token_issuers=load_issuers(Path(args.oidc_issuers)) if args.oidc_issuers else (),
        engine=args.engine,
        audit_flush_interval=audit_flush_ms / 1000,
    )
    sidecar = Sidecar(config, tracer_provider=provider)

    async def start() -> None:
        await sidecar.start()
        # What start-up built (modules, protobuf descriptors, the OpenTelemetry SDK, the
        # engine) lives as long as this process. Out of the collector's sight, a full
        # collection no longer walks it: that was a ~33 ms pause, a p99 spike on a call.
        gc.collect()
        gc.freeze()
        me = sidecar.state.spiffe_id if sidecar.state is not None else config.spiffe_id
        print(
            f"sidecar {me} outbound={sidecar.outbound_address} "
            f"inbound={sidecar.inbound_address} admin={sidecar.admin_address} "
            f"event_loop={event_loop.running_name()}",
            flush=True,
        )

    async def stop() -> None:
        await sidecar.stop()
        provider.shutdown()

    return _run_until_signal(start, stop, loop_factory)


def cmd_sidecar_status(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from trustmesh.v1 import sidecar_pb2 as spb
    from trustmesh.v1 import sidecar_pb2_grpc as sgrpc

    async def ask() -> spb.StatusResponse:
        async with grpc.aio.insecure_channel(args.admin) as channel:
            try:
                status: spb.StatusResponse = await sgrpc.SidecarAdminStub(channel).Status(
                    spb.StatusRequest(), timeout=5
                )
                return status
            except grpc.aio.AioRpcError as e:
                raise RegistryUnavailableError(
                    f"no sidecar admin API at {args.admin}: {e.code().name}"
                ) from e

    status = asyncio.run(ask())
    data = MessageToDict(status, preserving_proto_field_name=True)
    if args.output == "json":
        _print(data, "json")
    else:
        for k, v in data.items():
            print(f"{k}: {v}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from trustmesh.demo.run import run_demo

    return run_demo(keep=args.keep, verbose=args.verbose)


def dispatch(args: argparse.Namespace) -> int:
    command = args.command
    if command == "registry":
        return (
            cmd_registry_init(args) if args.registry_command == "init" else cmd_registry_serve(args)
        )
    if command == "sidecar":
        return cmd_sidecar_run(args) if args.sidecar_command == "run" else cmd_sidecar_status(args)
    table: dict[str, Callable[[argparse.Namespace], int]] = {
        "apply": cmd_apply,
        "get": cmd_get,
        "delete": cmd_delete,
        "token": cmd_token,
        "agent": cmd_agent,
        "operator": cmd_operator_renew,
        "demo": cmd_demo,
    }
    return table[command](args)
