"""The webhook's serving certificate, for clusters without cert-manager.

`webhook_tls(service, namespace, now=...)` makes a private CA (EC P-256, path length
0) and a leaf for the Service's DNS names. The CA goes into the
MutatingWebhookConfiguration's `caBundle`; the leaf and its key into the
`trustmesh-webhook-tls` Secret (`kubernetes.io/tls`). The CA key is not returned: it
is thrown away, so the only way to get another certificate is a new CA (rotate both,
as `docs/kubernetes.md` shows). Pure: the caller passes `now`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustmesh.errors import ConfigError

__all__ = ["WebhookTls", "service_dns_names", "webhook_tls"]

_LABEL_MAX = 63


@dataclass(frozen=True, slots=True)
class WebhookTls:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def service_dns_names(service: str, namespace: str) -> list[str]:
    for what, label in (("service", service), ("namespace", namespace)):
        ok = (
            0 < len(label) <= _LABEL_MAX
            and label[0].isalnum()
            and label[-1].isalnum()
            and all(c.islower() or c.isdigit() or c == "-" for c in label)
        )
        if not ok:
            raise ConfigError(f"{what} {label!r} is not a DNS label")
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


def webhook_tls(
    service: str, namespace: str, *, now: datetime, validity: timedelta = timedelta(days=365)
) -> WebhookTls:
    names = service_dns_names(service, namespace)
    not_before = now - timedelta(minutes=5)
    not_after = now + validity
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"trustmesh webhook CA {namespace}")]
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[2])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return WebhookTls(
        ca_pem=ca.public_bytes(pem),
        cert_pem=leaf.public_bytes(pem),
        key_pem=key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
