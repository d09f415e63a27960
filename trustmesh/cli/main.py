"""`trustmesh`: one command line for operators, platform teams and the demo.

`main(argv) -> int` is the one error boundary: a user sees one clear line on stderr
and a non-zero exit, never a traceback, unless they pass `--verbose`.
Exit codes: 0 ok, 1 error, 2 usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from trustmesh.audit_log import AuditStreamHandler
from trustmesh.errors import MeshError

__all__ = ["build_parser", "entrypoint", "main"]


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="client config file (default: $TRUSTMESH_CONFIG or ~/.config/trustmesh/config.yaml)",
    )
    p.add_argument("--registry", help="registry mTLS address, overriding the config")
    p.add_argument("--credentials", help="PEM file with the operator certificate chain and key")
    p.add_argument("--trust-bundle", help="PEM trust bundle, with --credentials")
    p.add_argument("-o", "--output", choices=["text", "json", "yaml"], default="text")


def _add_spiffe_flags(p: argparse.ArgumentParser, *, default_help: str) -> None:
    """SPIFFE mode (ADR 0007, docs/spire.md): credentials from the Workload API."""
    p.add_argument(
        "--credentials",
        default=_env("TRUSTMESH_CREDENTIALS"),
        metavar="{ca,spiffe}",
        help="where the SVID and bundles come from: the embedded CA, or the SPIFFE Workload "
        f"API (SPIRE); default: {default_help} ($TRUSTMESH_CREDENTIALS)",
    )
    p.add_argument(
        "--spiffe-endpoint-socket",
        default=_env("SPIFFE_ENDPOINT_SOCKET"),
        help="the Workload API address, e.g. unix:///run/spire/agent.sock ($SPIFFE_ENDPOINT_SOCKET)",
    )
    p.add_argument(
        "--federated-bundle",
        action="append",
        metavar="TRUST_DOMAIN=PATH",
        help="PEM bundle of another trust domain; repeatable "
        "($TRUSTMESH_FEDERATED_BUNDLES, comma-separated)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trustmesh", description="A trust mesh for AI agents.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # registry
    reg = sub.add_parser("registry", help="run and initialise the registry")
    rsub = reg.add_subparsers(dest="registry_command", required=True, metavar="SUBCOMMAND")
    init = rsub.add_parser("init", help="create the CA, bundle, operator credential and config")
    init.add_argument("--data-dir", required=True)
    init.add_argument("--trust-domain", required=True)
    init.add_argument(
        "--registry", default="127.0.0.1:8443", help="the address clients will use for the registry"
    )
    serve = rsub.add_parser("serve", help="serve the registry")
    serve.add_argument(
        "--data-dir", default=_env("TRUSTMESH_DATA_DIR"), required=not _env("TRUSTMESH_DATA_DIR")
    )
    serve.add_argument("--listen", default=_env("TRUSTMESH_LISTEN", "127.0.0.1:8443"))
    serve.add_argument(
        "--bootstrap-listen", default=_env("TRUSTMESH_BOOTSTRAP_LISTEN", "127.0.0.1:8444")
    )
    serve.add_argument("--svid-ttl", default=_env("TRUSTMESH_SVID_TTL", "1h"))
    serve.add_argument(
        "--health-listen",
        default=_env("TRUSTMESH_HEALTH_LISTEN", ""),
        help="plaintext listener serving only grpc.health.v1, for probes (off by default)",
    )
    _add_spiffe_flags(serve, default_help="ca")

    # resources
    apply = sub.add_parser("apply", help="create or update resources from YAML")
    apply.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        help="YAML file (repeatable; - for stdin)",
    )
    apply.add_argument("--dry-run", action="store_true")
    _add_client_flags(apply)
    get = sub.add_parser("get", help="show resources")
    get.add_argument("kind", help="agents, blueprints or policies")
    get.add_argument("name", nargs="?", default="")
    _add_client_flags(get)
    delete = sub.add_parser("delete", help="delete a resource")
    delete.add_argument("kind")
    delete.add_argument("name")
    _add_client_flags(delete)

    token = sub.add_parser("token", help="join tokens")
    tsub = token.add_subparsers(dest="token_command", required=True, metavar="SUBCOMMAND")
    tcreate = tsub.add_parser("create", help="create a join token bound to a SPIFFE ID")
    tcreate.add_argument("spiffe_id")
    tcreate.add_argument("--ttl", default="1h", help="e.g. 30m, 1h, 7d")
    tcreate.add_argument(
        "--uses", type=int, default=1, help="N > 1 lets replicas and restarts join"
    )
    _add_client_flags(tcreate)

    agent = sub.add_parser("agent", help="operator state of an agent")
    asub = agent.add_subparsers(dest="agent_command", required=True, metavar="SUBCOMMAND")
    for verb in ("disable", "enable"):
        a = asub.add_parser(verb, help=f"{verb} an agent (apply can't undo this)")
        a.add_argument("agent", help="agent name or SPIFFE ID")
        if verb == "disable":
            a.add_argument("--reason", default="disabled by an operator")
        _add_client_flags(a)

    op = sub.add_parser("operator", help="the operator credential")
    osub = op.add_subparsers(dest="operator_command", required=True, metavar="SUBCOMMAND")
    renew = osub.add_parser("renew", help="renew the operator SVID named by the config")
    _add_client_flags(renew)

    # sidecar
    sc = sub.add_parser("sidecar", help="run the sidecar beside an agent")
    ssub = sc.add_subparsers(dest="sidecar_command", required=True, metavar="SUBCOMMAND")
    run = ssub.add_parser("run", help="run a sidecar")
    for flag, env, default, help_ in [
        ("--spiffe-id", "TRUSTMESH_SPIFFE_ID", None, "the agent's identity"),
        ("--registry", "TRUSTMESH_REGISTRY", None, "the registry's mTLS address"),
        (
            "--registry-bootstrap",
            "TRUSTMESH_REGISTRY_BOOTSTRAP",
            "",
            "the registry's bootstrap address (default: port after --registry)",
        ),
        ("--join-token", "TRUSTMESH_JOIN_TOKEN", None, "the bootstrap token"),
        ("--trust-bundle", "TRUSTMESH_TRUST_BUNDLE", None, "PEM bundle to trust the registry"),
        ("--ca-fingerprint", "TRUSTMESH_CA_FINGERPRINT", None, "or a pinned CA fingerprint"),
        ("--app", "TRUSTMESH_APP", None, "the agent's own gRPC server on localhost"),
        ("--outbound", "TRUSTMESH_OUTBOUND", "127.0.0.1:15001", "the listener the agent calls"),
        ("--inbound", "TRUSTMESH_INBOUND", "0.0.0.0:15443", "the mTLS listener for peers"),
        ("--advertise", "TRUSTMESH_ADVERTISE", "", "the inbound address peers dial"),
        ("--admin", "TRUSTMESH_ADMIN", "127.0.0.1:15000", "health and the local API"),
        ("--data-dir", "TRUSTMESH_DATA_DIR", None, "where the SVID is kept (0700)"),
        (
            "--oidc-issuers",
            "TRUSTMESH_OIDC_ISSUERS",
            None,
            "YAML file of trusted user-token issuers",
        ),
        ("--engine", "TRUSTMESH_ENGINE", "h2", "forwarding engine: h2 or grpc (ADR 0009)"),
        (
            "--event-loop",
            "TRUSTMESH_EVENT_LOOP",
            "auto",
            "auto (uvloop if installed), uvloop or asyncio (ADR 0012)",
        ),
        (
            "--audit-flush-ms",
            "TRUSTMESH_AUDIT_FLUSH_MS",
            "50",
            "how long an allowed call's audit line may wait to be written in a batch; "
            "denials are written at once; 0: every line at once (ADR 0013)",
        ),
    ]:
        value = _env(env, default)
        run.add_argument(flag, default=value, help=f"{help_} (${env})")
    _add_spiffe_flags(
        run, default_help="spiffe if SPIFFE_ENDPOINT_SOCKET is set and no embedded-CA flag is given"
    )
    status = ssub.add_parser("status", help="ask a sidecar's admin API")
    status.add_argument("--admin", default=_env("TRUSTMESH_ADMIN", "127.0.0.1:15000"))
    status.add_argument("-o", "--output", choices=["text", "json"], default="text")

    from trustmesh.k8s.cli import add_k8s_commands

    add_k8s_commands(sub)

    demo = sub.add_parser("demo", help="run a local mesh end to end")
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command in ("sidecar", "registry"):
        # The audit trail: one JSON line per decision and per operator action.
        audit = logging.getLogger("trustmesh.audit")
        audit.setLevel(logging.INFO)
        if not audit.handlers:
            audit.addHandler(AuditStreamHandler(sys.stderr))
        audit.propagate = False
    try:
        if args.command in ("webhook", "reconcile"):
            from trustmesh.k8s.cli import dispatch_k8s

            return dispatch_k8s(args)
        from trustmesh.cli import commands

        return commands.dispatch(args)
    except MeshError as e:
        if args.verbose:
            raise
        print(f"trustmesh: error: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # the one boundary: no traceback unless asked for
        if args.verbose:
            raise
        print(
            f"trustmesh: internal error: {type(e).__name__}: {e} (run with --verbose for details)",
            file=sys.stderr,
        )
        return 1


def entrypoint() -> None:
    raise SystemExit(main())
