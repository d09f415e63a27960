"""X.509 SVIDs, trust bundles and the files that hold them.

Invariants:

* An `X509Svid` always has exactly one SPIFFE URI SAN in its leaf, that ID is its
  `spiffe_id`, and its private key matches the leaf's public key. The key never
  appears in `repr()` or in an error message.
* A `TrustBundle` holds the CA certificates of one trust domain; a `BundleSet` maps
  each trust domain to at most one bundle and is immutable. Its `version` changes
  whenever any authority changes, so caches can be keyed on it.
* Nothing here reads the clock, the environment or a socket, except the two
  `write_*_file` helpers, which write one file atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustmesh.errors import (
    ConfigError,
    CredentialError,
    InvalidSpiffeIdError,
    PeerAuthenticationError,
)
from trustmesh.spiffe_id import SpiffeId, TrustDomain

__all__ = [
    "BundleSet",
    "TrustBundle",
    "X509Svid",
    "ca_fingerprint",
    "ecdsa_hash",
    "generate_key",
    "make_csr",
    "spiffe_id_of",
    "write_private_file",
    "write_public_file",
]


# What parsing bytes from a file or the registry may raise.
_PARSE_ERRORS = (ValueError, TypeError, x509.InvalidVersion, UnsupportedAlgorithm)


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 key, the only key type the mesh issues SVIDs for."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: SpiffeId) -> bytes:
    """A DER PKCS#10 request for `spiffe_id`. The CA ignores what it asks for beyond
    the public key; the URI SAN is there so the request reads right in tools."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=False,
        )
        .sign(key, ecdsa_hash(key))
    )
    return csr.public_bytes(serialization.Encoding.DER)


def ecdsa_hash(
    key: ec.EllipticCurvePrivateKey,
) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    """The ECDSA hash that matches the curve (WebPKI rejects mismatched pairs)."""
    size = key.curve.key_size
    if size <= 256:
        return hashes.SHA256()
    if size <= 384:
        return hashes.SHA384()
    return hashes.SHA512()


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The one SPIFFE ID a certificate names in its URI SAN.

    Raises `PeerAuthenticationError` unless there is exactly one URI SAN and it is a
    valid SPIFFE ID: an SVID that names two identities names none.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PeerAuthenticationError(
            "certificate has no subjectAltName; an SVID has exactly one URI SAN"
        ) from None
    except Exception as e:  # malformed extensions from a peer: fail closed, wrapped
        raise PeerAuthenticationError(f"certificate extensions are malformed: {e}") from e
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise PeerAuthenticationError(
            f"certificate has {len(uris)} URI SANs; an SVID has exactly one"
        )
    try:
        parsed = SpiffeId.parse(uris[0])
    except InvalidSpiffeIdError as e:
        raise PeerAuthenticationError(f"certificate URI SAN is not a SPIFFE ID: {e.message}") from e
    # py-spiffe lower-cases the scheme and trust domain; SPIFFE (and go-spiffe) allow
    # only the lower-case form, so an SVID must carry the ID exactly as we print it.
    if str(parsed) != uris[0]:
        raise PeerAuthenticationError(
            f"certificate URI SAN {uris[0][:80]!r} is not a SPIFFE ID in canonical form ({parsed})"
        )
    return parsed


