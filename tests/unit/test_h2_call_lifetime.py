"""A forwarded call is freed when it ends, by reference counting alone.

Routers keep the control of an open call (the inbound router does, to abort it on
revocation), and the observer they hand back is kept by the call: unless the engine
unlinks the control from the call when it ends, each call is a reference cycle that
only the cyclic collector frees. In a sidecar that was ~15 objects of garbage per call
and a gen-0 collection every ~60 calls, each a pause of 0.2-0.35 ms on a call.

One engine on in-memory transports (the agent's connection and a pooled upstream
one), a router whose observer keeps its control, and every way a call ends; with the
collector off, nothing of an ended call may be left for it. The same harness checks
that a path this router lets through (it forwards everything) still never goes
upstream unless it is one the engine would put on the wire.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import hpack
import pytest
from h2_memory import MemoryTransport

from trustmesh.errors import Code
from trustmesh_sidecar.engine import CallControl, CallStart, Forward, Headers, Upstream
from trustmesh_sidecar.h2 import H2Engine
from trustmesh_sidecar.h2 import frames as f
from trustmesh_sidecar.h2.call import Call, Control
from trustmesh_sidecar.h2.connection import H2Connection
from trustmesh_sidecar.h2.frames import ErrorCode
from trustmesh_sidecar.h2.streams import Stream

from certs import bundles, issue, make_ca

APP = "127.0.0.1:1"  # never dialled: the pool holds a connection to it
BODY = b"\x00" + (16).to_bytes(4, "big") + b"x" * 16


class Observer:
    """Keeps the call's control, as the inbound router's open-call entry does."""

    def __init__(self, control: CallControl) -> None:
        self.control = control
        self.ended: list[Code] = []

    def response_headers(self, headers: Headers) -> Headers:
        return headers

    def finished(self, code: Code, details: str) -> None:
        self.ended.append(code)


class Router:
    def __init__(self) -> None:
        self.observers: list[Observer] = []

    def route(self, call: CallStart, control: CallControl) -> Forward:
        observer = Observer(control)
        self.observers.append(observer)
        return Forward(Upstream(APP, None), (), observer)


@dataclass
class Mesh:
    down: H2Connection  # the agent's connection to the engine
    up: H2Connection  # the engine's pooled connection to the app
    router: Router
    agent: hpack.Encoder
    app: hpack.Encoder

    def request(self, timeout: str = "5S", path: str = "/test.Echo/Unary") -> None:
        block = self.agent.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "127.0.0.1:15001"),
                ("grpc-timeout", timeout),
                ("te", "trailers"),
                ("content-type", "application/grpc"),
            ]
        )
        self.down.data_received(
            f.headers_frames(1, block, False, 16384) + f.data_frame(1, BODY, True)
        )

    def upstream_stream(self) -> int:
        (sid,) = self.up.streams
        return sid

    def respond(self, *, trailers_only: bool = False) -> None:
        sid = self.upstream_stream()
        status = [(":status", "200"), ("content-type", "application/grpc")]
        if trailers_only:
            block = self.app.encode([*status, ("grpc-status", "5")])
            self.up.data_received(f.headers_frames(sid, block, True, 16384))
            return
        self.up.data_received(
            f.headers_frames(sid, self.app.encode(status), False, 16384)
            + f.data_frame(sid, BODY, False)
            + f.headers_frames(sid, self.app.encode([("grpc-status", "0")]), True, 16384)
        )


def engine() -> H2Engine:
    ca = make_ca()
    return H2Engine(issue(ca, "spiffe://example.org/agents/alice"), bundles(ca))


def mesh(eng: H2Engine, router: Router) -> Mesh:
    # White-box, as bench/engine_warm.py: the engine's private parts stand in for its
    # listener and its dialler.
    eng._loop = asyncio.get_running_loop()
    down = eng._server_connection(router)
    down.connection_made(MemoryTransport())
    down.data_received(f.PREFACE + f.settings_frame({}) + f.settings_frame(ack=True))
    up = H2Connection(eng.config, client=True)
    up.connection_made(MemoryTransport())
    up.data_received(f.settings_frame({}) + f.settings_frame(ack=True))
    eng._pool[(APP, None)] = [up]
    eng._generations[up] = 0
    return Mesh(down, up, router, hpack.Encoder(), hpack.Encoder())


def answered(m: Mesh) -> None:
    m.respond()


def answered_trailers_only(m: Mesh) -> None:
    m.respond(trailers_only=True)


def upstream_reset(m: Mesh) -> None:
    m.up.data_received(f.rst_frame(m.upstream_stream(), ErrorCode.INTERNAL_ERROR))


def caller_cancelled(m: Mesh) -> None:
    m.down.data_received(f.rst_frame(1, ErrorCode.CANCEL))


def revoked(m: Mesh) -> None:
    m.router.observers[-1].control.abort(Code.PERMISSION_DENIED, "revoked")


def upstream_connection_lost(m: Mesh) -> None:
    m.up.connection_lost(None)


ENDINGS: list[tuple[str, Callable[[Mesh], None], Code]] = [
    ("answered", answered, Code.OK),
    ("answered-trailers-only", answered_trailers_only, Code.NOT_FOUND),
    ("upstream-reset", upstream_reset, Code.INTERNAL),
    ("caller-cancelled", caller_cancelled, Code.CANCELLED),
    ("revoked", revoked, Code.PERMISSION_DENIED),
    ("upstream-connection-lost", upstream_connection_lost, Code.UNAVAILABLE),
]


@pytest.fixture
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds stays in gc.garbage
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def left_for_the_collector() -> list[str]:
    gc.garbage.clear()
    gc.collect()
    kinds = (Call, Control, Stream, Observer, Forward)
    return sorted({type(o).__name__ for o in gc.garbage if isinstance(o, kinds)})


@pytest.mark.parametrize(("name", "end", "code"), ENDINGS, ids=[e[0] for e in ENDINGS])
async def test_an_ended_call_is_freed_without_the_cyclic_collector(
    collector_off: None, name: str, end: Callable[[Mesh], None], code: Code
) -> None:
    m = mesh(engine(), Router())
    m.request()
    end(m)
    assert [o.ended for o in m.router.observers] == [[code]], name  # it did end, once
    assert not m.down.streams
    m.router.observers.clear()  # the router forgets the ended call, as routers do
    assert left_for_the_collector() == []


async def test_a_call_past_its_deadline_is_freed_too(collector_off: None) -> None:
    m = mesh(engine(), Router())
    m.request(timeout="10m")
    await asyncio.sleep(0.2)  # the deadline slot's timer has fired
    assert [o.ended for o in m.router.observers] == [[Code.DEADLINE_EXCEEDED]]
    m.router.observers.clear()
    assert left_for_the_collector() == []


async def test_an_open_call_can_still_be_aborted_through_its_control(
    collector_off: None,
) -> None:
    m = mesh(engine(), Router())
    m.request()
    control = m.router.observers[-1].control
    assert isinstance(control, Control) and control.call is not None  # linked while open
    control.abort(Code.PERMISSION_DENIED, "revoked")
    assert control.call is None  # unlinked once ended: a late abort reaches nothing
    control.abort(Code.UNAVAILABLE, "too late")
    assert m.router.observers[-1].ended == [Code.PERMISSION_DENIED]


@pytest.mark.parametrize(
    "path", ["/a B/C", "/a.B/C\n", "a.B/C"], ids=["space", "newline", "relative"]
)
async def test_a_path_the_router_let_through_is_not_forwarded(path: str) -> None:
    m = mesh(engine(), Router())
    m.request(path=path)
    assert not m.up.streams  # nothing opened upstream
    assert [o.ended for o in m.router.observers] == [[Code.INTERNAL]]
    transport = m.down.transport
    assert isinstance(transport, MemoryTransport)
    blocks = [
        ev.block
        for ev in f.FrameDecoder(expect_preface=False).feed(bytes(transport.out))
        if isinstance(ev, f.HeaderBlock)
    ]
    fields = dict(hpack.Decoder().decode(blocks[-1], raw=True))
    assert fields[b"grpc-status"] == b"13"
    assert b"malformed_request" in fields[b"grpc-message"]
    assert b"illegal :path" in fields[b"grpc-message"]
