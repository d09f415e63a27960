"""The embedded CA: its own certificate, and what it will and won't sign."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from trustmesh.ca import CLOCK_SKEW, MAX_CSR_BYTES, CertificateAuthority
from trustmesh.errors import BootstrapError, Code, ConfigError, CredentialError
from trustmesh.x509svid import generate_key, make_csr

from certs import HOUR, NOW, OTHER_TD, TD, forge_leaf, issue, make_ca, raises, sid, uri

AGENT = sid("spiffe://example.org/agent")

LEAF_EXTENSIONS = {
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
}


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return make_ca()


def ext(
    cert: x509.Certificate, cls: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(cls)


# -- the CA certificate ---------------------------------------------------------------


def test_root_certificate_shape(ca: CertificateAuthority) -> None:
    cert = ca.cert
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value == x509.BasicConstraints(ca=True, path_length=0)
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical
    assert isinstance(ku.value, x509.KeyUsage)
    assert ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    ski = ext(cert, x509.SubjectKeyIdentifier).value
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert isinstance(ski, x509.SubjectKeyIdentifier)
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    assert aki.key_identifier == ski.digest
    san = ext(cert, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "TrustMesh"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "example.org"
    assert cert.issuer == cert.subject
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.not_valid_before_utc == NOW - CLOCK_SKEW
    assert cert.not_valid_after_utc == NOW + timedelta(days=365)
    cert.verify_directly_issued_by(cert)
    assert ca.trust_domain == TD


def test_root_is_a_trust_anchor_for_cryptography_verification(ca: CertificateAuthority) -> None:
    leaf = issue(ca, AGENT).leaf
    verifier = PolicyBuilder().store(Store([ca.cert])).time(NOW).build_client_verifier()
    assert verifier.verify(leaf, []).chain[-1] == ca.cert


def test_default_ttl_is_five_years() -> None:
    ca = CertificateAuthority.create(TD, now=NOW)
    assert ca.cert.not_valid_after_utc - NOW == timedelta(days=365 * 5)


def test_load_round_trip_and_bundle(ca: CertificateAuthority) -> None:
    loaded = CertificateAuthority.load(ca.cert_pem(), ca.key_pem())
    assert loaded.cert == ca.cert
    assert loaded.trust_domain == TD
    assert loaded.bundle().authorities == (ca.cert,)
    assert loaded.bundle().trust_domain == TD
    assert "PRIVATE" not in repr(loaded)


def test_load_without_san_needs_trust_domain() -> None:
    key = generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bring-your-own")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + HOUR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with raises(ConfigError, "has no SPIFFE URI SAN; pass the trust domain"):
        CertificateAuthority.load(cert_pem, key_pem)
    assert CertificateAuthority.load(cert_pem, key_pem, trust_domain=TD).trust_domain == TD


def _leaf_pems(ca: CertificateAuthority) -> tuple[bytes, bytes]:
    svid = issue(ca, AGENT)
    return svid.chain_pem(), svid.key_pem()


_OTHER = make_ca()
LOAD_CASES: dict[str, tuple[Callable[[CertificateAuthority], tuple[bytes, bytes]], str]] = {
    "key-mismatch": (lambda c: (c.cert_pem(), _OTHER.key_pem()), "CA key does not match"),
    "two-certs": (lambda c: (c.cert_pem() + _OTHER.cert_pem(), c.key_pem()), "holds 2 cert"),
    "garbage-cert": (lambda c: (b"nope", c.key_pem()), "CA certificate is not PEM X.509"),
    "garbage-key": (lambda c: (c.cert_pem(), b"nope"), "not an unencrypted PEM private key"),
    "leaf-as-ca": (_leaf_pems, "is not a CA"),
}


@pytest.mark.parametrize(("make", "message"), LOAD_CASES.values(), ids=LOAD_CASES.keys())
def test_load_rejects(
    ca: CertificateAuthority,
    make: Callable[[CertificateAuthority], tuple[bytes, bytes]],
    message: str,
) -> None:
    cert_pem, key_pem = make(ca)
    with raises(ConfigError, message):
        CertificateAuthority.load(cert_pem, key_pem)


def test_load_rejects_trust_domain_disagreement(ca: CertificateAuthority) -> None:
    with raises(ConfigError, "names trust domain example.org, not other.org"):
        CertificateAuthority.load(ca.cert_pem(), ca.key_pem(), trust_domain=OTHER_TD)


# -- issuing ------------------------------------------------------------------------


def test_issued_svid_shape(ca: CertificateAuthority) -> None:
    key = generate_key()
    cert = ca.sign_csr(make_csr(key, AGENT), AGENT, now=NOW, ttl=HOUR)
    assert {e.oid for e in cert.extensions} == LEAF_EXTENSIONS
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value == x509.BasicConstraints(ca=False, path_length=None)
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical
    assert isinstance(ku.value, x509.KeyUsage)
    assert ku.value.digital_signature and not ku.value.key_cert_sign and not ku.value.crl_sign
    eku = ext(cert, x509.ExtendedKeyUsage).value
    assert isinstance(eku, x509.ExtendedKeyUsage)
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    ca_ski = ext(ca.cert, x509.SubjectKeyIdentifier).value
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    assert isinstance(ca_ski, x509.SubjectKeyIdentifier)
    assert aki.key_identifier == ca_ski.digest
    san = ext(cert, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert list(san) == [uri(str(AGENT))]
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "TrustMesh")])
    assert cert.issuer == ca.cert.subject
    assert 0 < cert.serial_number < 2**159
    assert cert.not_valid_before_utc == NOW - CLOCK_SKEW
    assert cert.not_valid_after_utc == NOW + HOUR
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(ca.cert)


def test_serials_are_random(ca: CertificateAuthority) -> None:
    serials = {issue(ca, AGENT).leaf.serial_number for _ in range(5)}
    assert len(serials) == 5


def test_svid_never_outlives_the_ca() -> None:
    ca = make_ca(ttl=timedelta(days=2))
    cert = ca.sign_csr(make_csr(generate_key(), AGENT), AGENT, now=NOW, ttl=timedelta(days=30))
    assert cert.not_valid_after_utc == ca.cert.not_valid_after_utc


def _hostile_csr(
    key: ec.EllipticCurvePrivateKey, *, sans: list[x509.GeneralName], is_ca: bool = False
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")])
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if is_ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        ).add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("sans", "is_ca"),
    [
        ([uri("spiffe://example.org/admin")], False),
        ([uri("spiffe://other.org/agent")], False),
        ([x509.DNSName("registry.example.org")], False),
        ([uri("spiffe://example.org/agent"), uri("spiffe://example.org/admin")], False),
        ([], True),
        ([uri("spiffe://example.org/admin"), x509.DNSName("*.example.org")], True),
    ],
    ids=["other-id", "other-trust-domain", "dns-san", "extra-uri-san", "ca-true", "everything"],
)
def test_csr_requests_are_ignored(
    ca: CertificateAuthority, sans: list[x509.GeneralName], is_ca: bool
) -> None:
    csr = _hostile_csr(generate_key(), sans=sans, is_ca=is_ca)
    cert = ca.sign_csr(csr, AGENT, now=NOW, ttl=HOUR)
    san = ext(cert, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert list(san) == [uri("spiffe://example.org/agent")]
    assert san.get_values_for_type(x509.DNSName) == []
    assert ext(cert, x509.BasicConstraints).value == x509.BasicConstraints(
        ca=False, path_length=None
    )
    assert {e.oid for e in cert.extensions} == LEAF_EXTENSIONS
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []


# -- CSRs the CA refuses ------------------------------------------------------------


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _resigned_by_other_key(csr_der: bytes) -> bytes:
    """The same request info (and public key), signed by a key that isn't it."""
    csr = x509.load_der_x509_csr(csr_der)
    tbs = csr.tbs_certrequest_bytes
    alg = csr_der[csr_der.index(tbs) + len(tbs) :][:12]  # ecdsa-with-SHA256 AlgorithmIdentifier
    assert alg == bytes.fromhex("300a06082a8648ce3d040302")
    sig = generate_key().sign(tbs, ec.ECDSA(hashes.SHA256()))
    bit_string = b"\x03" + _der_len(len(sig) + 1) + b"\x00" + sig
    body = tbs + alg + bit_string
    return b"\x30" + _der_len(len(body)) + body


