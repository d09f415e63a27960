"""SVIDs, bundles, SAN rules and credential files."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from trustmesh.ca import CertificateAuthority
from trustmesh.errors import ConfigError, CredentialError, PeerAuthenticationError
from trustmesh.x509svid import (
    BundleSet,
    TrustBundle,
    X509Svid,
    ca_fingerprint,
    generate_key,
    make_csr,
    spiffe_id_of,
    write_private_file,
    write_public_file,
)

from certs import OTHER_TD, TD, forge_leaf, issue, make_ca, raises, sid, uri

AGENT = sid("spiffe://example.org/agent")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return make_ca()


@pytest.fixture(scope="module")
def svid(ca: CertificateAuthority) -> X509Svid:
    return issue(ca, AGENT)


def test_generate_key_and_csr() -> None:
    key = generate_key()
    assert isinstance(key.curve, ec.SECP256R1)
    csr = x509.load_der_x509_csr(make_csr(key, AGENT))
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(AGENT)]


# -- spiffe_id_of -------------------------------------------------------------------

SAN_CASES: dict[str, tuple[list[x509.GeneralName] | None, str]] = {
    "two-uri-sans": (
        [uri("spiffe://example.org/a"), uri("spiffe://example.org/b")],
        "certificate has 2 URI SANs; an SVID has exactly one",
    ),
    "no-san": (None, "certificate has no subjectAltName; an SVID has exactly one URI SAN"),
    "dns-only": ([x509.DNSName("agent.example.org")], "certificate has 0 URI SANs"),
    "https-uri": (
        [uri("https://example.org/agent")],
        "certificate URI SAN is not a SPIFFE ID: Invalid SPIFFE ID 'https://example.org/agent'",
    ),
    "dot-dot-path": (
        [uri("spiffe://example.org/a/../b")],
        "certificate URI SAN is not a SPIFFE ID: Invalid SPIFFE ID 'spiffe://example.org/a/../b'",
    ),
    "uppercase-td": (
        [uri("spiffe://Example.org/a")],
        "certificate URI SAN 'spiffe://Example.org/a' is not a SPIFFE ID in canonical form",
    ),
    "uppercase-scheme": ([uri("SPIFFE://example.org/a")], "is not a SPIFFE ID in canonical form"),
}


@pytest.mark.parametrize(("sans", "message"), SAN_CASES.values(), ids=SAN_CASES.keys())
def test_spiffe_id_of_rejects(
    ca: CertificateAuthority, sans: list[x509.GeneralName] | None, message: str
) -> None:
    cert, _ = forge_leaf(ca, sans)
    with raises(PeerAuthenticationError, message):
        spiffe_id_of(cert)


def test_spiffe_id_of_accepts_one_uri_among_other_names(ca: CertificateAuthority) -> None:
    cert, _ = forge_leaf(ca, [x509.DNSName("agent.example.org"), uri(str(AGENT))])
    assert spiffe_id_of(cert) == AGENT


# -- X509Svid -----------------------------------------------------------------------


def test_svid_accessors(svid: X509Svid) -> None:
    assert svid.spiffe_id == AGENT
    assert svid.leaf is svid.cert_chain[0]
    assert svid.serial_hex == format(svid.leaf.serial_number, "x")
    assert svid.not_before == svid.leaf.not_valid_before_utc
    assert svid.not_after == svid.leaf.not_valid_after_utc
    assert svid.not_after.utcoffset() is not None
    assert svid.chain_der() == (svid.leaf.public_bytes(serialization.Encoding.DER),)
    assert svid.chain_pem().startswith(b"-----BEGIN CERTIFICATE-----")
    assert svid.key_pem().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8


def test_svid_round_trips(svid: X509Svid) -> None:
    from_pem = X509Svid.from_pem(svid.chain_pem(), svid.key_pem())
    assert from_pem == svid
    key_der = svid.private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert X509Svid.from_der(svid.chain_der(), key_der) == svid
    assert X509Svid.from_der(svid.chain_der(), svid.private_key) == svid


def test_repr_has_no_key_material(svid: X509Svid) -> None:
    text = repr(svid) + str(svid)
    assert str(AGENT) in text
    assert svid.serial_hex in text
    assert svid.not_after.isoformat() in text
    secret = svid.private_key.private_numbers().private_value
    assert str(secret) not in text
    assert format(secret, "x") not in text
    assert "PRIVATE" not in text
    assert "private_key" not in text
    body = b"".join(svid.key_pem().splitlines()[1:-1]).decode()
    assert body[:32] not in text


def _rsa_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _encrypted_pem(svid: X509Svid) -> bytes:
    return svid.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )


def _two_san_pems(ca: CertificateAuthority) -> tuple[bytes, bytes]:
    cert, key = forge_leaf(ca, [uri("spiffe://example.org/a"), uri("spiffe://example.org/b")])
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


FROM_PEM_CASES: dict[
    str, tuple[Callable[[CertificateAuthority, X509Svid], tuple[bytes, bytes]], str]
] = {
    "key-mismatch": (
        lambda c, s: (s.chain_pem(), issue(c, AGENT).key_pem()),
        "private key does not match the SVID leaf for spiffe://example.org/agent",
    ),
    "two-uri-sans": (
        lambda c, s: _two_san_pems(c),
        "SVID leaf: certificate has 2 URI SANs; an SVID has exactly one",
    ),
    "garbage-chain": (lambda c, s: (b"junk", s.key_pem()), "SVID chain is not PEM X.509"),
    "garbage-key": (lambda c, s: (s.chain_pem(), b"junk"), "not an unencrypted PEM key"),
    "encrypted-key": (
        lambda c, s: (s.chain_pem(), _encrypted_pem(s)),
        "not an unencrypted PEM key",
    ),
    "rsa-key": (lambda c, s: (s.chain_pem(), _rsa_pem()), "is RSAPrivateKey, expected an EC key"),
}


@pytest.mark.parametrize(("make", "message"), FROM_PEM_CASES.values(), ids=FROM_PEM_CASES.keys())
def test_from_pem_rejects(
    ca: CertificateAuthority,
    svid: X509Svid,
    make: Callable[[CertificateAuthority, X509Svid], tuple[bytes, bytes]],
    message: str,
) -> None:
    chain_pem, key_pem = make(ca, svid)
    with raises(CredentialError, message) as info:
        X509Svid.from_pem(chain_pem, key_pem)
    assert info.value.reason == "invalid_svid"
    # The key never leaks into the message.
    assert "PRIVATE" not in str(info.value)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda s: X509Svid(sid("spiffe://example.org/other"), s.cert_chain, s.private_key),
            "SVID leaf names spiffe://example.org/agent, not spiffe://example.org/other",
        ),
        (lambda s: X509Svid(s.spiffe_id, (), s.private_key), "empty certificate chain"),
        (lambda s: X509Svid.from_der([b"junk"], s.private_key), "SVID chain is not DER X.509"),
        (lambda s: X509Svid.from_der(s.chain_der(), b"junk"), "not unencrypted PKCS#8 DER"),
    ],
    ids=["id-disagrees-with-leaf", "empty-chain", "der-garbage-chain", "der-garbage-key"],
)
def test_svid_construction_rejects(
    svid: X509Svid, make: Callable[[X509Svid], Any], message: str
) -> None:
    with raises(CredentialError, message):
        make(svid)


# -- bundles ------------------------------------------------------------------------


def test_trust_bundle_round_trips(ca: CertificateAuthority) -> None:
    bundle = ca.bundle()
    assert TrustBundle.from_pem(TD, bundle.pem()) == bundle
    assert TrustBundle.from_der(TD, bundle.der()) == bundle


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda c, s: TrustBundle.from_pem(TD, b"junk"), "trust bundle for example.org is not PEM"),
        (
            lambda c, s: TrustBundle.from_der(TD, [b"junk"]),
            "trust bundle for example.org is not DER",
        ),
        (lambda c, s: TrustBundle(TD, (s.leaf,)), "holds a certificate that is not a CA (sha256:"),
        (lambda c, s: BundleSet.of(c.bundle(), c.bundle()), "two trust bundles for example.org"),
    ],
    ids=["pem-garbage", "der-garbage", "leaf-as-authority", "duplicate-trust-domain"],
)
def test_bundle_rejects(
    ca: CertificateAuthority,
    svid: X509Svid,
    make: Callable[[CertificateAuthority, X509Svid], Any],
    message: str,
) -> None:
    with raises(ConfigError, message):
        make(ca, svid)


def test_bundle_set(ca: CertificateAuthority) -> None:
    other = make_ca(OTHER_TD)
    rotated = make_ca(TD)
    a = BundleSet.of(ca.bundle(), other.bundle())
    b = BundleSet.of(other.bundle(), ca.bundle())
    assert len(a) == 2
    assert a.get(TD) == ca.bundle()
    assert a.get(sid("spiffe://nowhere.org").trust_domain) is None
    assert a.trust_domains() == (TD, OTHER_TD)
    assert a.version == b.version  # order-independent
    assert a.all_authorities() == (ca.cert, other.cert)
    assert a.all_pem() == ca.cert_pem() + other.cert_pem()

    c = a.with_bundle(rotated.bundle())
    assert c.get(TD) == rotated.bundle()
    assert a.get(TD) == ca.bundle()  # the original is untouched
    assert len(c) == 2
    assert c.version != a.version
    assert BundleSet().version != a.version
    assert len(BundleSet()) == 0


def test_ca_fingerprint(ca: CertificateAuthority) -> None:
    digest = hashlib.sha256(ca.cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert ca_fingerprint(ca.cert) == f"sha256:{digest}"


# -- files --------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_private_file_is_0600_and_atomic(tmp_path: Path) -> None:
    target = tmp_path / "svid.key"
    target.write_bytes(b"old")
    target.chmod(0o644)
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        write_private_file(target, b"secret")
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"secret"
    assert _mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svid.key"]  # no temp file left


def test_write_private_file_creates_0600_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, int]] = []
    real_open = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if str(path).endswith(".tmp"):
            seen.append((flags, mode))
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", spy)
    write_private_file(tmp_path / "k", b"x")
    assert len(seen) == 1
    flags, mode = seen[0]
    assert mode == 0o600
    assert flags & os.O_CREAT and flags & os.O_EXCL


def test_write_failure_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with raises(OSError, "disk full"):
        write_private_file(tmp_path / "k", b"x")
    assert list(tmp_path.iterdir()) == []


def test_write_public_file_is_0644(tmp_path: Path) -> None:
    target = tmp_path / "bundle.pem"
    write_public_file(target, b"pem")
    assert target.read_bytes() == b"pem"
    assert _mode(target) == 0o644
