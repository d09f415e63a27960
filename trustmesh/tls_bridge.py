"""Outbound mTLS with the peer's exact SPIFFE ID checked after the handshake.

grpcio's client can't check a URI SAN (`ssl_target_name_override` matches only DNS
and IP SANs), and SPIFFE SVIDs carry nothing but a URI SAN. So a gRPC client in
TrustMesh never speaks TLS itself: it dials a private unix socket, and this bridge
opens the real TLS connection with Python's `ssl`, checks that the server
presented exactly the SPIFFE ID the caller meant to reach, and only then pipes the
bytes (ADR 0003). The same mechanism serves the sidecar's peers, the sidecar's
registry connection and the CLI.

Invariants:
* Only the bundle of the expected ID's own trust domain is loaded into the context,
  so a CA of another (federated) trust domain can never vouch for the peer.
* A connection whose peer ID differs from the expected one is closed before a single
  application byte crosses it; the failure is kept for `last_error()`.
* The unix sockets live in a 0700 directory: only this user can dial them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from trustmesh.errors import PeerAuthenticationError
from trustmesh.spiffe_id import SpiffeId
from trustmesh.x509svid import BundleSet, X509Svid, spiffe_id_of, write_private_file

__all__ = ["ClientTls", "TlsBridge", "dial"]

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ClientTls:
    """What one outbound TLS connection presents and expects.

    `svid=None` dials without a client certificate (bootstrap). `bundles=None`
    skips chain verification; it is only used to fetch a bundle that is then
    checked against a pinned CA fingerprint before anything trusts it.
    """

    svid: X509Svid | None
    bundles: BundleSet | None
    expected_id: SpiffeId | None


@dataclass
class _Contexts:
    """SSL contexts cached per (trust domain, SVID serial, bundle version)."""

    directory: Path
    cache: dict[tuple[str, str, str], ssl.SSLContext] = field(default_factory=dict)

    def get(self, tls: ClientTls) -> ssl.SSLContext:
        td = tls.expected_id.trust_domain.name if tls.expected_id else ""
        serial = tls.svid.serial_hex if tls.svid else ""
        version = tls.bundles.version if tls.bundles else ""
        key = (td, serial, version)
        ctx = self.cache.get(key)
        if ctx is None:
            if len(self.cache) > 64:
                self.cache.clear()
            ctx = self._build(tls)
            self.cache[key] = ctx
        return ctx

    def _build(self, tls: ClientTls) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False  # SPIFFE IDs are URI SANs; checked after the handshake
        ctx.set_alpn_protocols(["h2"])
        if tls.bundles is None:
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx.verify_mode = ssl.CERT_REQUIRED
            if tls.expected_id is None:
                raise PeerAuthenticationError("a verified connection needs an expected SPIFFE ID")
            bundle = tls.bundles.get(tls.expected_id.trust_domain)
            if bundle is None:
                raise PeerAuthenticationError(
                    f"no trust bundle for trust domain '{tls.expected_id.trust_domain}'",
                    reason="peer_untrusted",
                )
            ctx.load_verify_locations(cadata=bundle.pem().decode())
        if tls.svid is not None:
            # ssl can only load a key from a file: write it 0600 into our private dir.
            stem = self.directory / f"svid-{tls.svid.serial_hex[:16]}"
            cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
            write_private_file(cert_path, tls.svid.chain_pem())
            write_private_file(key_path, tls.svid.key_pem())
            try:
                ctx.load_cert_chain(str(cert_path), str(key_path))
            finally:
                key_path.unlink(missing_ok=True)
                cert_path.unlink(missing_ok=True)
        return ctx


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise PeerAuthenticationError(f"bad peer address {address!r}: expected host:port")
    return host.strip("[]"), int(port)


async def dial(
    address: str,
    tls: ClientTls,
    contexts: _Contexts,
    *,
    timeout: float = 5.0,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, x509.Certificate]:
    """Open TLS to `address` and check the peer's SPIFFE ID; returns the streams and leaf."""
    host, port = _split_address(address)
    ctx = contexts.get(tls)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host, port, ssl=ctx, server_hostname=None if _is_ip(host) else host
            ),
            timeout,
        )
    except ssl.SSLError as e:
        raise PeerAuthenticationError(
            f"TLS handshake with {address} failed: {e.reason or e}",
            reason="peer_unauthenticated",
        ) from e
    except (OSError, TimeoutError) as e:
        raise ConnectionError(f"cannot connect to {address}: {e}") from e
    sslobj = writer.get_extra_info("ssl_object")
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    try:
        if der is None:
            raise PeerAuthenticationError(f"{address} presented no certificate")
        leaf = x509.load_der_x509_certificate(der)
        if tls.expected_id is not None:
            actual = spiffe_id_of(leaf)
            if actual != tls.expected_id:
                raise PeerAuthenticationError(
                    f"expected {tls.expected_id} at {address}, peer presented {actual}",
                    reason="peer_identity_mismatch",
                )
    except BaseException:
        writer.close()
        raise
    return reader, writer, leaf


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()