def _tampered_signature(csr_der: bytes) -> bytes:
    return csr_der[:-1] + bytes([csr_der[-1] ^ 0x01])


def _rsa_csr() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def _p384_csr() -> bytes:
    key = ec.generate_private_key(ec.SECP384R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA384())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def _good_csr() -> bytes:
    return make_csr(generate_key(), AGENT)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _tampered_signature(_good_csr()), "CSR signature does not verify"),
        (lambda: _resigned_by_other_key(_good_csr()), "CSR signature does not verify"),
        (lambda: b"\x30\x03\x02\x01\x00", "CSR does not parse"),
        (lambda: b"", "CSR does not parse"),
        (lambda: _good_csr() + b"\x00", "CSR does not parse"),
        (_rsa_csr, "CSR key must be EC P-256"),
        (_p384_csr, "CSR key must be EC P-256"),
        (lambda: b"\x30" * (MAX_CSR_BYTES + 1), f"more than {MAX_CSR_BYTES}"),
    ],
    ids=[
        "tampered-signature",
        "signed-by-other-key",
        "garbage",
        "empty",
        "trailing-data",
        "rsa-key",
        "p384-key",
        "oversized",
    ],
)
def test_bad_csr_rejected(
    ca: CertificateAuthority, make: Callable[[], bytes], message: str
) -> None:
    with raises(BootstrapError, message) as info:
        ca.sign_csr(make(), AGENT, now=NOW, ttl=HOUR)
    assert info.value.reason == "bad_csr"
    assert info.value.code is Code.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("spiffe_id", "message"),
    [
        ("spiffe://other.org/agent", "this CA issues for trust domain example.org"),
        ("spiffe://example.org", "names a workload, not the trust domain"),
    ],
    ids=["foreign-trust-domain", "trust-domain-id"],
)
def test_sign_refuses_ids_outside_its_remit(
    ca: CertificateAuthority, spiffe_id: str, message: str
) -> None:
    with raises(ConfigError, message):
        ca.sign_csr(_good_csr(), sid(spiffe_id), now=NOW, ttl=HOUR)


