"""mTLS for the frame-level engine, on Python's `ssl` (ADR 0003, ADR 0004, ADR 0009).

* Server: one context per credential generation, with our SVID (leaf and
  intermediates), client certificates required and every bundle as roots. The
  listener's own context (`acceptor`) holds no certificate and trusts no CA: its SNI
  callback, which OpenSSL calls for every ClientHello (with or without a server
  name), hands the connection the current generation's context, so a rotated SVID or
  bundle is used from the next handshake on (ADR 0009).
* Client: one context per (trust domain, generation) whose only roots are the bundle
  of the expected ID's own trust domain, so a federated CA can't vouch for anyone
  else. After the handshake, the leaf must carry exactly the expected SPIFFE ID
  (`check_server`); otherwise the connection closes before any HTTP/2 byte is sent.
* The caller's chain (`verified_chain`) is what OpenSSL verified, leaf first, with
  self-issued anchors dropped: the router verifies it again against the bundle of the
  ID's own trust domain. CPython 3.11 exposes that chain only through the private
  `_sslobj.get_verified_chain()`; without it we report the leaf alone, which verifies
  whenever the leaf is issued directly by a bundle CA.

TLS >= 1.2 with ALPN h2; on TLS 1.2 only ECDHE with AEAD ciphers (RFC 9113 9.2.2).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509

from trustmesh.errors import PeerAuthenticationError
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.x509svid import BundleSet, X509Svid, spiffe_id_of, write_private_file

__all__ = ["TlsMaterial", "acceptor", "check_server", "verified_chain"]

_CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20"
_ENCODING_DER = 2  # _ssl.ENCODING_DER
_files = itertools.count()


class TlsMaterial:
    """The SSL contexts of one credential generation (an SVID and a bundle set)."""

    def __init__(self, svid: X509Svid, bundles: BundleSet, directory: Path) -> None:
        self.svid = svid
        self.bundles = bundles
        self._dir = directory
        self.server = self._server()
        self._clients: dict[TrustDomain, ssl.SSLContext] = {}

    def _load_svid(self, ctx: ssl.SSLContext) -> None:
        # ssl loads a key only from a file: write it 0600 into our private directory.
        stem = self._dir / f"h2-{self.svid.serial_hex[:16]}-{next(_files)}"
        cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
        write_private_file(cert_path, self.svid.chain_pem())
        write_private_file(key_path, self.svid.key_pem())
        try:
            ctx.load_cert_chain(str(cert_path), str(key_path))
        finally:
            key_path.unlink(missing_ok=True)
            cert_path.unlink(missing_ok=True)

    def _common(self, ctx: ssl.SSLContext) -> None:
        _protocol(ctx)
        self._load_svid(ctx)

    def _server(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._common(ctx)
        ctx.load_verify_locations(cadata=self.bundles.all_pem().decode())
        return ctx

    def client(self, expected: SpiffeId) -> ssl.SSLContext:
        td = expected.trust_domain
        ctx = self._clients.get(td)
        if ctx is None:
            bundle = self.bundles.get(td)
            if bundle is None:
                raise PeerAuthenticationError(
                    f"no trust bundle for trust domain '{td}'", reason="peer_untrusted"
                )
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False  # SPIFFE IDs are URI SANs: checked after the handshake
            self._common(ctx)
            ctx.load_verify_locations(cadata=bundle.pem().decode())
            self._clients[td] = ctx
        return ctx


def _protocol(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_CIPHERS_TLS12)
    ctx.set_alpn_protocols(["h2"])
    ctx.verify_mode = ssl.CERT_REQUIRED


def acceptor(current: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """The inbound listener's context: each handshake gets `current()` (a generation's
    server context) from the SNI callback. Protocol version, ciphers and the demand for
    a client certificate are this context's (OpenSSL fixes them when the connection is
    created); the certificate and the roots that verify the client are the handed-over
    context's. Without the hand-over there is no certificate and no root: the handshake
    fails."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _protocol(ctx)

    def hand_over(sslobj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        sslobj.context = current()

    ctx.sni_callback = hand_over
    return ctx


def _ssl_object(transport: asyncio.BaseTransport) -> Any:
    sslobj = transport.get_extra_info("ssl_object")
    if sslobj is None:
        raise PeerAuthenticationError("the connection is not TLS")
    return sslobj


def check_server(
    transport: asyncio.BaseTransport, expected: SpiffeId, address: str
) -> x509.Certificate:
    """The server's leaf, once it proves exactly `expected` and agreed on h2."""
    sslobj = _ssl_object(transport)
    der = sslobj.getpeercert(binary_form=True)
    if not der:
        raise PeerAuthenticationError(f"{address} presented no certificate")
    leaf = x509.load_der_x509_certificate(der)
    actual = spiffe_id_of(leaf)
    if actual != expected:
        raise PeerAuthenticationError(
            f"expected {expected} at {address}, peer presented {actual}",
            reason="peer_identity_mismatch",
        )
    if sslobj.selected_alpn_protocol() != "h2":
        raise PeerAuthenticationError(f"{address} did not agree on HTTP/2 (ALPN h2)")
    return leaf


def verified_chain(transport: asyncio.BaseTransport) -> tuple[bytes, ...]:
    """The client's chain as the handshake verified it: leaf first, DER, no anchors."""
    sslobj = _ssl_object(transport)
    leaf = sslobj.getpeercert(binary_form=True)
    if not leaf:
        return ()
    inner = getattr(sslobj, "_sslobj", None)
    get_chain = getattr(inner, "get_verified_chain", None)
    if get_chain is None:
        return (leaf,)
    chain = [leaf]
    with contextlib.suppress(Exception):
        for cert in get_chain()[1:]:
            der = cert.public_bytes(_ENCODING_DER)
            parsed = x509.load_der_x509_certificate(der)
            if parsed.issuer != parsed.subject:
                chain.append(der)
    return tuple(chain)
