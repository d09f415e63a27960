"""The frame-level engine (`H2Engine`, ADR 0009) against hostile peers speaking HTTP/2.

As in test_h2_engine.py, real sidecars run `H2Engine` (the `h2` fixture); the peers
here write frames by hand (with `hpack`, not the engine's own code): bad prefaces,
rapid reset, CONTINUATION floods, protocol errors, stream limits, flow control and
random frames. Each test checks the mesh still serves afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import hpack
import pytest

import trustmesh_sidecar.runtime
from trustmesh.limits import Limits
from trustmesh_sidecar.h2 import H2Engine

from h2_support import ALICE, WAIT, pair, start_nodes, still_serves
from harness import ECHO, Mesh, Node, agent, blueprint, policy, unary
from raw_peer import issue, mesh_ca

# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def h2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sidecars built from here on run the frame-level engine."""
    monkeypatch.setattr(trustmesh_sidecar.runtime, "GrpcEngine", H2Engine)


@pytest.fixture
async def trio(h2: None, mesh: Mesh) -> Mesh:
    """As conftest's trio: alice -> bob allowed on Echo; carol registered, no policy."""
    await mesh.apply(
        blueprint("any"),
        agent("alice"),
        agent("bob"),
        agent("carol"),
        policy("alice-calls-bob", ["alice"], ["bob"], ["/test.Echo/*"]),
    )
    return await start_nodes(mesh, "alice", "bob", "carol")


# -- hostile peers, HTTP/2 by hand ----------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0x0,
    0x1,
    0x3,
    0x4,
    0x6,
    0x7,
    0x8,
    0x9,
)
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
NO_ERROR, FLOW_CONTROL_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, CALM = (
    0x0,
    0x3,
    0x7,
    0x8,
    0x9,
    0xB,
)

Frame = tuple[int, int, int, bytes]


def frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes([ftype, flags])
        + stream.to_bytes(4, "big")
        + payload
    )


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


class RawPeer:
    """A client that writes frames itself; hpack (not the engine's code) does HPACK."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.enc, self.dec = hpack.Encoder(), hpack.Decoder()
        self.frames: list[Frame] = []

    def send(self, *data: bytes) -> None:
        self.writer.write(b"".join(data))

    def start(self, settings: bytes = b"") -> None:
        self.send(PREFACE, frame(SETTINGS, 0, 0, settings))

    def request(
        self,
        stream: int,
        *,
        target: str = "bob",
        method: str = f"/{ECHO}/Unary",
        extra: list[tuple[str, str]] | None = None,
        end: bool = False,
    ) -> bytes:
        block = self.enc.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", method),
                (":authority", "sidecar"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("trustmesh-target", target),
                *(extra or []),
            ]
        )
        return frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), stream, block)

    async def read(self, until: Callable[[Frame], bool], timeout: float = WAIT) -> Frame | None:
        """Frames until one matches (returned) or the server closes (None)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    head = await self.reader.readexactly(9)
                    payload = await self.reader.readexactly(int.from_bytes(head[:3], "big"))
                    got = (head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload)
                    self.frames.append(got)
                    if got[0] == SETTINGS and not got[1] & ACK:
                        self.send(frame(SETTINGS, ACK, 0))
                    if got[0] == HEADERS:
                        self.headers = dict(self.dec.decode(payload, raw=True))
                    if until(got):
                        return got
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, TimeoutError):
            return None

    def data_bytes(self, stream: int) -> int:
        return sum(len(p) for t, _, s, p in self.frames if t == DATA and s == stream)


def goaway_code(got: Frame | None) -> int | None:
    return int.from_bytes(got[3][4:8], "big") if got and got[0] == GOAWAY else None


