"""The h2 engine's frame layer: named cases, then fuzzing (hypothesis).

* `FrameDecoder.feed` returns events or raises `ProtocolError`, for any bytes, split
  anywhere; valid streams decode the same whole or byte by byte.
* `H2Connection.data_received` (over an in-memory transport) never lets an exception
  out and never answers garbage with INTERNAL_ERROR: every refusal is a protocol
  error with its own code.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator

import hpack
import pytest
from h2_memory import MemoryTransport
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trustmesh.errors import Code
from trustmesh_sidecar.h2 import frames as f
from trustmesh_sidecar.h2.call import reject
from trustmesh_sidecar.h2.config import H2Config
from trustmesh_sidecar.h2.connection import H2Connection
from trustmesh_sidecar.h2.frames import ErrorCode, FrameDecoder, ProtocolError
from trustmesh_sidecar.h2.hpack_cache import RawHeaders
from trustmesh_sidecar.h2.streams import Stream

E = ErrorCode


def frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes([ftype, flags])
        + stream.to_bytes(4, "big")
        + payload
    )


def settings_payload(*pairs: tuple[int, int]) -> bytes:
    return b"".join(struct.pack(">HL", k, v) for k, v in pairs)


def decode(data: bytes, *, preface: bool = False, **kw: int) -> list[f.Event]:
    return FrameDecoder(expect_preface=preface, **kw).feed(data)


# -- named cases ----------------------------------------------------------------------------

ERRORS = {
    "bad-preface": (b"PRI * HTTP/1.1\r\n", {"preface": True}, E.PROTOCOL_ERROR),
    "oversized-frame": (frame(f.DATA, 0, 1, bytes(16385)), {}, E.FRAME_SIZE_ERROR),
    "data-on-stream-0": (frame(f.DATA, 0, 0, b"x"), {}, E.PROTOCOL_ERROR),
    "headers-on-stream-0": (frame(f.HEADERS, 4, 0, b"\x82"), {}, E.PROTOCOL_ERROR),
    "padding-too-long": (frame(f.DATA, 0x8, 1, b"\x05abc"), {}, E.PROTOCOL_ERROR),
    "padded-without-length": (frame(f.DATA, 0x8, 1, b""), {}, E.FRAME_SIZE_ERROR),
    "continuation-alone": (frame(f.CONTINUATION, 4, 1, b"\x82"), {}, E.PROTOCOL_ERROR),
    "interleaved-block": (
        frame(f.HEADERS, 0, 1, b"\x82") + frame(f.DATA, 0, 1, b"x"),
        {},
        E.PROTOCOL_ERROR,
    ),
    "continuation-other-stream": (
        frame(f.HEADERS, 0, 1, b"\x82") + frame(f.CONTINUATION, 4, 3, b"\x84"),
        {},
        E.PROTOCOL_ERROR,
    ),
    "continuation-flood": (
        frame(f.HEADERS, 0, 1, b"\x82") + frame(f.CONTINUATION, 0, 1) * 40,
        {},
        E.ENHANCE_YOUR_CALM,
    ),
    "block-too-large": (
        frame(f.HEADERS, 0, 1, bytes(9000)) + frame(f.CONTINUATION, 0, 1, bytes(9000)),
        {"max_block_bytes": 16384},
        E.ENHANCE_YOUR_CALM,
    ),
    "settings-length": (frame(f.SETTINGS, 0, 0, b"\x00\x01\x00"), {}, E.FRAME_SIZE_ERROR),
    "settings-ack-payload": (frame(f.SETTINGS, 1, 0, bytes(6)), {}, E.FRAME_SIZE_ERROR),
    "settings-on-stream": (frame(f.SETTINGS, 0, 1), {}, E.PROTOCOL_ERROR),
    "enable-push-2": (frame(f.SETTINGS, 0, 0, settings_payload((2, 2))), {}, E.PROTOCOL_ERROR),
    "window-too-large": (
        frame(f.SETTINGS, 0, 0, settings_payload((4, 2**31))),
        {},
        E.FLOW_CONTROL_ERROR,
    ),
    "max-frame-too-small": (
        frame(f.SETTINGS, 0, 0, settings_payload((5, 100))),
        {},
        E.PROTOCOL_ERROR,
    ),
    "ping-length": (frame(f.PING, 0, 0, bytes(7)), {}, E.FRAME_SIZE_ERROR),
    "ping-on-stream": (frame(f.PING, 0, 1, bytes(8)), {}, E.PROTOCOL_ERROR),
    "rst-on-stream-0": (frame(f.RST_STREAM, 0, 0, bytes(4)), {}, E.PROTOCOL_ERROR),
    "rst-length": (frame(f.RST_STREAM, 0, 1, bytes(3)), {}, E.FRAME_SIZE_ERROR),
    "window-update-length": (frame(f.WINDOW_UPDATE, 0, 0, bytes(5)), {}, E.FRAME_SIZE_ERROR),
    "goaway-short": (frame(f.GOAWAY, 0, 0, bytes(7)), {}, E.FRAME_SIZE_ERROR),
    "push-promise": (frame(f.PUSH_PROMISE, 4, 1, bytes(8)), {}, E.PROTOCOL_ERROR),
    "priority-on-stream-0": (frame(f.PRIORITY, 0, 0, bytes(5)), {}, E.PROTOCOL_ERROR),
}


@pytest.mark.parametrize(("data", "kw", "code"), ERRORS.values(), ids=ERRORS.keys())
def test_connection_errors(data: bytes, kw: dict[str, int], code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as err:
        decode(data, **kw)
    assert err.value.code == code


EVENTS = {
    "preface-then-settings": (
        f.PREFACE + frame(f.SETTINGS, 0, 0, settings_payload((4, 1000))),
        True,
        [f.SettingsFrame(False, ((4, 1000),))],
    ),
    "padded-data-counts-padding": (
        frame(f.DATA, 0x8 | 0x1, 1, b"\x03abc\x00\x00\x00"),
        False,
        [f.DataFrame(1, b"abc", True, 7)],
    ),
    "headers-with-continuations": (
        frame(f.HEADERS, 0x1, 1, b"\x82")
        + frame(f.CONTINUATION, 0, 1, b"\x84")
        + frame(f.CONTINUATION, 4, 1, b"\x86"),
        False,
        [f.HeaderBlock(1, b"\x82\x84\x86", True)],
    ),
    "headers-padded-with-priority": (
        frame(f.HEADERS, 0x4 | 0x8 | 0x20, 3, b"\x02" + bytes(5) + b"\x82" + b"\x00\x00"),
        False,
        [f.HeaderBlock(3, b"\x82", False)],
    ),
    "priority-self-dependent": (
        frame(f.PRIORITY, 0, 5, b"\x00\x00\x00\x05\x10"),
        False,
        [f.StreamError(5, E.PROTOCOL_ERROR)],
    ),
    "priority-bad-length": (
        frame(f.PRIORITY, 0, 5, b"\x00"),
        False,
        [f.StreamError(5, E.FRAME_SIZE_ERROR)],
    ),
    "unknown-type-ignored": (frame(0x42, 0xFF, 9, b"junk"), False, [f.IgnoredFrame(0x42, 9)]),
    "reserved-bit-masked": (
        frame(f.WINDOW_UPDATE, 0, 0x80000001, b"\x80\x00\x00\x10"),
        False,
        [f.WindowUpdateFrame(1, 16)],
    ),
    "goaway-debug": (
        frame(f.GOAWAY, 0, 0, struct.pack(">LL", 7, 11) + b"calm"),
        False,
        [f.GoAwayFrame(7, 11, b"calm")],
    ),
}


@pytest.mark.parametrize(("data", "preface", "events"), EVENTS.values(), ids=EVENTS.keys())
def test_events(data: bytes, preface: bool, events: list[f.Event]) -> None:
    assert decode(data, preface=preface) == events
    # The same bytes one at a time: nothing depends on how reads are split.
    dec = FrameDecoder(expect_preface=preface)
    assert [e for i in range(len(data)) for e in dec.feed(data[i : i + 1])] == events


def test_encoders_round_trip() -> None:
    block = bytes(range(256)) * 100  # needs CONTINUATION frames at the default size
    wire = (
        f.settings_frame({f.Setting.INITIAL_WINDOW_SIZE: 5})
        + f.headers_frames(1, block, True, 16384)
        + f.data_frame(1, b"body", True)
        + f.window_update_frame(0, 99)
        + f.rst_frame(3, E.CANCEL)
        + f.ping_frame(b"12345678", ack=True)
        + f.goaway_frame(9, E.NO_ERROR, b"bye")
    )
    assert decode(wire, max_block_bytes=1 << 20) == [
        f.SettingsFrame(False, ((4, 5),)),
        f.HeaderBlock(1, block, True),
        f.DataFrame(1, b"body", True, 4),
        f.WindowUpdateFrame(0, 99),
        f.ResetFrame(3, E.CANCEL),
        f.PingFrame(True, b"12345678"),
        f.GoAwayFrame(9, 0, b"bye"),
    ]


def test_frames_are_sliced_from_any_buffer_type_and_split_points() -> None:
    wire = f.headers_frames(1, b"\x82", False, 16384) + f.data_frame(1, b"x" * 100, True)
    expected = [f.HeaderBlock(1, b"\x82", False), f.DataFrame(1, b"x" * 100, True, 100)]
    for kind in (bytes, bytearray, memoryview):
        events = decode(kind(wire))  # type: ignore[arg-type]
        assert events == expected
        assert all(type(e.data if isinstance(e, f.DataFrame) else e.block) is bytes for e in events)
    for cut in range(len(wire)):
        dec = FrameDecoder(expect_preface=False)
        assert dec.feed(wire[:cut]) + dec.feed(wire[cut:]) == expected


# -- fuzzing the decoder -------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def feed_all(dec: FrameDecoder, chunks: list[bytes]) -> list[f.Event]:
    out: list[f.Event] = []
    for chunk in chunks:
        out += dec.feed(chunk)
    return out


@FUZZ
@given(st.binary(max_size=4096), st.booleans())
def test_random_bytes_raise_only_protocol_errors(data: bytes, preface: bool) -> None:
    with _only_protocol_errors():
        decode((f.PREFACE if preface else b"") + data, preface=preface)


class _only_protocol_errors:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        return exc_type is None or issubclass(exc_type, ProtocolError)


frames_st = st.builds(
    frame,
    st.integers(0, 12),
    st.integers(0, 255),
    st.sampled_from([0, 1, 2, 3, 5, 0x7FFFFFFF, 0x80000001]),
    st.binary(max_size=64),
)


@FUZZ
@given(st.lists(frames_st, max_size=30), st.data())
def test_frame_streams_split_anywhere_decode_alike(
    frames: list[bytes], data: st.DataObject
) -> None:
    wire = f.PREFACE + b"".join(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20)))
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    try:
        whole: list[f.Event] | ErrorCode = decode(wire, preface=True)
    except ProtocolError as e:
        whole = e.code
    try:
        split: list[f.Event] | ErrorCode = feed_all(FrameDecoder(expect_preface=True), chunks)
    except ProtocolError as e:
        split = e.code
    if isinstance(whole, list) and isinstance(split, list):
        assert split == whole
    else:
        assert isinstance(whole, ErrorCode) and isinstance(split, ErrorCode)


@FUZZ
@given(st.lists(frames_st, min_size=1, max_size=20), st.integers(0, 10_000), st.integers(0, 7))
def test_bit_flipped_and_truncated_streams(frames: list[bytes], where: int, bit: int) -> None:
    wire = bytearray(f.PREFACE + b"".join(frames))
    wire[where % len(wire)] ^= 1 << bit
    with _only_protocol_errors():
        decode(bytes(wire[: max(1, where % (len(wire) + 1))]), preface=True)


# -- fuzzing a whole connection ------------------------------------------------------------


def goaways(out: bytes) -> Iterator[int]:
    i = 0
    while i + 9 <= len(out):
        length = int.from_bytes(out[i : i + 3], "big")
        if out[i + 3] == f.GOAWAY:
            yield int.from_bytes(out[i + 13 : i + 17], "big")
        i += 9 + length


class Echo:
    """A stream handler that sends every DATA frame back: exercises the send path."""

    def on_headers(self, stream: Stream, headers: RawHeaders, size: int, end: bool) -> None:
        if end:
            stream.send_headers([(b"grpc-status", b"0")], True)

    def on_data(self, stream: Stream, data: bytes, end: bool) -> None:
        stream.send_data(data, False)
        if end:
            stream.send_headers([(b"grpc-status", b"0")], True)

    def on_reset(self, stream: Stream, code: int, reason: str) -> None:
        pass


def on_request(conn: H2Connection, stream: Stream, raw: RawHeaders, size: int, end: bool) -> None:
    if stream.id % 4 == 1:
        reject(stream, Code.UNIMPLEMENTED, "no")
        return
    stream.handler = Echo()
    stream.source = stream
    stream.send_headers([(b":status", b"200")], False)
    if end:
        stream.send_headers([(b"grpc-status", b"0")], True)


ENC = hpack.Encoder()
REQUEST = ENC.encode([(":method", "POST"), (":path", "/a.B/C"), (":scheme", "http")])

conn_frames_st = st.one_of(
    frames_st,
    st.builds(
        lambda s, e: frame(f.HEADERS, 4 | e, s, REQUEST),
        st.sampled_from([1, 3, 5, 7]),
        st.sampled_from([0, 1]),
    ),
    st.builds(
        lambda s, n, e: frame(f.DATA, e, s, bytes(n)),
        st.sampled_from([1, 3, 5, 7]),
        st.integers(0, 300),
        st.sampled_from([0, 1]),
    ),
    st.builds(
        lambda s, n: frame(f.WINDOW_UPDATE, 0, s, n.to_bytes(4, "big")),
        st.sampled_from([0, 1, 3]),
        st.integers(0, 2**31 - 1),
    ),
    st.builds(lambda s: frame(f.RST_STREAM, 0, s, bytes(4)), st.sampled_from([1, 3, 5])),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(conn_frames_st, max_size=40), st.integers(1, 64))
def test_connection_survives_any_frames(frames: list[bytes], chunk: int) -> None:
    async def run() -> None:
        conn = H2Connection(H2Config(max_concurrent_streams=3), client=False, on_request=on_request)
        transport = MemoryTransport()
        conn.connection_made(transport)
        wire = f.PREFACE + frame(f.SETTINGS, 0, 0) + b"".join(frames)
        for i in range(0, len(wire), chunk):
            conn.data_received(wire[i : i + chunk])  # must never raise
        await asyncio.sleep(0)
        assert E.INTERNAL_ERROR not in list(goaways(bytes(transport.out)))
        conn.connection_lost(None)

    asyncio.run(run())
