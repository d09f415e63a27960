"""`H2Engine`: the forwarding engine as a hand-written HTTP/2 framer (ADR 0009).

It implements the `Engine` seam (`trustmesh_sidecar/engine.py`) with the same
semantics as `GrpcEngine`, without grpcio and without the TLS bridge:

* inbound: a TLS listener whose SNI callback hands each handshake the current
  server `SSLContext` (`tls.acceptor`), so rotated credentials reach the next one;
* outbound: plaintext h2c on localhost for the agent;
* upstreams: pooled connections per (address, expected ID, credential generation),
  over mTLS with the exact SPIFFE ID checked after the handshake (peers), or h2c
  (the local app). A connection of an older generation, or older than the maximum
  connection age, takes no new calls and closes when its last one ends.

Handshake and protocol failures are logged and close one connection; the listeners
keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from trustmesh.errors import Code, PeerAuthenticationError, format_details
from trustmesh.limits import DEFAULT_LIMITS, Limits
from trustmesh.spiffe_id import SpiffeId
from trustmesh.x509svid import BundleSet, X509Svid
from trustmesh_sidecar.engine import CallRouter, CallStart, Forward, Reject, Upstream
from trustmesh_sidecar.h2 import grpc_wire as wire
from trustmesh_sidecar.h2.call import Call, Control, reject
from trustmesh_sidecar.h2.config import H2Config
from trustmesh_sidecar.h2.connection import H2Connection
from trustmesh_sidecar.h2.deadlines import Deadlines
from trustmesh_sidecar.h2.hpack_cache import RawHeaders
from trustmesh_sidecar.h2.streams import Stream
from trustmesh_sidecar.h2.tls import TlsMaterial, acceptor, check_server, verified_chain

__all__ = ["H2Engine"]

log = logging.getLogger(__name__)

_Key = tuple[str, SpiffeId | None]


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bad address {address!r}: expected host:port")
    return host.strip("[]"), int(port)


class H2Engine:
    def __init__(
        self,
        svid: X509Svid,
        bundles: BundleSet,
        *,
        limits: Limits = DEFAULT_LIMITS,
        bridge_dir: Path | None = None,
        config: H2Config | None = None,
    ) -> None:
        self.config = config or H2Config.from_limits(limits)
        if bridge_dir is not None:
            bridge_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(bridge_dir, 0o700)
            self._dir, self._owns_dir = bridge_dir, False
        else:
            self._dir, self._owns_dir = Path(tempfile.mkdtemp(prefix="tm-h2-")), True
        self._material = TlsMaterial(svid, bundles, self._dir)
        self._generation = 0
        self._pool: dict[_Key, list[H2Connection]] = {}
        self._generations: dict[H2Connection, int] = {}
        self._dials: dict[tuple[_Key, int], asyncio.Task[H2Connection]] = {}
        self._serials: dict[_Key, list[str]] = {}
        self._errors: dict[_Key, PeerAuthenticationError] = {}
        self._servers: list[asyncio.Server] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conns: set[H2Connection] = set()
        self._deadlines: Deadlines | None = None  # made on the loop of the first call

    # -- Engine ---------------------------------------------------------------------------

    async def start(
        self,
        *,
        inbound_address: str,
        outbound_address: str,
        inbound_router: CallRouter,
        outbound_router: CallRouter,
    ) -> tuple[str, str]:
        loop = self._loop = asyncio.get_running_loop()
        in_host, in_port = _split(inbound_address)
        out_host, out_port = _split(outbound_address)
        inbound = await loop.create_server(
            lambda: self._server_connection(inbound_router, peer_chain_of=verified_chain),
            in_host,
            in_port,
            reuse_address=True,
            ssl=acceptor(lambda: self._material.server),
            ssl_handshake_timeout=self.config.handshake_timeout_s,
        )
        outbound = await loop.create_server(
            lambda: self._server_connection(outbound_router),
            out_host,
            out_port,
            reuse_address=True,
        )
        self._servers = [inbound, outbound]
        return _bound(inbound_address, inbound), _bound(outbound_address, outbound)

    def update_credentials(self, svid: X509Svid, bundles: BundleSet) -> None:
        self._material = TlsMaterial(svid, bundles, self._dir)
        self._generation += 1  # pooled peer connections of older generations retire

    def peer_serials(self, upstream: Upstream) -> list[str]:
        return list(self._serials.get((upstream.address, upstream.expected_id), ()))

    def explain(self, upstream: Upstream) -> tuple[Code, str] | None:
        err = self._errors.get((upstream.address, upstream.expected_id))
        return None if err is None else (err.code, err.details())

    async def stop(self, grace: float) -> None:
        for server in self._servers:
            server.close()
        for conn in list(self._conns):
            conn.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._conns and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self._conns):
            conn.abort()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers = []
        await asyncio.sleep(0)  # let connection_lost callbacks run
        if self._owns_dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    # -- accepting ----------------------------------------------------------------------------

    def _server_connection(
        self,
        router: CallRouter,
        peer_chain_of: Callable[[asyncio.BaseTransport], tuple[bytes, ...]] | None = None,
    ) -> H2Connection:
        conn = H2Connection(
            self.config,
            client=False,
            on_request=functools.partial(self._on_request, router),
            on_closed=self._forget,
            peer_chain_of=peer_chain_of,
            # Tracked from connection_made on: a handshake that fails never gets there.
            on_open=self._conns.add,
        )
        return conn

    def _forget(self, conn: H2Connection) -> None:
        self._conns.discard(conn)
        self._generations.pop(conn, None)
        for key, conns in list(self._pool.items()):
            if conn in conns:
                conns.remove(conn)
                if not conns:
                    del self._pool[key]

    def _on_request(
        self,
        router: CallRouter,
        conn: H2Connection,
        stream: Stream,
        raw: RawHeaders,
        size: int,
        end: bool,
    ) -> None:
        cfg = self.config
        if size > cfg.max_header_list_bytes:
            reject(
                stream,
                Code.RESOURCE_EXHAUSTED,
                format_details(
                    "limit_exceeded",
                    f"header list of {size} bytes exceeds the limit of {cfg.max_header_list_bytes}",
                ),
            )
            return
        try:
            req = wire.parse_request(raw)
        except wire.Malformed as e:
            reject(stream, Code.INTERNAL, format_details("malformed_request", str(e)))
            return
        # (method, headers, peer_address, peer_chain, time_remaining), positionally: per call
        start = CallStart(req.path, req.metadata, conn.peer_address, conn.peer_chain, req.timeout)
        control = Control()
        try:
            verdict = router.route(start, control)
        except Exception:
            log.exception("router failed on %s", req.path[:128])
            reject(stream, Code.INTERNAL, format_details("internal", "routing failed"))
            return
        if isinstance(verdict, Reject):
            reject(stream, verdict.code, verdict.details)
            return
        if not req.forwardable:  # the router's check, made again here (`forwardable_path`)
            details = format_details("malformed_request", f"illegal :path {req.path[:128]!r}")
            reject(stream, Code.INTERNAL, details)
            verdict.observer.finished(Code.INTERNAL, details)
            return
        call = Call(
            stream,
            req,
            verdict,
            connect=self._connect,
            deadlines=self._deadlines_of(conn),
            scheme=b"http" if verdict.upstream.expected_id is None else b"https",
            max_message_bytes=cfg.max_message_bytes,
            max_header_bytes=cfg.max_header_list_bytes,
            retry_buffer_bytes=cfg.retry_buffer_bytes,
            max_attempts=cfg.max_attempts,
            control=control,
        )
        if control.status is not None:
            call.abort(*control.status)
            return
        call.start()

    def _deadlines_of(self, conn: H2Connection) -> Deadlines:
        deadlines = self._deadlines
        if deadlines is None:
            deadlines = self._deadlines = Deadlines(conn.loop)
        return deadlines

    # -- upstreams ----------------------------------------------------------------------------

    def _connect(self, fwd: Forward) -> H2Connection | Awaitable[H2Connection]:
        """A pooled connection that can take a new stream, or a dial in progress."""
        up = fwd.upstream
        key = (up.address, up.expected_id)
        generation = self._generation if up.expected_id is not None else 0
        # The loop from start(): on CPython 3.11 every get_running_loop() is a getpid()
        # system call (its fork check), and this runs per call.
        loop = self._loop or asyncio.get_running_loop()
        oldest = loop.time() - self.config.max_connection_age_s
        conns = self._pool.get(key)
        if conns:
            generations = self._generations
            stale: list[H2Connection] = []
            found = None
            for conn in conns:
                if generations.get(conn) != generation or conn.created < oldest:
                    stale.append(conn)
                elif conn.can_open:
                    found = conn
                    break
            for conn in stale:
                conns.remove(conn)
                conn.drain()  # closes once its calls are done
            if found is not None:
                return found
        dial_key = (key, generation)
        task = self._dials.get(dial_key)
        if task is None:
            task = loop.create_task(self._dial(up, key, generation))
            self._dials[dial_key] = task
            task.add_done_callback(functools.partial(self._dialled, dial_key))
        return asyncio.shield(task)

    def _dialled(self, dial_key: tuple[_Key, int], task: asyncio.Task[H2Connection]) -> None:
        self._dials.pop(dial_key, None)
        if not task.cancelled():
            task.exception()  # retrieved here: each waiting call gets it through shield()

    async def _dial(self, up: Upstream, key: _Key, generation: int) -> H2Connection:
        host, port = _split(up.address)
        loop = asyncio.get_running_loop()
        ctx: ssl.SSLContext | None = None
        verify = None
        if up.expected_id is not None:
            expected = up.expected_id
            try:
                ctx = self._material.client(expected)
            except PeerAuthenticationError as e:
                self._errors[key] = e
                raise

            def verify(transport: asyncio.BaseTransport) -> None:
                try:
                    leaf = check_server(transport, expected, up.address)
                except PeerAuthenticationError as e:
                    log.warning("refused peer: %s", e.message)
                    self._errors[key] = e
                    raise
                serials = self._serials.setdefault(key, [])
                serial = format(leaf.serial_number, "x")
                if not serials or serials[-1] != serial:
                    serials.append(serial)
                    del serials[:-32]

        conn = H2Connection(self.config, client=True, on_closed=self._forget, verify=verify)
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: conn,
                    host,
                    port,
                    ssl=ctx,
                    server_hostname=None if ctx is None or _is_ip(host) else host,
                    ssl_handshake_timeout=None if ctx is None else self.config.handshake_timeout_s,
                ),
                self.config.handshake_timeout_s,
            )
        except ssl.SSLError as e:
            err = PeerAuthenticationError(
                f"TLS handshake with {up.address} failed: {e.reason or e}",
                reason="peer_unauthenticated",
            )
            self._errors[key] = err
            raise err from e
        except (OSError, TimeoutError) as e:
            raise ConnectionError(f"cannot connect to {up.address}: {e}") from e
        await conn.ready  # raises what `verify` refused
        # No stream opens before the peer's SETTINGS: its MAX_CONCURRENT_STREAMS bounds
        # the calls that share this connection (the others wait: `Call`).
        try:
            await asyncio.wait_for(asyncio.shield(conn.settled), self.config.preface_timeout_s)
        except TimeoutError as e:
            conn.abort()
            raise ConnectionError(f"{up.address} sent no HTTP/2 SETTINGS") from e
        self._errors.pop(key, None)
        self._conns.add(conn)
        self._generations[conn] = generation
        self._pool.setdefault(key, []).append(conn)
        return conn


def _bound(address: str, server: asyncio.Server) -> str:
    port = server.sockets[0].getsockname()[1]
    return f"{address.rpartition(':')[0]}:{port}"


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