@contextlib.asynccontextmanager
async def plain(node: Node) -> AsyncIterator[RawPeer]:
    """To `node`'s outbound listener (h2c, as the local agent)."""
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_connection(*split(node.outbound))
    try:
        yield RawPeer(reader, writer)
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def tls_as_alice(mesh: Mesh, node: Node, tmp_path: Path) -> AsyncIterator[RawPeer]:
    """To `node`'s inbound listener over mTLS with a real alice SVID, ALPN h2."""
    svid = issue(mesh_ca(mesh), ALICE)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(mesh.bundle_path))
    ctx.set_alpn_protocols(["h2"])
    (tmp_path / "a.crt").write_bytes(svid.chain_pem())
    (tmp_path / "a.key").write_bytes(svid.key_pem())
    ctx.load_cert_chain(tmp_path / "a.crt", tmp_path / "a.key")
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_connection(
            *split(node.sidecar.inbound_address), ssl=ctx
        )
    try:
        yield RawPeer(reader, writer)
    finally:
        writer.close()


def is_goaway(got: Frame) -> bool:
    return got[0] == GOAWAY


@pytest.mark.parametrize(
    ("where", "junk"),
    [
        ("outbound", b"GET / HTTP/1.1\r\nHost: alice\r\n\r\n"),
        ("outbound", bytes(range(256)) * 4),
        ("outbound", PREFACE + frame(PING, 0, 0, bytes(8))),  # first frame not SETTINGS
        ("inbound-tls", b"GET / HTTP/1.1\r\nHost: bob\r\n\r\n"),
        ("inbound-tls", PREFACE + b"\x40\x00\x00" + bytes([SETTINGS]) + bytes(5)),  # 4 MiB frame
        ("inbound-raw", b"\x16\x03\x01\x40\x00" + b"\x01" * 10),  # a ClientHello cut short
        ("inbound-raw", PREFACE + frame(SETTINGS, 0, 0)),  # plaintext h2 on the TLS port
    ],
    ids=[
        "http1",
        "random",
        "ping-first",
        "tls-http1",
        "tls-huge-frame",
        "truncated-hello",
        "plaintext-on-tls",
    ],
)
async def test_bad_preface_closes_only_that_connection(
    trio: Mesh, tmp_path: Path, where: str, junk: bytes
) -> None:
    alice, bob = trio.nodes["alice"], trio.nodes["bob"]
    if where == "inbound-raw":
        reader, writer = await asyncio.open_connection(*split(bob.sidecar.inbound_address))
        writer.write(junk)
        with contextlib.suppress(OSError):
            writer.write_eof()
        async with asyncio.timeout(WAIT):
            with contextlib.suppress(OSError):
                while await reader.read(65536):
                    pass
        writer.close()
    else:
        opener = plain(alice) if where == "outbound" else tls_as_alice(trio, bob, tmp_path)
        async with opener as peer:
            peer.send(junk)
            await peer.read(lambda f: False)  # returns once the server hangs up
            assert DATA not in [f[0] for f in peer.frames]
    assert bob.app.received == []
    await still_serves(trio)


async def test_rapid_reset_is_answered_with_enhance_your_calm(trio: Mesh) -> None:
    async with plain(trio.nodes["alice"]) as peer:
        peer.start()
        for stream in range(1, 2 * 400, 2):
            peer.send(peer.request(stream), frame(RST_STREAM, 0, stream, CANCEL.to_bytes(4, "big")))
        got = await peer.read(is_goaway)
    assert goaway_code(got) == CALM
    await still_serves(trio)


async def test_continuation_flood_is_answered_with_enhance_your_calm(trio: Mesh) -> None:
    async with plain(trio.nodes["alice"]) as peer:
        peer.start()
        peer.send(frame(HEADERS, 0, 1, peer.enc.encode([(":method", "POST")])))
        peer.send(*(frame(CONTINUATION, 0, 1, b"") for _ in range(100)))
        assert goaway_code(await peer.read(is_goaway)) == CALM
    await still_serves(trio)


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([frame(WINDOW_UPDATE, 0, 0, (2**31 - 1).to_bytes(4, "big"))], FLOW_CONTROL_ERROR),
        ([frame(HEADERS, END_HEADERS, 1, b"\xff" * 8)], COMPRESSION_ERROR),
        ([frame(DATA, 0, 7, b"x")], 0x1),  # DATA on an idle stream: PROTOCOL_ERROR
    ],
    ids=["window-overflow", "undecodable-hpack", "data-on-idle-stream"],
)
async def test_protocol_errors_close_with_goaway(
    trio: Mesh, frames: list[bytes], code: int
) -> None:
    async with plain(trio.nodes["alice"]) as peer:
        peer.start()
        peer.send(*frames)
        assert goaway_code(await peer.read(is_goaway)) == code
    await still_serves(trio)


