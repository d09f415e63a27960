"""SPIFFE mode without a network: Workload API addresses, the conversion of what the
Workload API sends into our `X509Svid`/`BundleSet`, the snapshot that carries no
bundles, the CLI flags, and the error messages of each.

The py-spiffe values are built with the same public parsers that py-spiffe's client
applies to an `X509SVIDResponse` (`X509Svid.parse_raw` over the concatenated DER
chain and the PKCS#8 key, `X509Bundle.parse_raw` over concatenated DER), so each case
starts from the bytes a Workload API puts on the wire.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from spiffe import SpiffeId as PySpiffeId
from spiffe import TrustDomain as PyTrustDomain
from spiffe import X509Bundle, X509BundleSet
from spiffe import X509Svid as PySvid

from trustmesh.ca import CertificateAuthority
from trustmesh.cli.main import main
from trustmesh.errors import ConfigError, CredentialError
from trustmesh.spiffe_id import TrustDomain
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.v1 import resources_pb2 as pb
from trustmesh.x509svid import BundleSet, X509Svid
from trustmesh_sidecar.spiffe_source import (
    SnapshotWithoutBundles,
    WorkloadApiSource,
    credentials_from,
    endpoint_socket,
)
from trustmesh_sidecar.state import SidecarState

from certs import TD, bundles, der, issue, make_ca, make_intermediate, raises, sid

FOREIGN = TrustDomain.parse("other.example")
ALICE = "spiffe://example.org/agents/alice"


# -- SPIRE-shaped material ---------------------------------------------------------------------


def spire(td: str | TrustDomain = TD) -> tuple[CertificateAuthority, CertificateAuthority]:
    """A root (the bundle) and the intermediate that signs SVIDs, as SPIRE does."""
    root = make_ca(td, path_length=1)
    return root, make_intermediate(root)


def wire_svid(svid: X509Svid) -> PySvid:
    """What py-spiffe makes of one `X509SVID` message."""
    key = svid.private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return PySvid.parse_raw(b"".join(der(*svid.cert_chain)), key)


def wire_bundles(by_td: dict[str, Sequence[x509.Certificate]]) -> X509BundleSet:
    """What py-spiffe makes of `bundle` plus the `federated_bundles` map."""
    return X509BundleSet.of(
        [
            X509Bundle.parse_raw(PyTrustDomain(td), b"".join(der(*certs)))
            for td, certs in by_td.items()
        ]
    )


@pytest.fixture
def ours() -> tuple[CertificateAuthority, X509Svid]:
    root, inter = spire()
    return root, issue(inter, ALICE, intermediates=(inter.cert,))


# -- addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["unix:///run/spire/agent.sock", "unix:/tmp/agent.sock", " unix:///tmp/a.sock "],
    ids=["three-slashes", "one-slash", "spaces"],
)
def test_unix_addresses_are_accepted(address: str) -> None:
    assert endpoint_socket(address) == address.strip()


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("", "the SPIFFE Workload API socket is empty: set SPIFFE_ENDPOINT_SOCKET"),
        (
            "/run/spire/agent.sock",
            "SPIFFE endpoint socket '/run/spire/agent.sock' has no scheme: "
            "write unix:///run/spire/agent.sock",
        ),
        (
            "tcp://127.0.0.1:8081",
            "SPIFFE endpoint socket 'tcp://127.0.0.1:8081': only unix: sockets are supported",
        ),
        (
            "unix://run/spire/agent.sock",
            "SPIFFE endpoint socket 'unix://run/spire/agent.sock': expected unix:///absolute/path",
        ),
        ("unix:///a.sock?x=1", "SPIFFE endpoint socket 'unix:///a.sock?x=1': a query or fragment"),
    ],
    ids=["empty", "no-scheme", "tcp", "host-part", "query"],
)
def test_bad_addresses_are_config_errors(address: str, message: str) -> None:
    with raises(ConfigError, message):
        endpoint_socket(address)
    with raises(ConfigError, message):
        WorkloadApiSource(address)


# -- conversion ------------------------------------------------------------------------------


def test_spire_shaped_svid_keeps_its_intermediate(
    ours: tuple[CertificateAuthority, X509Svid],
) -> None:
    root, svid = ours
    got, got_bundles = credentials_from(wire_svid(svid), wire_bundles({"example.org": [root.cert]}))
    assert got.spiffe_id == sid(ALICE)
    assert got.chain_der() == svid.chain_der()  # leaf, then SPIRE's intermediate
    assert len(got.cert_chain) == 2
    assert got.key_pem() == svid.key_pem()
    assert got_bundles.trust_domains() == (TD,)
    assert got_bundles == bundles(root)


def test_federated_bundles_from_the_workload_api(
    ours: tuple[CertificateAuthority, X509Svid],
) -> None:
    root, svid = ours
    foreign, _ = spire(FOREIGN)
    _, got = credentials_from(
        wire_svid(svid),
        wire_bundles({"example.org": [root.cert], "spiffe://other.example": [foreign.cert]}),
    )
    assert got == bundles(root, foreign)


@pytest.mark.parametrize(
    ("from_api", "from_file", "expected"),
    [
        (False, True, "file"),
        (True, True, "api"),
        (True, False, "api"),
        (False, False, None),
    ],
    ids=["file-fills-gap", "workload-api-wins", "api-only", "neither"],
)
def test_configured_files_fill_in_for_trust_domains_the_api_lacks(
    ours: tuple[CertificateAuthority, X509Svid],
    from_api: bool,
    from_file: bool,
    expected: str | None,
) -> None:
    root, svid = ours
    api_ca, file_ca = spire(FOREIGN)[0], spire(FOREIGN)[0]
    wire = {"example.org": [root.cert]} | ({"other.example": [api_ca.cert]} if from_api else {})
    files = BundleSet.of(file_ca.bundle()) if from_file else BundleSet()
    _, got = credentials_from(wire_svid(svid), wire_bundles(wire), federated=files)
    foreign = got.get(FOREIGN)
    chosen = {None: None, "api": api_ca.cert, "file": file_ca.cert}[expected]
    assert (foreign.authorities if foreign else None) == ((chosen,) if chosen else None)
    assert got.get(TD) == root.bundle()


def test_empty_federated_bundle_is_no_bundle(ours: tuple[CertificateAuthority, X509Svid]) -> None:
    root, svid = ours
    bundle_set = wire_bundles({"example.org": [root.cert]})
    bundle_set.put(X509Bundle(PyTrustDomain("other.example"), set()))
    _, got = credentials_from(wire_svid(svid), bundle_set)
    assert got.get(FOREIGN) is None


def test_a_file_may_not_name_our_own_trust_domain(
    ours: tuple[CertificateAuthority, X509Svid],
) -> None:
    root, svid = ours
    rogue = make_ca(TD)
    with raises(
        ConfigError,
        "--federated-bundle names 'example.org', this workload's own trust domain: its bundle "
        "comes only from the SPIFFE Workload API",
    ):
        credentials_from(
            wire_svid(svid),
            wire_bundles({"example.org": [root.cert]}),
            federated=BundleSet.of(rogue.bundle()),
        )


def test_svid_for_another_id_is_refused(ours: tuple[CertificateAuthority, X509Svid]) -> None:
    root, svid = ours
    with raises(
        ConfigError,
        "the SPIFFE Workload API issued an SVID for spiffe://example.org/agents/alice, "
        "not spiffe://example.org/agents/bob",
    ) as info:
        credentials_from(
            wire_svid(svid),
            wire_bundles({"example.org": [root.cert]}),
            expected_id=sid("spiffe://example.org/agents/bob"),
        )
    assert info.value.reason == "spiffe_id_mismatch"


def test_no_bundle_for_our_own_trust_domain(ours: tuple[CertificateAuthority, X509Svid]) -> None:
    _, svid = ours
    foreign, _ = spire(FOREIGN)
    with raises(
        CredentialError,
        "the Workload API sent no X.509 bundle for spiffe://example.org/agents/alice's own "
        "trust domain 'example.org'",
    ):
        credentials_from(wire_svid(svid), wire_bundles({"other.example": [foreign.cert]}))


def test_rsa_svid_names_the_spire_setting(ours: tuple[CertificateAuthority, X509Svid]) -> None:
    root, svid = ours
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    wire = PySvid(PySpiffeId(ALICE), list(svid.cert_chain), rsa_key)
    with raises(
        CredentialError,
        "the Workload API sent an X.509-SVID for 'spiffe://example.org/agents/alice' with a "
        "RSAPrivateKey; TrustMesh needs EC keys (SPIRE agent: "
        'workload_x509_svid_key_type = "ec-p256", the default)',
    ):
        credentials_from(wire, wire_bundles({"example.org": [root.cert]}))


def test_key_that_does_not_match_the_leaf(ours: tuple[CertificateAuthority, X509Svid]) -> None:
    root, svid = ours
    other = issue(root, ALICE)
    wire = PySvid(PySpiffeId(ALICE), list(svid.cert_chain), other.private_key)
    with raises(
        CredentialError,
        "the Workload API sent an unusable X.509-SVID for 'spiffe://example.org/agents/alice': "
        "private key does not match the SVID leaf",
    ):
        credentials_from(wire, wire_bundles({"example.org": [root.cert]}))


def test_bundle_with_a_leaf_in_it(ours: tuple[CertificateAuthority, X509Svid]) -> None:
    _, svid = ours
    with raises(
        CredentialError,
        "the Workload API sent an unusable bundle for trust domain 'example.org': trust bundle "
        "for example.org holds a certificate that is not a CA",
    ):
        credentials_from(wire_svid(svid), wire_bundles({"example.org": [svid.leaf]}))


# -- the registry snapshot is not a bundle source in SPIFFE mode ------------------------------


def test_snapshot_bundles_do_not_replace_workload_api_bundles(
    ours: tuple[CertificateAuthority, X509Svid],
) -> None:
    root, svid = ours
    rogue = make_ca(TD)
    state = SidecarState(svid.spiffe_id, svid, bundles(root))
    state.snapshot = SnapshotWithoutBundles()
    notified: list[BundleSet] = []
    state.on_credentials(lambda _s, b: notified.append(b))
    update = rpb.SnapshotUpdate(
        epoch="e1",
        revision=1,
        full=True,
        changes=[
            rpb.Change(
                put_bundle=pb.TrustBundle(
                    trust_domain="example.org", x509_authorities=list(rogue.bundle().der())
                )
            )
        ],
    )
    assert state.snapshot.apply(update)
    state.snapshot_applied()
    assert state.synced
    assert state.bundles == bundles(root)
    assert state.verifier.bundles == bundles(root)
    assert notified == []


# -- the source before and without a Workload API ---------------------------------------------


def test_no_svid_before_obtain() -> None:
    source = WorkloadApiSource("unix:///nonexistent/agent.sock")
    with raises(CredentialError, "no SVID from the SPIFFE Workload API yet"):
        source.current()
    with raises(CredentialError, "no SVID from the SPIFFE Workload API yet"):
        source.sign(b"x")


async def test_missing_socket_is_retried_with_a_clear_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "agent.sock"
    source = WorkloadApiSource(f"unix://{path}", first_backoff=0.01, max_backoff=0.02)
    caplog.set_level(logging.WARNING, logger="trustmesh_sidecar.spiffe_source")
    task = asyncio.ensure_future(source.obtain())
    try:
        for _ in range(200):
            if len(caplog.records) >= 3:
                break
            await asyncio.sleep(0.01)
    finally:
        source.close()
        task.cancel()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) >= 3
    assert messages[0].startswith(
        f"cannot reach the SPIFFE Workload API at unix://{path}: no socket at {path} "
        "(is the SPIRE agent running, and is its socket mounted here?); retrying in "
    )
    assert messages[0].endswith("s (attempt 1)")
    assert messages[2].endswith("s (attempt 3)")


# -- flags --------------------------------------------------------------------------------------


@pytest.fixture
def _no_spiffe_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in (
        "SPIFFE_ENDPOINT_SOCKET",
        "TRUSTMESH_CREDENTIALS",
        "TRUSTMESH_FEDERATED_BUNDLES",
        "TRUSTMESH_SPIFFE_ID",
        "TRUSTMESH_REGISTRY",
        "TRUSTMESH_APP",
        "TRUSTMESH_DATA_DIR",
        "TRUSTMESH_JOIN_TOKEN",
        "TRUSTMESH_TRUST_BUNDLE",
        "TRUSTMESH_CA_FINGERPRINT",
    ):
        monkeypatch.delenv(name, raising=False)
    audit = logging.getLogger("trustmesh.audit")  # main() configures it for `sidecar`
    saved = (list(audit.handlers), audit.propagate, audit.level)
    yield
    audit.handlers[:] = saved[0]
    audit.propagate, audit.level = saved[1], saved[2]


RUN = ["sidecar", "run", "--registry", "r:8443", "--app", "127.0.0.1:1", "--data-dir", "{tmp}"]


@pytest.mark.usefixtures("_no_spiffe_env")
@pytest.mark.parametrize(
    ("env", "argv", "message"),
    [
        (None, ["sidecar", "run"], "sidecar run needs --spiffe-id, --registry, --app, --data-dir"),
        (
            "unix:///run/spire/agent.sock",
            ["sidecar", "run"],
            "sidecar run needs --registry, --app, --data-dir",
        ),
        (
            "unix:///run/spire/agent.sock",
            ["sidecar", "run", "--join-token", "t"],
            "sidecar run needs --spiffe-id, --registry, --app, --data-dir",
        ),
        (
            None,
            [*RUN, "--credentials", "spiffe"],
            "--credentials spiffe needs the Workload API socket: set SPIFFE_ENDPOINT_SOCKET or "
            "pass --spiffe-endpoint-socket unix:///run/spire/agent.sock",
        ),
        (
            "unix:///run/spire/agent.sock",
            [*RUN, "--credentials", "spiffe", "--join-token", "t", "--ca-fingerprint", "sha256:00"],
            "--join-token, --ca-fingerprint: embedded-CA flags, but this sidecar takes its SVID "
            "from the SPIFFE Workload API; drop them, or pass --credentials ca",
        ),
        (
            None,
            [*RUN, "--credentials", "banana"],
            "--credentials 'banana': use ca (the embedded CA) or spiffe (SPIRE)",
        ),
        (
            "/run/spire/agent.sock",
            RUN,
            "SPIFFE endpoint socket '/run/spire/agent.sock' has no scheme: "
            "write unix:///run/spire/agent.sock",
        ),
        (
            "unix:///run/spire/agent.sock",
            [*RUN, "--federated-bundle", "partner.example"],
            "--federated-bundle 'partner.example': expected TRUST_DOMAIN=PATH",
        ),
        (
            "unix:///run/spire/agent.sock",
            [*RUN, "--federated-bundle", "partner.example={tmp}/missing.pem"],
            "cannot read {tmp}/missing.pem: No such file or directory",
        ),
        (
            None,
            ["registry", "serve", "--data-dir", "{tmp}", "--credentials", "spiffe"],
            "--credentials spiffe needs the Workload API socket",
        ),
        (
            None,
            ["registry", "serve", "--data-dir", "{tmp}", "--federated-bundle", "x=y=z"],
            "cannot read y=z",
        ),
    ],
    ids=[
        "ca-needs-id",
        "socket-alone-selects-spiffe",
        "ca-flag-keeps-ca-mode",
        "spiffe-without-socket",
        "spiffe-with-ca-flags",
        "unknown-mode",
        "socket-without-scheme",
        "federated-without-path",
        "federated-file-missing",
        "registry-spiffe-without-socket",
        "registry-federated-bad-path",
    ],
)
def test_spiffe_flags_fail_with_one_clear_line(
    env: str | None,
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if env is not None:
        monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", env)
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith("trustmesh: error: " + message.replace("{tmp}", str(tmp_path)))