@pytest.mark.parametrize(
    "offset",
    [timedelta(days=366), -timedelta(days=1)],
    ids=["ca-expired", "ca-not-yet-valid"],
)
def test_sign_refuses_outside_ca_validity(ca: CertificateAuthority, offset: timedelta) -> None:
    with raises(CredentialError, "CA certificate for example.org is valid from"):
        ca.sign_csr(_good_csr(), AGENT, now=NOW + offset, ttl=HOUR)


def test_sign_rejects_bad_time_arguments(ca: CertificateAuthority) -> None:
    with raises(ConfigError, "TTL must be positive"):
        ca.sign_csr(_good_csr(), AGENT, now=NOW, ttl=timedelta(0))
    with raises(ValueError, "timezone-aware"):
        ca.sign_csr(_good_csr(), AGENT, now=NOW.replace(tzinfo=None), ttl=HOUR)


def test_forged_leaf_helper_is_not_issued_by_sign_csr(ca: CertificateAuthority) -> None:
    # Sanity check of the test helper the peer tests rely on: it really is CA:TRUE.
    cert, _ = forge_leaf(ca, [uri(str(AGENT))], is_ca=True)
    assert ext(cert, x509.BasicConstraints).value == x509.BasicConstraints(
        ca=True, path_length=None
    )
