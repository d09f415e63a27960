"""`trustmesh webhook certs|serve` and `trustmesh reconcile` parsing, through a parser
built the way `trustmesh.cli.main` will build it (`add_k8s_commands`)."""

from __future__ import annotations

import argparse
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from trustmesh.errors import ConfigError
from trustmesh.k8s.certs import service_dns_names, webhook_tls
from trustmesh.k8s.cli import add_k8s_commands, dispatch_k8s


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flags default from TRUSTMESH_* variables: a developer's own must not leak in."""
    for name in (
        "TRUSTMESH_CONFIG",
        "TRUSTMESH_REGISTRY",
        "TRUSTMESH_OPERATOR_CREDENTIALS",
        "TRUSTMESH_TRUST_BUNDLE",
        "TRUSTMESH_PRUNE",
        "TRUSTMESH_RESYNC",
        "KUBECONFIG",
    ):
        monkeypatch.delenv(name, raising=False)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trustmesh")
    sub = parser.add_subparsers(dest="command", required=True)
    add_k8s_commands(sub)
    return parser.parse_args(argv)


def test_webhook_certs_writes_a_verifiable_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    assert dispatch_k8s(parse(["webhook", "certs", "--out", str(out), "--days", "30"])) == 0
    assert stat.S_IMODE((out / "tls.key").stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    leaf = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    # Verified as the API server does: the caBundle CA, the Service's DNS name.
    verifier = (
        PolicyBuilder()
        .store(Store([ca]))
        .time(datetime.now(UTC))
        .build_server_verifier(x509.DNSName("trustmesh-webhook.trustmesh-system.svc"))
    )
    verifier.verify(leaf, [])
    assert leaf.not_valid_after_utc - datetime.now(UTC) < timedelta(days=31)
    text = capsys.readouterr().out
    assert "kubectl -n trustmesh-system create secret tls trustmesh-webhook-tls" in text
    assert "/webhooks/0/clientConfig/caBundle" in text


def test_certs_cover_every_service_name() -> None:
    tls = webhook_tls("hook", "mesh", now=datetime.now(UTC))
    leaf = x509.load_pem_x509_certificate(tls.cert_pem)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [
        "hook",
        "hook.mesh",
        "hook.mesh.svc",
        "hook.mesh.svc.cluster.local",
    ]


@pytest.mark.parametrize(
    ("service", "namespace", "message"),
    [
        ("Hook", "mesh", "service 'Hook' is not a DNS label"),
        ("hook", "mesh.system", "namespace 'mesh.system' is not a DNS label"),
        ("hook", "", "namespace '' is not a DNS label"),
    ],
)
def test_certs_refuse_bad_names(service: str, namespace: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        service_dns_names(service, namespace)
    assert raised.value.message == message


def test_certs_days_are_bounded(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--days must be between 1 and 3650, got 0"):
        dispatch_k8s(parse(["webhook", "certs", "--out", str(tmp_path), "--days", "0"]))


def test_flags_default_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTMESH_WEBHOOK_LISTEN", "127.0.0.1:9999")
    monkeypatch.setenv("TRUSTMESH_PRUNE", "true")
    monkeypatch.setenv("TRUSTMESH_REGISTRY", "r:8443")
    serve = parse(["webhook", "serve"])
    assert (serve.listen, serve.config_dir) == ("127.0.0.1:9999", "/etc/trustmesh/webhook")
    rec = parse(["reconcile"])
    assert (rec.prune, rec.registry, rec.resync) == (True, "r:8443", "60s")


def test_reconcile_needs_a_credential() -> None:
    with pytest.raises(ConfigError, match=r"reconcile needs --credentials"):
        dispatch_k8s(parse(["reconcile", "--registry", "r:8443"]))
    with pytest.raises(ConfigError, match="--credentials needs --trust-bundle and --registry too"):
        dispatch_k8s(parse(["reconcile", "--credentials", "x.pem"]))


def test_serve_reports_a_bad_config_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read webhook config from"):
        dispatch_k8s(parse(["webhook", "serve", "--config-dir", str(tmp_path / "absent")]))
