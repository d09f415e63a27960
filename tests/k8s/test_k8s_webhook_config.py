"""`WebhookConfig.from_flat` and `load_config_dir`: a ConfigMap's keys as a checked value."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from trustmesh.ca import CertificateAuthority
from trustmesh.errors import ConfigError
from trustmesh.k8s.webhook_config import CredentialMode, WebhookConfig, load_config_dir
from trustmesh.spiffe_id import TrustDomain
from trustmesh.x509svid import ca_fingerprint

FP = "sha256:" + "0f" * 32
GOOD = {
    "trustDomain": "example.org",
    "image": "trustmesh/trustmesh:0.1.0",
    "registry": "trustmesh-registry.trustmesh-system.svc:8443",
    "caFingerprint": FP,
}


def test_defaults() -> None:
    c = WebhookConfig.from_flat(GOOD)
    assert c.credentials is CredentialMode.JOIN_TOKEN
    assert c.spiffe_id_template == "spiffe://{trustDomain}/ns/{namespace}/sa/{serviceAccount}"
    assert str(c.spiffe_id("team-a", "planner")) == "spiffe://example.org/ns/team-a/sa/planner"
    assert c.secret_name("team-a", "planner") == "trustmesh-join-planner"
    assert (c.app_port, c.native_sidecar, c.extra_env) == (50051, True, ())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(
            {"trustDomain": ""}, "webhook config trustDomain: required", id="no-trust-domain"
        ),
        pytest.param({"imgae": "x"}, "webhook config: unknown key(s) 'imgae' (known: ", id="typo"),
        pytest.param(
            {"spiffeIdTemplate": "spiffe://{trustDomain}/pod/{podName}"},
            "webhook config spiffeIdTemplate: 'spiffe://{trustDomain}/pod/{podName}' uses {podName}; "
            "known placeholders: {namespace}, {serviceAccount}, {trustDomain}",
            id="unknown-placeholder",
        ),
        pytest.param(
            {"spiffeIdTemplate": "spiffe://{namespace.__class__}/x"},
            "webhook config spiffeIdTemplate: 'spiffe://{namespace.__class__}/x' uses "
            "{namespace.__class__}; known placeholders:",
            id="attribute-access",
        ),
        pytest.param(
            {"spiffeIdTemplate": "spiffe://other.org/ns/{namespace}"},
            "spiffeIdTemplate gives 'spiffe://other.org/ns/probe-ns': expected a workload ID in "
            "trust domain 'example.org'",
            id="other-trust-domain",
        ),
        pytest.param(
            {"joinTokenSecret": "Token-{serviceAccount}"},
            "joinTokenSecret gives 'Token-probe-sa', which is not a valid Secret name",
            id="secret-name",
        ),
        pytest.param(
            {"caFingerprint": ""},
            "webhook config caFingerprint: required with credentials 'join-token'",
            id="no-fingerprint",
        ),
        pytest.param(
            {"caFingerprint": "sha256:abc"},
            "webhook config caFingerprint: 'sha256:abc' is not 'sha256:<64 hex>'",
            id="bad-fingerprint",
        ),
        pytest.param(
            {"credentials": "x509"},
            "webhook config credentials: 'x509' is not join-token or spiffe",
            id="bad-mode",
        ),
        pytest.param(
            {"appPort": "0"}, "webhook config appPort: 0 is not a port (1-65535)", id="port-zero"
        ),
        pytest.param(
            {"registry": "registry"},
            "webhook config registry: 'registry' is not host:port",
            id="no-port",
        ),
        pytest.param(
            {"nativeSidecar": "yes"},
            "webhook config nativeSidecar: 'yes' is not true or false",
            id="bad-bool",
        ),
        pytest.param(
            {"memoryLimit": "lots"},
            "webhook config memoryLimit: 'lots' is not a Kubernetes quantity",
            id="bad-quantity",
        ),
        pytest.param(
            {"env.TRUSTMESH_SPIFFE_ID": "spiffe://example.org/x"},
            "webhook config env.TRUSTMESH_SPIFFE_ID: TRUSTMESH_* variables are set by the injector",
            id="env-overrides-identity",
        ),
        pytest.param(
            {"env.1BAD": "x"}, "webhook config env.1BAD: not a valid variable name", id="env-name"
        ),
    ],
)
def test_bad_settings(change: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        WebhookConfig.from_flat({**GOOD, **change})
    assert raised.value.message.startswith(message), raised.value.message


def test_spiffe_mode_needs_no_fingerprint() -> None:
    c = WebhookConfig.from_flat({**GOOD, "credentials": "spiffe", "caFingerprint": ""})
    assert c.credentials is CredentialMode.SPIFFE


def write_config_map(directory: Path, values: dict[str, str]) -> None:
    """As the kubelet mounts a ConfigMap: files are links into a timestamped dotdir."""
    data = directory / "..2025_01_15_10_20_30.123456789"
    data.mkdir(parents=True)
    for key, value in values.items():
        (data / key).write_text(value)
        (directory / key).symlink_to(Path("..data") / key)
    (directory / "..data").symlink_to(data.name)


def test_load_config_dir_takes_the_fingerprint_from_the_bundle(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(TrustDomain.parse("example.org"), now=datetime.now(UTC))
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca.bundle().pem())
    settings = {k: v for k, v in GOOD.items() if k != "caFingerprint"}
    write_config_map(tmp_path / "cm", settings)
    config = load_config_dir(tmp_path / "cm", ca_bundle=bundle)
    assert config.ca_fingerprint == ca_fingerprint(ca.cert)
    # An explicit caFingerprint wins over the bundle.
    write_config_map(tmp_path / "cm2", GOOD)
    assert load_config_dir(tmp_path / "cm2", ca_bundle=bundle).ca_fingerprint == FP


def test_load_config_dir_without_bundle_or_fingerprint(tmp_path: Path) -> None:
    write_config_map(tmp_path / "cm", {k: v for k, v in GOOD.items() if k != "caFingerprint"})
    with pytest.raises(ConfigError, match="caFingerprint: required"):
        load_config_dir(tmp_path / "cm", ca_bundle=tmp_path / "absent.pem")
    with pytest.raises(ConfigError, match="cannot read webhook config from"):
        load_config_dir(tmp_path / "nothing")
