"""The forwarding engine on grpcio (grpc.aio).

Calls are forwarded as raw bytes: handlers and stubs have no (de)serializers, so a
message is never parsed. Every call kind is carried as a bidi stream, which is the
same thing on the wire. Outbound mTLS goes through `TlsBridge` so the callee's exact
SPIFFE ID is checked; inbound mTLS is grpcio's, with `dynamic_ssl_server_credentials`
so that a rotated SVID is used from the next handshake on, and a maximum connection
age so that clients re-handshake (ADR 0003, ADR 0004).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from trustmesh.errors import Code, format_details
from trustmesh.grpc_status import from_grpc, to_grpc
from trustmesh.grpc_tls import ServerCredentials, channel_options, peer_chain, server_options
from trustmesh.limits import DEFAULT_LIMITS, Limits
from trustmesh.tls_bridge import TlsBridge
from trustmesh.x509svid import BundleSet, X509Svid
from trustmesh_sidecar.engine import (
    CallRouter,
    CallStart,
    Forward,
    Headers,
    Reject,
    Upstream,
)

__all__ = ["GrpcEngine"]

log = logging.getLogger(__name__)


class _Control:
    """Lets the router end an in-flight call (revocation of an open stream)."""

    __slots__ = ("event", "status")

    def __init__(self) -> None:
        self.event: asyncio.Event | None = None
        self.status: tuple[Code, str] | None = None

    def abort(self, code: Code, details: str) -> None:
        if self.status is None:
            self.status = (code, details)
            if self.event is not None:
                self.event.set()


@dataclass
class _Channel:
    channel: grpc.aio.Channel
    generation: int


class GrpcEngine:
    def __init__(
        self,
        svid: X509Svid,
        bundles: BundleSet,
        *,
        limits: Limits = DEFAULT_LIMITS,
        bridge_dir: Path | None = None,
    ) -> None:
        self._limits = limits
        self._svid = svid
        self._bundles = bundles
        self._generation = 0
        self._server_creds = ServerCredentials(svid, bundles)
        self._bridge = TlsBridge(lambda: (self._svid, self._bundles), directory=bridge_dir)
        self._channels: dict[Upstream, _Channel] = {}
        self._servers: list[grpc.aio.Server] = []
        self._retiring: set[asyncio.Task[None]] = set()

    # -- lifecycle --------------------------------------------------------------

    async def start(
        self,
        *,
        inbound_address: str,
        outbound_address: str,
        inbound_router: CallRouter,
        outbound_router: CallRouter,
    ) -> tuple[str, str]:
        inbound = grpc.aio.server(options=server_options(self._limits, age=True))
        inbound.add_generic_rpc_handlers([_Handler(self, inbound_router, inbound=True)])
        creds = grpc.dynamic_ssl_server_credentials(
            self._server_creds.initial(),
            self._server_creds.fetch,
            require_client_authentication=True,
        )
        in_port = inbound.add_secure_port(inbound_address, creds)
        outbound = grpc.aio.server(options=server_options(self._limits, age=False))
        outbound.add_generic_rpc_handlers([_Handler(self, outbound_router, inbound=False)])
        out_port = outbound.add_insecure_port(outbound_address)
        await inbound.start()
        await outbound.start()
        self._servers = [inbound, outbound]
        return _with_port(inbound_address, in_port), _with_port(outbound_address, out_port)

    def update_credentials(self, svid: X509Svid, bundles: BundleSet) -> None:
        self._svid, self._bundles = svid, bundles
        self._server_creds.update(svid, bundles)
        self._generation += 1  # new calls to peers open new channels (new handshakes)

    def peer_serials(self, upstream: Upstream) -> list[str]:
        return self._bridge.peer_serials(upstream.address, upstream.expected_id)

    async def stop(self, grace: float) -> None:
        await asyncio.gather(*(s.stop(grace) for s in self._servers), return_exceptions=True)
        for ch in self._channels.values():
            await ch.channel.close()
        self._channels.clear()
        for t in list(self._retiring):
            t.cancel()
        await self._bridge.close()

    # -- channels -----------------------------------------------------------------

    async def channel(self, upstream: Upstream) -> grpc.aio.Channel:
        held = self._channels.get(upstream)
        if held is not None and (
            upstream.expected_id is None or held.generation == self._generation
        ):
            return held.channel
        if upstream.expected_id is None:
            target = upstream.address
        else:
            target = await self._bridge.target(upstream.address, upstream.expected_id)
        channel = grpc.aio.insecure_channel(target, options=channel_options(self._limits))
        if held is not None:
            self._retire(held.channel)
        self._channels[upstream] = _Channel(channel, self._generation)
        return channel

    def _retire(self, channel: grpc.aio.Channel) -> None:
        """Close a channel of an old credential generation once its calls are done."""

        async def close() -> None:
            await channel.close(grace=self._limits.max_connection_age_grace_s)

        task = asyncio.get_running_loop().create_task(close())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def explain(self, upstream: Upstream) -> tuple[Code, str] | None:
        err = self._bridge.last_error(upstream.address, upstream.expected_id)
        if err is None:
            return None
        return err.code, err.details()


def _with_port(address: str, port: int) -> str:
    host = address.rpartition(":")[0]
    return f"{host}:{port}"


class _Handler(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, engine: GrpcEngine, router: CallRouter, *, inbound: bool) -> None:
        self._engine = engine
        self._router = router
        self._inbound = inbound

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method

        async def handle(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
            await _forward(self._engine, self._router, self._inbound, method, requests, context)

        return grpc.stream_stream_rpc_method_handler(handle)


async def _forward(
    engine: GrpcEngine,
    router: CallRouter,
    inbound: bool,
    method: str,
    requests: AsyncIterator[bytes],
    context: grpc.aio.ServicerContext,
) -> None:
    try:
        chain = peer_chain(context) if inbound else ()
    except ValueError:
        chain = ()
    start = CallStart(
        method=method,
        headers=tuple(context.invocation_metadata() or ()),
        peer_address=context.peer(),
        peer_chain=chain,
        time_remaining=context.time_remaining(),
    )
    if context.cancelled():
        # grpc core hands over a call whose header list broke the limit (truncated)
        # and cancels it right away: don't decide, audit or forward such a call.
        return
    control = _Control()
    verdict = router.route(start, control)
    if isinstance(verdict, Reject):
        await context.abort(to_grpc(verdict.code), verdict.details)
        return
    await _pump(engine, verdict, method, start, requests, context, control)


async def _pump(
    engine: GrpcEngine,
    fwd: Forward,
    method: str,
    start: CallStart,
    requests: AsyncIterator[bytes],
    context: grpc.aio.ServicerContext,
    control: _Control,
) -> None:
    observer = fwd.observer
    try:
        channel = await engine.channel(fwd.upstream)
        call = channel.stream_stream(method)(
            requests, metadata=_metadata(fwd.headers), timeout=start.time_remaining
        )
    except Exception as e:  # e.g. the bridge socket could not be created
        log.error("cannot open a call to %s: %s", fwd.upstream.address, e)
        details = format_details("upstream_unavailable", f"cannot reach {fwd.upstream.address}")
        observer.finished(Code.UNAVAILABLE, details)
        await context.abort(to_grpc(Code.UNAVAILABLE), details)
        return
    control.event = asyncio.Event()
    if control.status is not None:
        control.event.set()

    async def relay() -> tuple[Code, str, Sequence[tuple[str, Any]]]:
        try:
            initial = await call.initial_metadata()
            if initial:
                await context.send_initial_metadata(observer.response_headers(tuple(initial)))
            async for message in call:
                await context.write(message)
            return (
                from_grpc(await call.code()),
                await call.details() or "",
                await call.trailing_metadata() or (),
            )
        except grpc.aio.AioRpcError as e:
            return from_grpc(e.code()), e.details() or "", e.trailing_metadata() or ()

    relay_task = asyncio.ensure_future(relay())
    abort_task = asyncio.ensure_future(control.event.wait())
    status: tuple[Code, str] | None = None
    try:
        done, _ = await asyncio.wait({relay_task, abort_task}, return_when=asyncio.FIRST_COMPLETED)
        if relay_task in done:
            code, details, trailing = relay_task.result()
            if code is Code.UNAVAILABLE and fwd.explain_unavailable is not None:
                explained = fwd.explain_unavailable()
                if explained is not None:
                    code, details = explained
            status = (code, details)
            context.set_trailing_metadata(tuple(observer.response_headers(tuple(trailing))))
            if code is not Code.OK:
                context.set_code(to_grpc(code))
                context.set_details(details)
            return
        assert control.status is not None
        call.cancel()
        relay_task.cancel()
        status = control.status
        await context.abort(to_grpc(status[0]), status[1])
    except asyncio.CancelledError:
        call.cancel()
        status = (Code.CANCELLED, "cancelled by the caller")
        raise
    finally:
        abort_task.cancel()
        if not relay_task.done():
            relay_task.cancel()
        if status is None:
            status = (Code.INTERNAL, format_details("internal", "forwarding failed"))
        with contextlib.suppress(Exception):
            observer.finished(*status)


def _metadata(headers: Headers) -> tuple[tuple[str, str | bytes], ...]:
    return headers
