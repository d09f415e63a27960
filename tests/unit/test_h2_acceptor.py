"""The inbound listener's TLS context (`tls.acceptor`): real handshakes on loopback.

The listener's own context holds no certificate and no root; each handshake gets the
current generation's server context from the SNI callback. These cases pin down that
the roots verifying the client are the current generation's, not the first one's: a
CA dropped by a rotation stops vouching from the next handshake on, a CA added starts
to, and a client that sends no SNI (grpc core never does for IP addresses) still gets
the hand-over.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from trustmesh.ca import CertificateAuthority
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.x509svid import BundleSet, X509Svid, generate_key, make_csr
from trustmesh_sidecar.h2.tls import TlsMaterial, acceptor, verified_chain

TD = TrustDomain.parse("test.local")
SERVER = SpiffeId.parse("spiffe://test.local/agents/bob")
CLIENT = SpiffeId.parse("spiffe://test.local/agents/alice")
NOW = datetime.now(UTC)


def _ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD, now=NOW, ttl=timedelta(days=1))


OLD, NEW = _ca(), _ca()


def _svid(ca: CertificateAuthority, sid: SpiffeId) -> X509Svid:
    key = generate_key()
    cert = ca.sign_csr(make_csr(key, sid), sid, now=NOW, ttl=timedelta(minutes=10))
    return X509Svid(sid, (cert,), key)


def _material(tmp: Path, ca: CertificateAuthority) -> TlsMaterial:
    return TlsMaterial(_svid(ca, SERVER), BundleSet.of(ca.bundle()), tmp)


def _client_context(tmp: Path, svid: X509Svid | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the server's identity is not what is tested here
    ctx.set_alpn_protocols(["h2"])
    if svid is not None:
        cert, key = tmp / f"client-{id(svid)}.crt", tmp / f"client-{id(svid)}.key"
        cert.write_bytes(svid.chain_pem())
        key.write_bytes(svid.key_pem())
        key.chmod(0o600)
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


class _Listener:
    """A TLS listener on `acceptor(current)` that records each accepted client chain."""

    def __init__(self, current: Callable[[], ssl.SSLContext]) -> None:
        self.current = current
        self.accepted: asyncio.Queue[tuple[bytes, ...]] = asyncio.Queue()

    async def __aenter__(self) -> int:
        accepted = self.accepted

        class Server(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                accepted.put_nowait(verified_chain(transport))
                transport.close()

        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            Server, "127.0.0.1", 0, ssl=acceptor(self.current), ssl_handshake_timeout=5
        )
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def handshake(
        self, port: int, tmp: Path, client: X509Svid | None, sni: bool
    ) -> tuple[bytes, ...] | str:
        """The client chain the server verified, or "refused"."""
        ctx = _client_context(tmp, client)
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctx, server_hostname="bob.test" if sni else None
                ),
                5,
            )
            writer.close()
        except (OSError, ssl.SSLError):
            pass  # TLS 1.3: a refused client certificate may surface only on the server
        try:
            return await asyncio.wait_for(self.accepted.get(), 0.5)
        except TimeoutError:
            return "refused"


GENERATIONS = {"old": OLD, "new": NEW}

# (client CA or None, current generation's CA, the client sends SNI) -> accepted?
CASES = {
    "old-client-old-generation": ("old", "old", False, True),
    "old-client-after-rotation-to-new-ca": ("old", "new", False, False),
    "new-client-before-rotation": ("new", "old", False, False),
    "new-client-after-rotation": ("new", "new", False, True),
    "with-sni-current-ca": ("new", "new", True, True),
    "with-sni-dropped-ca": ("old", "new", True, False),
    "no-client-certificate": (None, "old", False, False),
}


@pytest.mark.parametrize(
    ("client_ca", "current_ca", "sni", "accepted"), list(CASES.values()), ids=list(CASES)
)
async def test_the_current_generation_decides_the_handshake(
    tmp_path: Path, client_ca: str | None, current_ca: str, sni: bool, accepted: bool
) -> None:
    contexts = {name: _material(tmp_path, ca).server for name, ca in GENERATIONS.items()}
    current = {"ctx": contexts["old"]}
    async with (listener := _Listener(lambda: current["ctx"])) as port:
        # The listener's first handshake runs under "old"; the rotation to the case's
        # generation comes after it, as on a long-lived listener.
        assert await listener.handshake(port, tmp_path, _svid(OLD, CLIENT), sni) != "refused"
        current["ctx"] = contexts[current_ca]
        client = None if client_ca is None else _svid(GENERATIONS[client_ca], CLIENT)
        got = await listener.handshake(port, tmp_path, client, sni)
    if accepted:
        assert client is not None and got != "refused"
        assert got[0] == client.leaf.public_bytes(Encoding.DER)
    else:
        assert got == "refused"