async def test_malformed_request_gets_a_status_not_a_crash(trio: Mesh) -> None:
    async with plain(trio.nodes["alice"]) as peer:
        peer.start()
        peer.send(peer.request(1, extra=[("X-Upper", "v")], end=True))
        got = await peer.read(lambda f: f[0] == HEADERS and f[2] == 1)
        assert got is not None and got[1] & END_STREAM
        assert peer.headers[b"grpc-status"] == b"13"
        assert peer.headers[b"grpc-message"].startswith(b"trustmesh: malformed_request: illegal")
    assert trio.nodes["bob"].app.received == []
    await still_serves(trio)


async def test_concurrent_streams_beyond_the_limit_are_refused(h2: None, tmp_path: Path) -> None:
    async with pair(tmp_path, limits=Limits(max_concurrent_streams=4)) as mesh:
        async with plain(mesh.nodes["alice"]) as peer:
            peer.start()
            sleep = b"\x00\x00\x00\x00\x0210"  # a 2-byte message: "10" (seconds)
            for stream in (1, 3, 5, 7, 9):
                peer.send(
                    peer.request(stream, method=f"/{ECHO}/Sleep"),
                    frame(DATA, END_STREAM, stream, sleep),
                )
            got = await peer.read(lambda f: f[0] == RST_STREAM)
            assert got is not None and got[2] == 9
            assert int.from_bytes(got[3], "big") == REFUSED_STREAM
        await still_serves_pair(mesh)


async def still_serves_pair(mesh: Mesh) -> None:
    assert (await unary(mesh.nodes["alice"].outbound, "bob", body=b"ok", timeout=WAIT))[0] == b"ok"


async def test_never_sends_beyond_the_peer_window(trio: Mesh) -> None:
    body = b"w" * (64 * 1024)
    message = b"\x00" + len(body).to_bytes(4, "big") + body
    async with plain(trio.nodes["alice"]) as peer:
        peer.start(settings=(4).to_bytes(2, "big") + (1000).to_bytes(4, "big"))  # stream window
        peer.send(
            peer.request(1),
            *(frame(DATA, 0, 1, message[i : i + 16384]) for i in range(0, len(message), 16384)),
            frame(DATA, END_STREAM, 1),
        )
        await peer.read(lambda f: False, timeout=1.0)  # until it goes quiet
        assert peer.data_bytes(1) == 1000  # exactly the window, not a byte more
        peer.send(
            frame(WINDOW_UPDATE, 0, 1, (1 << 20).to_bytes(4, "big")),
            frame(WINDOW_UPDATE, 0, 0, (1 << 20).to_bytes(4, "big")),
        )
        got = await peer.read(lambda f: f[0] == HEADERS and bool(f[1] & END_STREAM))
        assert got is not None and peer.headers[b"grpc-status"] == b"0"
        assert peer.data_bytes(1) == len(message)


@pytest.mark.parametrize("seed", range(12))
async def test_random_frames_never_break_the_listener(trio: Mesh, seed: int) -> None:
    import random

    rng = random.Random(seed)
    async with plain(trio.nodes["alice"]) as peer:
        peer.start()
        for _ in range(40):
            payload = rng.randbytes(rng.choice([0, 1, 4, 5, 8, 9, 30]))
            peer.send(
                frame(
                    rng.randrange(0, 12),
                    rng.randrange(0, 256),
                    rng.choice([0, 1, 2, 3, 5, 2**31 - 1]),
                    payload,
                )
            )
        await peer.read(lambda f: False, timeout=1.0)
    await still_serves(trio)