def ca_fingerprint(cert: x509.Certificate) -> str:
    """`sha256:<hex>` of the DER encoding; how operators pin and compare CAs."""
    der = cert.public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _spki(key: object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return b""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# -- SVID ---------------------------------------------------------------------------


@dataclass(frozen=True)
class X509Svid:
    """A leaf certificate (plus any intermediates, leaf first) and its private key."""

    spiffe_id: SpiffeId
    cert_chain: tuple[x509.Certificate, ...]
    private_key: ec.EllipticCurvePrivateKey = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        _ec_key(self.private_key)
        named = _leaf_id(self.cert_chain)
        if named != self.spiffe_id:
            raise CredentialError(
                f"SVID leaf names {named}, not {self.spiffe_id}", reason="invalid_svid"
            )
        if _spki(self.private_key.public_key()) != _spki(self.cert_chain[0].public_key()):
            raise CredentialError(
                f"private key does not match the SVID leaf for {named} (serial {self.serial_hex})",
                reason="invalid_svid",
            )

    @classmethod
    def from_der(cls, chain: Sequence[bytes], key: ec.EllipticCurvePrivateKey | bytes) -> X509Svid:
        """`chain` is DER certificates, leaf first; `key` a key or PKCS#8 DER bytes."""
        try:
            certs = tuple(x509.load_der_x509_certificate(d) for d in chain)
        except _PARSE_ERRORS as e:
            raise CredentialError(f"SVID chain is not DER X.509: {e}", reason="invalid_svid") from e
        if isinstance(key, bytes):
            try:
                loaded = serialization.load_der_private_key(key, password=None)
            except _PARSE_ERRORS as e:
                raise CredentialError(
                    "SVID private key is not unencrypted PKCS#8 DER", reason="invalid_svid"
                ) from e
            key = _ec_key(loaded)
        return cls(_leaf_id(certs), certs, key)

    @classmethod
    def from_pem(cls, chain_pem: bytes, key_pem: bytes) -> X509Svid:
        try:
            certs = tuple(x509.load_pem_x509_certificates(chain_pem))
        except _PARSE_ERRORS as e:
            raise CredentialError(f"SVID chain is not PEM X.509: {e}", reason="invalid_svid") from e
        try:
            loaded = serialization.load_pem_private_key(key_pem, password=None)
        except _PARSE_ERRORS as e:
            # Never quote the key bytes or the parser's view of them.
            raise CredentialError(
                "SVID private key is not an unencrypted PEM key", reason="invalid_svid"
            ) from e
        return cls(_leaf_id(certs), certs, _ec_key(loaded))

    @property
    def leaf(self) -> x509.Certificate:
        return self.cert_chain[0]

    @property
    def serial_hex(self) -> str:
        return format(self.leaf.serial_number, "x")

    @property
    def not_before(self) -> datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    def chain_der(self) -> tuple[bytes, ...]:
        return tuple(_der(c) for c in self.cert_chain)

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.cert_chain)

    def key_pem(self) -> bytes:
        """PKCS#8, unencrypted: write it only with `write_private_file`."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:
        return (
            f"X509Svid(spiffe_id={self.spiffe_id}, serial={self.serial_hex}, "
            f"not_after={self.not_after.isoformat()})"
        )


def _leaf_id(certs: tuple[x509.Certificate, ...]) -> SpiffeId:
    if not certs:
        raise CredentialError("SVID has an empty certificate chain", reason="invalid_svid")
    try:
        return spiffe_id_of(certs[0])
    except PeerAuthenticationError as e:
        raise CredentialError(f"SVID leaf: {e.message}", reason="invalid_svid") from e


def _ec_key(key: object) -> ec.EllipticCurvePrivateKey:
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialError(
            f"SVID private key is {type(key).__name__}, expected an EC key",
            reason="invalid_svid",
        )
    return key


# -- bundles ------------------------------------------------------------------------


@dataclass(frozen=True)
class TrustBundle:
    """The CA certificates that vouch for the IDs of one trust domain."""

    trust_domain: TrustDomain
    authorities: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        for cert in self.authorities:
            if not _is_ca(cert):
                raise ConfigError(
                    f"trust bundle for {self.trust_domain} holds a certificate that is not "
                    f"a CA ({ca_fingerprint(cert)})"
                )

    @classmethod
    def from_pem(cls, trust_domain: TrustDomain, data: bytes) -> TrustBundle:
        try:
            certs = x509.load_pem_x509_certificates(data)
        except _PARSE_ERRORS as e:
            raise ConfigError(f"trust bundle for {trust_domain} is not PEM X.509: {e}") from e
        return cls(trust_domain, tuple(certs))

    @classmethod
    def from_der(cls, trust_domain: TrustDomain, certs: Sequence[bytes]) -> TrustBundle:
        try:
            parsed = tuple(x509.load_der_x509_certificate(d) for d in certs)
        except _PARSE_ERRORS as e:
            raise ConfigError(f"trust bundle for {trust_domain} is not DER X.509: {e}") from e
        return cls(trust_domain, parsed)

    def pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.authorities)

    def der(self) -> tuple[bytes, ...]:
        return tuple(_der(c) for c in self.authorities)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except Exception:  # missing or malformed: not a CA
        return False
    return bc.ca


@dataclass(frozen=True)
class BundleSet:
    """Immutable map of trust domain to bundle. Build with `BundleSet.of(...)`."""

    bundles: tuple[TrustBundle, ...] = ()
    _index: Mapping[TrustDomain, TrustBundle] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    version: str = field(init=False, compare=False, default="")

    def __post_init__(self) -> None:
        index: dict[TrustDomain, TrustBundle] = {}
        for b in self.bundles:
            if b.trust_domain in index:
                raise ConfigError(f"two trust bundles for {b.trust_domain}")
            index[b.trust_domain] = b
        ordered = tuple(sorted(self.bundles, key=lambda b: b.trust_domain.name))
        h = hashlib.sha256()
        for b in ordered:
            h.update(b.trust_domain.name.encode() + b"\0")
            for der in sorted(b.der()):
                h.update(len(der).to_bytes(4, "big") + der)
            h.update(b"\1")
        object.__setattr__(self, "bundles", ordered)
        object.__setattr__(self, "_index", MappingProxyType(index))
        object.__setattr__(self, "version", h.hexdigest()[:16])

    @classmethod
    def of(cls, *bundles: TrustBundle) -> BundleSet:
        return cls(tuple(bundles))

    def get(self, trust_domain: TrustDomain) -> TrustBundle | None:
        return self._index.get(trust_domain)

    def with_bundle(self, bundle: TrustBundle) -> BundleSet:
        """A new set where `bundle` replaces any bundle of its trust domain."""
        kept = tuple(b for b in self.bundles if b.trust_domain != bundle.trust_domain)
        return BundleSet((*kept, bundle))

    def trust_domains(self) -> tuple[TrustDomain, ...]:
        return tuple(b.trust_domain for b in self.bundles)

    def all_authorities(self) -> tuple[x509.Certificate, ...]:
        seen: set[bytes] = set()
        out: list[x509.Certificate] = []
        for b in self.bundles:
            for c in b.authorities:
                der = _der(c)
                if der not in seen:
                    seen.add(der)
                    out.append(c)
        return tuple(out)

    def all_pem(self) -> bytes:
        """Every authority as PEM: the TLS root store. Only the chain check in
        `PeerVerifier` decides which trust domain a root may vouch for."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.all_authorities())

    def __len__(self) -> int:
        return len(self.bundles)

    def __iter__(self) -> Iterator[TrustBundle]:
        return iter(self.bundles)


# -- files --------------------------------------------------------------------------


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`, mode 0600 from the first byte."""
    _write_atomic(path, data, 0o600)


def write_public_file(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`, mode 0644."""
    _write_atomic(path, data, 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    # The mode is set by open() itself, so the file is never wider than `mode`
    # (umask can only narrow it); fchmod then makes it exact.
    fd = os.open(tmp, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
