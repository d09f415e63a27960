"""`trustmesh webhook serve|certs` and `trustmesh reconcile`.

`add_k8s_commands(sub)` adds the parsers to `trustmesh.cli.main`'s subparsers, and
`dispatch_k8s(args)` runs them; both sit behind `main()`'s one error boundary, so
errors are `MeshError`s that it prints as one line. Every flag has a
`TRUSTMESH_*` variable, as the sidecar's do, so the manifests need no arguments
beyond the subcommand.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from trustmesh.errors import ConfigError

__all__ = ["add_k8s_commands", "dispatch_k8s"]


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def _flag(p: argparse.ArgumentParser, flag: str, env: str, default: str | None, help_: str) -> None:
    p.add_argument(flag, default=_env(env, default), help=f"{help_} (${env})")


def add_k8s_commands(sub: Any) -> None:
    """Add `webhook` and `reconcile` to the `trustmesh` subparsers action `sub`."""
    wh = sub.add_parser("webhook", help="the sidecar-injecting admission webhook")
    wsub = wh.add_subparsers(dest="webhook_command", required=True, metavar="SUBCOMMAND")
    serve = wsub.add_parser("serve", help="serve the mutating webhook over HTTPS")
    _flag(serve, "--listen", "TRUSTMESH_WEBHOOK_LISTEN", "0.0.0.0:9443", "HTTPS address")
    _flag(
        serve,
        "--tls-cert",
        "TRUSTMESH_WEBHOOK_TLS_CERT",
        "/etc/trustmesh/webhook-tls/tls.crt",
        "serving certificate (PEM)",
    )
    _flag(
        serve,
        "--tls-key",
        "TRUSTMESH_WEBHOOK_TLS_KEY",
        "/etc/trustmesh/webhook-tls/tls.key",
        "serving key (PEM)",
    )
    _flag(
        serve,
        "--config-dir",
        "TRUSTMESH_WEBHOOK_CONFIG_DIR",
        "/etc/trustmesh/webhook",
        "mounted ConfigMap, one file per key",
    )
    _flag(
        serve,
        "--ca-bundle",
        "TRUSTMESH_WEBHOOK_CA_BUNDLE",
        "/etc/trustmesh/trust-bundle/bundle.pem",
        "registry trust bundle; its fingerprint is used when caFingerprint is unset",
    )
    certs = wsub.add_parser("certs", help="make the webhook's serving certificate and CA")
    certs.add_argument("--service", default="trustmesh-webhook")
    certs.add_argument("--namespace", default="trustmesh-system")
    certs.add_argument("--days", type=int, default=365)
    certs.add_argument("--out", required=True, help="directory for ca.crt, tls.crt, tls.key")

    rec = sub.add_parser("reconcile", help="apply TrustMesh custom resources to the registry")
    _flag(rec, "--registry", "TRUSTMESH_REGISTRY", None, "the registry's mTLS address")
    _flag(
        rec,
        "--credentials",
        "TRUSTMESH_OPERATOR_CREDENTIALS",
        None,
        "PEM file with the operator certificate chain and key",
    )
    _flag(
        rec, "--trust-bundle", "TRUSTMESH_TRUST_BUNDLE", None, "the registry's trust bundle (PEM)"
    )
    _flag(rec, "--config", "TRUSTMESH_CONFIG", None, "a client config, instead of the three above")
    _flag(rec, "--kubeconfig", "KUBECONFIG", None, "default: the pod's service account")
    _flag(rec, "--resync", "TRUSTMESH_RESYNC", "60s", "full comparison at least this often")
    rec.add_argument(
        "--prune",
        action="store_true",
        default=_env("TRUSTMESH_PRUNE", "false") == "true",
        help="delete registry resources that have no CR ($TRUSTMESH_PRUNE=true)",
    )


def dispatch_k8s(args: argparse.Namespace) -> int:
    if args.command == "reconcile":
        return _reconcile(args)
    if args.webhook_command == "certs":
        return _certs(args)
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    import logging

    from trustmesh.k8s.webhook_config import load_config_dir
    from trustmesh.k8s.webhook_server import WebhookServer

    logging.getLogger("trustmesh.k8s").setLevel(logging.INFO)  # one line per admission
    config = load_config_dir(Path(args.config_dir), ca_bundle=Path(args.ca_bundle))
    server = WebhookServer(config, args.listen, Path(args.tls_cert), Path(args.tls_key))
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    server.start()
    print(
        f"webhook serving on {args.listen} for trust domain {config.trust_domain} "
        f"({config.credentials.value})",
        flush=True,
    )
    try:
        while not done.wait(1.0):
            pass
    finally:
        server.stop()
    return 0


def _certs(args: argparse.Namespace) -> int:
    from trustmesh.k8s.certs import webhook_tls
    from trustmesh.x509svid import write_private_file, write_public_file

    if not 1 <= args.days <= 3650:
        raise ConfigError(f"--days must be between 1 and 3650, got {args.days}")
    tls = webhook_tls(
        args.service, args.namespace, now=datetime.now(UTC), validity=timedelta(days=args.days)
    )
    out = Path(args.out)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_public_file(out / "ca.crt", tls.ca_pem)
    write_public_file(out / "tls.crt", tls.cert_pem)
    write_private_file(out / "tls.key", tls.key_pem)
    ns = args.namespace
    print(f"wrote {out / 'ca.crt'}, {out / 'tls.crt'} and {out / 'tls.key'}; now:")
    print(
        f"  kubectl -n {ns} create secret tls trustmesh-webhook-tls "
        f"--cert={out / 'tls.crt'} --key={out / 'tls.key'}"
    )
    print(
        "  kubectl patch mutatingwebhookconfiguration trustmesh-sidecar-injector --type=json "
        '-p \'[{"op":"add","path":"/webhooks/0/clientConfig/caBundle",'
        f'"value":"\'$(base64 -w0 {out / "ca.crt"})\'"}}]\''
    )
    return 0


def _operator_client(args: argparse.Namespace) -> Any:
    from trustmesh.operator_client import OperatorClient

    if args.credentials:
        if not args.trust_bundle or not args.registry:
            raise ConfigError("--credentials needs --trust-bundle and --registry too")
        return OperatorClient.from_pem(
            Path(args.credentials), Path(args.trust_bundle), args.registry
        )
    if args.config:
        return OperatorClient.from_config(Path(args.config), registry=args.registry)
    raise ConfigError("reconcile needs --credentials (with --trust-bundle, --registry) or --config")


def _reconcile(args: argparse.Namespace) -> int:
    import logging

    from trustmesh.cli.commands import parse_duration
    from trustmesh.k8s.reconcile_loop import KubeCustomResources, OperatorRegistry, Reconciler

    logging.getLogger("trustmesh.k8s").setLevel(logging.INFO)
    resync = parse_duration(args.resync).total_seconds()
    registry = OperatorRegistry(_operator_client(args))
    source = KubeCustomResources(kubeconfig=args.kubeconfig)
    reconciler = Reconciler(source, registry, prune=args.prune, resync=resync)

    async def body() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(
            f"reconciling TrustMesh CRs into {args.registry or 'the configured registry'} "
            f"(prune={'on' if args.prune else 'off'})",
            flush=True,
        )
        await reconciler.run(stop)

    asyncio.run(body())
    return 0
