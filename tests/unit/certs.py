"""Shared test helpers: CAs, SVIDs and hostile certificates at a fixed `NOW`.

Honest certificates come from the real `CertificateAuthority`, so tests exercise
the production issuing path. `forge_leaf` and `make_intermediate` build
certificates by hand, for shapes the CA refuses to make (two SANs, a federated
CA signing our IDs, a CA:TRUE leaf) and for SPIRE-shaped chains.

Import with `from certs import ...` (pytest puts this directory on sys.path).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustmesh.ca import CertificateAuthority
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.x509svid import BundleSet, TrustBundle, X509Svid, generate_key, make_csr

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
TD = TrustDomain.parse("example.org")
OTHER_TD = TrustDomain.parse("other.org")
BOTH_EKUS = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)


E = TypeVar("E", bound=BaseException)


@contextlib.contextmanager
def raises(
    exc_type: type[E] | tuple[type[E], ...], substring: str
) -> Iterator[pytest.ExceptionInfo[E]]:
    """`pytest.raises` for an exact substring of the message (no regex surprises)."""
    with pytest.raises(exc_type, match=re.escape(substring)) as info:
        yield info


def sid(text: str) -> SpiffeId:
    return SpiffeId.parse(text)


def uri(text: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(text)


def _td(td: str | TrustDomain) -> TrustDomain:
    return td if isinstance(td, TrustDomain) else TrustDomain.parse(td)


def make_ca(
    td: str | TrustDomain = TD,
    *,
    now: datetime = NOW,
    ttl: timedelta = timedelta(days=365),
    path_length: int | None = 0,
) -> CertificateAuthority:
    """A fresh root CA; `path_length>=1` lets `make_intermediate` hang below it."""
    return CertificateAuthority.create(_td(td), now=now, ttl=ttl, path_length=path_length)


def issue(
    ca: CertificateAuthority,
    spiffe_id: str | SpiffeId,
    *,
    now: datetime = NOW,
    ttl: timedelta = HOUR,
    intermediates: Sequence[x509.Certificate] = (),
) -> X509Svid:
    """An SVID through the real CSR path. For a CA from `make_intermediate`, pass
    `intermediates=(ca.cert,)` (plus any above it) to get the SPIRE chain shape."""
    sp = spiffe_id if isinstance(spiffe_id, SpiffeId) else sid(spiffe_id)
    key = generate_key()
    cert = ca.sign_csr(make_csr(key, sp), sp, now=now, ttl=ttl)
    return X509Svid(sp, (cert, *intermediates), key)


def make_intermediate(
    parent: CertificateAuthority,
    *,
    now: datetime = NOW,
    ttl: timedelta = 30 * DAY,
    path_length: int | None = 0,
    name: str = "intermediate",
    ekus: Sequence[x509.ObjectIdentifier] | None = None,
) -> CertificateAuthority:
    """An intermediate CA signed by `parent`, shaped like SPIRE's server CA:
    CA:TRUE, keyCertSign, and the trust domain's SPIFFE ID as its URI SAN."""
    key = generate_key()
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "TrustMesh"),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(parent.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(seconds=30))
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([uri(str(parent.trust_domain.id()))]), critical=False
        )
    )
    if ekus is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
    cert = builder.sign(parent.key, hashes.SHA256())
    return CertificateAuthority(cert, key, parent.trust_domain)


class Signer(Protocol):
    """Anything with a certificate and its key: a CA, or a leaf abused as one."""

    @property
    def cert(self) -> x509.Certificate: ...
    @property
    def key(self) -> ec.EllipticCurvePrivateKey: ...


def forge_leaf(
    signer: Signer,
    sans: Sequence[x509.GeneralName] | None,
    *,
    not_before: datetime = NOW - timedelta(minutes=1),
    not_after: datetime = NOW + HOUR,
    ekus: Sequence[x509.ObjectIdentifier] | None = BOTH_EKUS,
    is_ca: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf built by hand and signed with `signer`'s key, bypassing every check
    in `sign_csr`. `sans=None` leaves out the subjectAltName extension."""
    key = generate_key()
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "TrustMesh")]))
        .issuer_name(signer.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, is_ca, is_ca, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.key.public_key()),
            critical=False,
        )
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if ekus is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
    return builder.sign(signer.key, hashes.SHA256()), key


def der(*certs: x509.Certificate) -> tuple[bytes, ...]:
    return tuple(c.public_bytes(serialization.Encoding.DER) for c in certs)


def bundles(*cas: CertificateAuthority) -> BundleSet:
    """One bundle per trust domain, holding every given CA of that domain."""
    by_td: dict[TrustDomain, list[x509.Certificate]] = {}
    for ca in cas:
        by_td.setdefault(ca.trust_domain, []).append(ca.cert)
    return BundleSet.of(*(TrustBundle(td, tuple(certs)) for td, certs in by_td.items()))
