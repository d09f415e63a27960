"""H2Engine towards an upstream that refuses, limits or stalls: real sockets on loopback.

A grpcio client calls the engine's outbound listener; a stub router forwards every
call to a fake app, an `H2Connection` in the server role whose request handler each
test scripts. Covered here (ADR 0009's former known gaps):

* a stream the upstream never processed (RST_STREAM REFUSED_STREAM, or above a
  GOAWAY's last stream id) is retried on a new stream with the same request bytes;
  a stream it may have processed, or one too large to replay, is not;
* calls waiting on one dial never exceed the peer's SETTINGS_MAX_CONCURRENT_STREAMS;
* a peer that never sends SETTINGS fails the dial.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from trustmesh.errors import Code
from trustmesh_sidecar.engine import CallControl, CallStart, Forward, Headers, Upstream
from trustmesh_sidecar.h2 import H2Config, H2Engine
from trustmesh_sidecar.h2 import frames as f
from trustmesh_sidecar.h2.connection import H2Connection
from trustmesh_sidecar.h2.frames import ErrorCode
from trustmesh_sidecar.h2.hpack_cache import RawHeaders
from trustmesh_sidecar.h2.streams import Stream

from certs import bundles, issue, make_ca

WAIT = 5.0
METHOD = "/test.Echo/Unary"


# -- the fake app --------------------------------------------------------------------------


@dataclass
class Request:
    conn: int  # which app connection (0, 1, ...)
    stream: int
    body: bytearray = field(default_factory=bytearray)


class Echo:
    """Answers a request with its own body once it has all of it."""

    def __init__(self, request: Request, delay: float) -> None:
        self.request, self.delay = request, delay

    def on_headers(self, stream: Stream, headers: RawHeaders, size: int, end: bool) -> None:
        if end:
            self._answer(stream)

    def on_data(self, stream: Stream, data: bytes, end: bool) -> None:
        self.request.body += data
        stream.conn.credit(stream, len(data))
        if end:
            asyncio.get_running_loop().call_later(self.delay, self._answer, stream)

    def _answer(self, stream: Stream) -> None:
        stream.send_headers([(b":status", b"200"), (b"content-type", b"application/grpc")], False)
        stream.send_data(bytes(self.request.body), False)
        stream.send_headers([(b"grpc-status", b"0")], True)

    def on_reset(self, stream: Stream, code: int, reason: str) -> None:
        pass


# What the app does with a request: `refuse(app, conn, stream, request)` returns True
# when it refused it (the stream then gets no answer).
Refuse = Callable[["App", H2Connection, Stream, Request], bool]


class CountingConnection(H2Connection):
    """Counts every HEADERS block it receives, refused streams included."""

    def __init__(self, app: App) -> None:
        super().__init__(app.config, client=False, on_request=app.on_request)
        self.app = app

    def _on_headers(self, ev: f.HeaderBlock) -> None:
        if ev.stream_id % 2 == 1 and ev.stream_id not in self.streams:
            self.app.headers_blocks += 1
        super()._on_headers(ev)


class App:
    def __init__(
        self, refuse: Refuse | None = None, *, max_streams: int = 100, delay: float = 0.0
    ) -> None:
        self.refuse = refuse
        self.config = H2Config(max_concurrent_streams=max_streams)
        self.delay = delay
        self.conns: list[H2Connection] = []
        self.requests: list[Request] = []
        self.headers_blocks = 0
        self.most_open = 0  # the most streams open at once on one connection
        self.server: asyncio.Server | None = None

    def _protocol(self) -> H2Connection:
        conn = CountingConnection(self)
        self.conns.append(conn)
        return conn

    def on_request(
        self, conn: H2Connection, stream: Stream, raw: RawHeaders, size: int, end: bool
    ) -> None:
        request = Request(self.conns.index(conn), stream.id)
        self.requests.append(request)
        self.most_open = max(self.most_open, len(conn.streams))
        if self.refuse is not None and self.refuse(self, conn, stream, request):
            return
        stream.handler = Echo(request, self.delay)
        if end:
            stream.handler.on_headers(stream, raw, size, end)

    async def start(self) -> str:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._protocol, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for conn in self.conns:
            conn.abort()


# -- the engine and its router -------------------------------------------------------------


class Observer:
    """The CallObserver of one call: records how it finished."""

    def __init__(self) -> None:
        self.ended: list[tuple[Code, str]] = []

    def response_headers(self, headers: Headers) -> Headers:
        return headers

    def finished(self, code: Code, details: str) -> None:
        self.ended.append((code, details))


@dataclass
class Router:
    app_address: str
    observers: list[Observer] = field(default_factory=list)

    def route(self, call: CallStart, control: CallControl) -> Forward:
        observer = Observer()
        self.observers.append(observer)
        return Forward(Upstream(self.app_address, None), call.headers, observer)


@contextlib.asynccontextmanager
async def engine_to(
    app_address: str, tmp_path: Path, **config: Any
) -> AsyncIterator[tuple[grpc.aio.Channel, Router]]:
    ca = make_ca()
    engine = H2Engine(
        issue(ca, "spiffe://example.org/agents/alice"),
        bundles(ca),
        bridge_dir=tmp_path / "h2",
        config=H2Config(**config),
    )
    router = Router(app_address)
    _, outbound = await engine.start(
        inbound_address="127.0.0.1:0",
        outbound_address="127.0.0.1:0",
        inbound_router=router,
        outbound_router=router,
    )
    channel = grpc.aio.insecure_channel(outbound)
    try:
        yield channel, router
    finally:
        await channel.close()
        await engine.stop(0.1)


@contextlib.asynccontextmanager
async def running(app: App) -> AsyncIterator[str]:
    address = await app.start()
    try:
        yield address
    finally:
        app.stop()


async def call(channel: grpc.aio.Channel, body: bytes) -> bytes:
    return bytes(await channel.unary_unary(METHOD)(body, timeout=WAIT))


def status(router: Router) -> list[Code]:
    return [code for o in router.observers for code, _ in o.ended]


# -- refusals -------------------------------------------------------------------------------


def goaway_below(app: App, conn: H2Connection, stream: Stream, request: Request) -> bool:
    """The first connection answers its first stream with GOAWAY(last_stream_id=0)."""
    if request.conn == 0:
        conn._goaway_last = 0  # the final GOAWAY names no stream
        conn.close(ErrorCode.NO_ERROR, "going away")
        return True
    return False


def refused_once(app: App, conn: H2Connection, stream: Stream, request: Request) -> bool:
    if len(app.requests) == 1:
        stream.reset_now(ErrorCode.REFUSED_STREAM)
        return True
    return False


def goaway_processed(app: App, conn: H2Connection, stream: Stream, request: Request) -> bool:
    """GOAWAY naming this very stream as possibly processed, then the connection ends."""
    conn.close(ErrorCode.NO_ERROR, "going away")
    return True


def always_refused(app: App, conn: H2Connection, stream: Stream, request: Request) -> bool:
    stream.reset_now(ErrorCode.REFUSED_STREAM)
    return True


PAYLOAD = bytes(range(256)) * 11 + b"tail" * 6
BODY = b"\x00" + len(PAYLOAD).to_bytes(4, "big") + PAYLOAD  # the message as on the wire


@pytest.mark.parametrize(
    "refuse", [goaway_below, refused_once], ids=["goaway-last-stream-below", "rst-refused-stream"]
)
async def test_an_unprocessed_stream_is_retried_with_the_same_request(
    tmp_path: Path, refuse: Refuse
) -> None:
    app = App(refuse)
    async with running(app) as address, engine_to(address, tmp_path) as (channel, router):
        assert await call(channel, PAYLOAD) == PAYLOAD
    assert len(app.requests) == 2
    assert bytes(app.requests[1].body) == BODY  # replayed whole, prefix and all
    assert status(router) == [Code.OK]  # one call, finished once
    if refuse is goaway_below:
        assert [r.conn for r in app.requests] == [0, 1]  # on a new connection


@pytest.mark.parametrize(
    ("refuse", "requests", "config"),
    [
        (goaway_processed, 1, {}),  # the peer may have run it: never replayed
        (always_refused, 3, {}),  # max_attempts streams, then the refusal stands
        (refused_once, 1, {"retry_buffer_bytes": 1024}),  # too big to keep for a replay
    ],
    ids=["goaway-covers-the-stream", "refused-every-time", "over-the-retry-buffer"],
)
async def test_a_refusal_that_cannot_be_retried_is_unavailable(
    tmp_path: Path, refuse: Refuse, requests: int, config: dict[str, Any]
) -> None:
    app = App(refuse)
    async with running(app) as address, engine_to(address, tmp_path, **config) as (channel, router):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(channel, PAYLOAD)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        await asyncio.sleep(0.05)  # a retry, if the engine wrongly made one, would land here
    assert len(app.requests) == requests
    assert status(router) == [Code.UNAVAILABLE]


async def test_no_retry_once_the_upstream_has_answered(tmp_path: Path) -> None:
    """Response headers, then RST_STREAM(REFUSED_STREAM): the call had begun; no replay."""

    def answer_then_refuse(app: App, conn: H2Connection, stream: Stream, request: Request) -> bool:
        stream.send_headers([(b":status", b"200"), (b"content-type", b"application/grpc")], False)
        asyncio.get_running_loop().call_later(0.02, stream.reset_now, ErrorCode.REFUSED_STREAM)
        return True

    app = App(answer_then_refuse)
    async with running(app) as address, engine_to(address, tmp_path) as (channel, _):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(channel, b"ping")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        await asyncio.sleep(0.05)
    assert len(app.requests) == 1


# -- the peer's stream limit ---------------------------------------------------------------


async def test_calls_sharing_a_dial_respect_max_concurrent_streams(tmp_path: Path) -> None:
    """Eight calls start together and wait on one dial; the app allows one stream at a
    time. None is refused (every HEADERS block is a request), none fails."""
    app = App(max_streams=1, delay=0.03)
    async with running(app) as address, engine_to(address, tmp_path) as (channel, router):
        bodies = [b"call-%d" % i for i in range(8)]
        got = await asyncio.gather(*(call(channel, b) for b in bodies))
    assert got == bodies
    assert app.most_open == 1
    assert app.headers_blocks == len(app.requests) == 8  # no stream refused, none retried
    assert status(router) == [Code.OK] * 8


async def test_a_peer_that_sends_no_settings_fails_the_dial(tmp_path: Path) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads nothing, sends nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with engine_to(address, tmp_path, preface_timeout_s=0.2) as (channel, _):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(channel, b"ping")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "sent no HTTP/2 SETTINGS" in (err.value.details() or "")
    finally:
        for writer in accepted:
            writer.close()
        server.close()
    assert len(accepted) == 1