@dataclass
class _Route:
    path: str
    address: str
    expected_id: SpiffeId | None
    server: asyncio.base_events.Server
    last_error: PeerAuthenticationError | None = None
    peer_serials: list[str] = field(default_factory=list)


class TlsBridge:
    """Unix sockets that gRPC channels dial, each piped to mTLS to one peer.

    `credentials()` is called per new connection, so a rotated SVID or bundle is
    used from the next connection on without touching existing ones.
    """

    def __init__(
        self,
        credentials: Callable[[], tuple[X509Svid | None, BundleSet | None]],
        *,
        directory: Path | None = None,
    ) -> None:
        self._credentials = credentials
        # unix socket paths are limited to ~107 bytes: keep them short.
        if directory is not None and len(str(directory)) <= 60:
            self._dir = directory
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._owns_dir = False
        else:
            self._dir = Path(tempfile.mkdtemp(prefix="tmb-"))
            self._owns_dir = True
        os.chmod(self._dir, 0o700)
        self._contexts = _Contexts(self._dir)
        self._routes: dict[tuple[str, SpiffeId | None], _Route] = {}
        self._lock = asyncio.Lock()
        self._conns: set[asyncio.Task[None]] = set()

    async def target(self, address: str, expected_id: SpiffeId | None) -> str:
        """The `unix:` gRPC target that reaches `expected_id` at `address`."""
        key = (address, expected_id)
        route = self._routes.get(key)
        if route is not None:
            return "unix:" + route.path
        async with self._lock:
            route = self._routes.get(key)
            if route is None:
                digest = hashlib.sha256(f"{address}|{expected_id}".encode()).hexdigest()[:20]
                path = str(self._dir / f"{digest}.sock")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                holder: list[_Route] = []
                server = await asyncio.start_unix_server(
                    lambda r, w: self._accept(r, w, holder[0]), path=path
                )
                os.chmod(path, 0o600)
                route = _Route(path, address, expected_id, server)
                holder.append(route)
                self._routes[key] = route
        return "unix:" + route.path

    def last_error(
        self, address: str, expected_id: SpiffeId | None
    ) -> PeerAuthenticationError | None:
        route = self._routes.get((address, expected_id))
        return route.last_error if route else None

    def peer_serials(self, address: str, expected_id: SpiffeId | None) -> list[str]:
        """Serials of the certificates the peer presented, oldest first (for tests)."""
        route = self._routes.get((address, expected_id))
        return list(route.peer_serials) if route else []

    async def _accept(
        self, local_r: asyncio.StreamReader, local_w: asyncio.StreamWriter, route: _Route
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        remote_w: asyncio.StreamWriter | None = None
        try:
            svid, bundles = self._credentials()
            try:
                remote_r, remote_w, leaf = await dial(
                    route.address, ClientTls(svid, bundles, route.expected_id), self._contexts
                )
            except PeerAuthenticationError as e:
                route.last_error = e
                log.warning("refused peer: %s", e.message)
                local_w.close()
                return
            except ConnectionError as e:
                log.debug("%s", e)
                local_w.close()
                return
            route.last_error = None
            serial = format(leaf.serial_number, "x")
            if not route.peer_serials or route.peer_serials[-1] != serial:
                route.peer_serials.append(serial)
                del route.peer_serials[:-32]
            await asyncio.gather(_pipe(local_r, remote_w), _pipe(remote_r, local_w))
        except asyncio.CancelledError:
            # Closing: asyncio would log a cancelled connection task as an error. Drop
            # the TCP connection at once: a graceful TLS close would wait (up to 30 s)
            # for the peer's close_notify, and until then the peer keeps our streams
            # open (e.g. the registry would keep listing a stopped sidecar's endpoint).
            if remote_w is not None:
                remote_w.transport.abort()
        finally:
            with contextlib.suppress(Exception):
                local_w.close()
            if task is not None:
                self._conns.discard(task)

    async def close(self) -> None:
        for route in self._routes.values():
            route.server.close()
        for t in list(self._conns):
            t.cancel()
        for route in self._routes.values():
            with contextlib.suppress(Exception):
                await route.server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(route.path)
        self._routes.clear()
        if self._owns_dir:
            with contextlib.suppress(OSError):
                for p in self._dir.iterdir():
                    p.unlink()
                self._dir.rmdir()
