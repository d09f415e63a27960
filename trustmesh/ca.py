"""The embedded certificate authority that signs X.509 SVIDs.

Invariants:

* Pure: the time is always the injected `now`; nothing here reads the clock,
  the environment or a file.
* `sign_csr` issues exactly the SPIFFE ID the caller bound (from the join token or
  the registry record), whatever the CSR asks for. From the CSR only the public key
  is taken, and only after the CSR's self-signature has been checked. Requested
  subjects, SANs, basic constraints and other extensions are all ignored.
* Every issued certificate is an end-entity certificate (CA:FALSE) with one URI SAN,
  and never outlives the CA certificate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustmesh.errors import (
    BootstrapError,
    Code,
    ConfigError,
    CredentialError,
    PeerAuthenticationError,
)
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.x509svid import TrustBundle, ecdsa_hash, generate_key, spiffe_id_of

__all__ = ["CLOCK_SKEW", "DEFAULT_CA_TTL", "MAX_CSR_BYTES", "CertificateAuthority"]

# Backdating of notBefore, so that peers whose clocks run a little behind accept a
# certificate issued a moment ago.
CLOCK_SKEW = timedelta(seconds=30)
DEFAULT_CA_TTL = timedelta(days=365 * 5)
# A P-256 CSR is a few hundred bytes; anything this large is not one.
MAX_CSR_BYTES = 16 * 1024

_ORG = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "TrustMesh")])


def _check_time(now: datetime, ttl: timedelta) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    if ttl <= timedelta(0):
        raise ConfigError(f"certificate TTL must be positive, got {ttl}")


def _bad_csr(message: str) -> BootstrapError:
    return BootstrapError(message, reason="bad_csr", code=Code.INVALID_ARGUMENT)


@dataclass(frozen=True, eq=False)
class CertificateAuthority:
    """A CA certificate, its key, and the one trust domain it issues for."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    trust_domain: TrustDomain

    def __post_init__(self) -> None:
        if not isinstance(self.key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"CA key is {type(self.key).__name__}, expected an EC key")
        try:
            bc = self.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError) as e:
            raise ConfigError("CA certificate has no usable basicConstraints") from e
        if not bc.ca:
            raise ConfigError("CA certificate is not a CA (basicConstraints CA:FALSE)")
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if self.key.public_key().public_bytes(der, spki) != self.cert.public_key().public_bytes(
            der, spki
        ):
            raise ConfigError("CA key does not match the CA certificate")

    # -- construction ---------------------------------------------------------------

    @classmethod
    def create(
        cls,
        trust_domain: TrustDomain,
        *,
        now: datetime,
        ttl: timedelta = DEFAULT_CA_TTL,
        path_length: int | None = 0,
    ) -> CertificateAuthority:
        """A new self-signed P-256 root for `trust_domain`.

        `path_length=0` (the default) lets it sign leaves only; pass a larger value
        when an intermediate CA (SPIRE's shape) is to sit below it.
        """
        _check_time(now, ttl)
        key = generate_key()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "TrustMesh"),
                x509.NameAttribute(NameOID.COMMON_NAME, trust_domain.name),
            ]
        )
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(str(trust_domain.id()))]
                ),
                critical=False,
            )
            .sign(key, ecdsa_hash(key))
        )
        return cls(cert, key, trust_domain)

    @classmethod
    def load(
        cls, cert_pem: bytes, key_pem: bytes, *, trust_domain: TrustDomain | None = None
    ) -> CertificateAuthority:
        """Load a CA from PEM. The trust domain comes from the certificate's SPIFFE
        URI SAN; `trust_domain` is needed only for a CA certificate without one, and
        must agree with it otherwise."""
        try:
            certs = x509.load_pem_x509_certificates(cert_pem)
        except (ValueError, x509.InvalidVersion) as e:
            raise ConfigError(f"CA certificate is not PEM X.509: {e}") from e
        if len(certs) != 1:
            raise ConfigError(f"CA certificate file holds {len(certs)} certificates, not 1")
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise ConfigError("CA key is not an unencrypted PEM private key") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"CA key is {type(key).__name__}, expected an EC key")
        cert = certs[0]
        td = _trust_domain_of(cert, trust_domain)
        return cls(cert, key, td)

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """PKCS#8, unencrypted: write it only with `write_private_file`."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def bundle(self) -> TrustBundle:
        return TrustBundle(self.trust_domain, (self.cert,))

    # -- issuing --------------------------------------------------------------------

    def sign_csr(
        self, csr_der: bytes, spiffe_id: SpiffeId, *, now: datetime, ttl: timedelta
    ) -> x509.Certificate:
        """An X.509 SVID for `spiffe_id` over the CSR's public key.

        Raises `BootstrapError(reason="bad_csr")` for a CSR that does not parse, whose
        self-signature fails, or whose key is not EC P-256; `ConfigError` when
        `spiffe_id` is outside this CA's trust domain; `CredentialError` when the CA
        certificate is not valid at `now`.
        """
        _check_time(now, ttl)
        if spiffe_id.trust_domain != self.trust_domain:
            raise ConfigError(
                f"cannot issue {spiffe_id}: this CA issues for trust domain {self.trust_domain}"
            )
        if not spiffe_id.path:
            raise ConfigError(
                f"cannot issue {spiffe_id}: an SVID names a workload, not the trust domain"
            )
        ca_not_before = self.cert.not_valid_before_utc
        ca_not_after = self.cert.not_valid_after_utc
        if not ca_not_before <= now < ca_not_after:
            raise CredentialError(
                f"CA certificate for {self.trust_domain} is valid from "
                f"{ca_not_before.isoformat()} to {ca_not_after.isoformat()}, "
                f"not at {now.isoformat()}",
                reason="ca_not_valid",
            )
        public = _csr_public_key(csr_der)
        not_after = min(now + ttl, ca_not_after)
        ca_public = self.key.public_key()
        return (
            x509.CertificateBuilder()
            .subject_name(_ORG)
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(_aki(self.cert, ca_public), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
                critical=False,
            )
            .sign(self.key, ecdsa_hash(self.key))
        )


def check_csr(csr_der: bytes) -> None:
    """Raise `BootstrapError(bad_csr)` unless the CSR is well formed and self-signed.

    Callers check this before spending a join token on the request.
    """
    _csr_public_key(csr_der)


def _csr_public_key(csr_der: bytes) -> ec.EllipticCurvePublicKey:
    """The CSR's public key, once its self-signature proves possession of the key."""
    if len(csr_der) > MAX_CSR_BYTES:
        raise _bad_csr(f"CSR is {len(csr_der)} bytes, more than {MAX_CSR_BYTES}")
    try:
        csr = x509.load_der_x509_csr(csr_der)
        valid = csr.is_signature_valid
        public = csr.public_key()
    except Exception as e:  # hostile bytes: ValueError, InvalidVersion, UnsupportedAlgorithm
        raise _bad_csr(f"CSR does not parse: {e}") from e
    if not valid:
        raise _bad_csr("CSR signature does not verify with the CSR's own public key")
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(
        public.curve, ec.SECP256R1
    ):
        raise _bad_csr("CSR key must be EC P-256")
    return public


def _trust_domain_of(cert: x509.Certificate, given: TrustDomain | None) -> TrustDomain:
    try:
        named: TrustDomain | None = spiffe_id_of(cert).trust_domain
    except PeerAuthenticationError as e:
        try:
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            named = None
        else:
            raise ConfigError(f"CA certificate: {e.message}") from e
    if named is None:
        if given is None:
            raise ConfigError(
                "CA certificate has no SPIFFE URI SAN; pass the trust domain it serves"
            )
        return given
    if given is not None and named != given:
        raise ConfigError(f"CA certificate names trust domain {named}, not {given}")
    return named


def _aki(ca_cert: x509.Certificate, ca_public: ec.EllipticCurvePublicKey) -> x509.ExtensionType:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=True,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
