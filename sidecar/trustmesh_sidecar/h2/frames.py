"""HTTP/2 frames (RFC 9113): a sans-IO decoder and the encoders the engine needs.

`FrameDecoder.feed(bytes)` turns a byte stream into a list of events. It owns every
check that needs no stream state: the client preface, frame size, which frames may
use stream 0, fixed payload lengths, padding, SETTINGS values, and the assembly of a
header block out of HEADERS + CONTINUATION with a bound on frames and bytes.

Invariants:
* `feed()` either returns events or raises `ProtocolError`; nothing else escapes it,
  whatever the bytes (tests/unit/test_h2_frames.py fuzzes this).
* Memory is bounded: at most one frame (`max_frame_size`) plus one header block
  (`max_block_bytes`) is buffered per connection.
* A connection error leaves the decoder unusable: the caller sends GOAWAY and closes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = [
    "PREFACE",
    "DataFrame",
    "ErrorCode",
    "Event",
    "FrameDecoder",
    "GoAwayFrame",
    "HeaderBlock",
    "IgnoredFrame",
    "PingFrame",
    "ProtocolError",
    "ResetFrame",
    "Setting",
    "SettingsFrame",
    "StreamError",
    "WindowUpdateFrame",
    "data_frame",
    "goaway_frame",
    "headers_frames",
    "ping_frame",
    "rst_frame",
    "settings_frame",
    "window_update_frame",
]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9

FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20
_PLAIN_HEADERS_MASK = FLAG_END_HEADERS | FLAG_PADDED | FLAG_PRIORITY

DEFAULT_MAX_FRAME_SIZE = 16_384
MAX_FRAME_SIZE_LIMIT = (1 << 24) - 1
MAX_WINDOW = (1 << 31) - 1
MAX_STREAM_ID = (1 << 31) - 1

_HEADER = struct.Struct(">BHBBL")  # length (24 bits as 8+16), type, flags, stream id
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
_GOAWAY = struct.Struct(">LL")
_RST = struct.Struct(">L")


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class Setting(enum.IntEnum):
    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6
    # gRPC's extension: the sender of this setting accepts `-bin` metadata as NUL
    # followed by the raw bytes ("true binary"), with no base64 and no Huffman code.
    GRPC_ALLOW_TRUE_BINARY_METADATA = 0xFE03


class ProtocolError(Exception):
    """The peer broke HTTP/2: a connection error. Send GOAWAY(code) and close."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- events -------------------------------------------------------------------------------


@dataclass(slots=True)
class DataFrame:
    stream_id: int
    data: bytes
    end_stream: bool
    flow_len: int  # what the frame costs in flow control (padding included)


@dataclass(slots=True)
class HeaderBlock:
    """A complete header block: HEADERS and its CONTINUATIONs, padding stripped."""

    stream_id: int
    block: bytes
    end_stream: bool


@dataclass(slots=True)
class ResetFrame:
    stream_id: int
    code: int


@dataclass(slots=True)
class SettingsFrame:
    ack: bool
    settings: tuple[tuple[int, int], ...]


@dataclass(slots=True)
class PingFrame:
    ack: bool
    data: bytes


@dataclass(slots=True)
class GoAwayFrame:
    last_stream_id: int
    code: int
    debug: bytes


@dataclass(slots=True)
class WindowUpdateFrame:
    stream_id: int
    increment: int


@dataclass(slots=True)
class StreamError:
    """A frame that breaks one stream only: answer RST_STREAM(code) on it."""

    stream_id: int
    code: ErrorCode


@dataclass(slots=True)
class IgnoredFrame:
    """PRIORITY or an unknown frame type: no effect, but counted against floods."""

    frame_type: int
    stream_id: int


Event = (
    DataFrame
    | HeaderBlock
    | ResetFrame
    | SettingsFrame
    | PingFrame
    | GoAwayFrame
    | WindowUpdateFrame
    | StreamError
    | IgnoredFrame
)


# -- decoding -----------------------------------------------------------------------------


class FrameDecoder:
    def __init__(
        self,
        *,
        expect_preface: bool,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_block_bytes: int = 256 * 1024,
        max_continuations: int = 32,
    ) -> None:
        self._buf = bytearray()
        self._preface = PREFACE if expect_preface else b""
        self.max_frame_size = max_frame_size
        self._max_block = max_block_bytes
        self._max_cont = max_continuations
        # The header block being assembled: stream, END_STREAM, fragments, frames so far.
        self._block_stream = 0
        self._block_end = False
        self._block: list[bytes] = []
        self._block_len = 0
        self._block_frames = 0

    @property
    def preface_done(self) -> bool:
        return not self._preface

    def feed(self, data: bytes) -> list[Event]:
        # Frames are sliced straight out of `data`; only an incomplete tail (at most one
        # frame header and payload, or part of the preface) waits in `_buf`.
        buf = self._buf
        if buf:
            buf += data
            data = bytes(buf)
            buf.clear()
        elif type(data) is not bytes:
            data = bytes(data)
        pos = 0
        if self._preface:
            preface = self._preface
            n = min(len(data), len(preface))
            if data[:n] != preface[:n]:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "bad connection preface")
            if n < len(preface):
                buf += data
                return []
            pos = n
            self._preface = b""
        events: list[Event] = []
        end = len(data)
        limit = self.max_frame_size
        unpack = _HEADER.unpack_from
        while end - pos >= 9:
            hi, lo, ftype, flags, sid = unpack(data, pos)
            length = (hi << 16) | lo
            if length > limit:
                raise ProtocolError(
                    ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds {limit}"
                )
            start = pos + 9
            pos = start + length
            if pos > end:
                pos = start - 9
                break
            sid &= MAX_STREAM_ID
            if ftype == DATA and not self._block_stream and sid and not flags & FLAG_PADDED:
                # The common case, inline: no padding, not inside a header block.
                events.append(
                    DataFrame(sid, data[start:pos], bool(flags & FLAG_END_STREAM), length)
                )
                continue
            if (
                ftype == HEADERS
                and flags & _PLAIN_HEADERS_MASK == FLAG_END_HEADERS
                and not self._block_stream
                and sid
                and length <= self._max_block
            ):
                # Also inline: a whole header block in one frame, no padding or priority.
                events.append(HeaderBlock(sid, data[start:pos], bool(flags & FLAG_END_STREAM)))
                continue
            event = self._frame(ftype, flags, sid, data[start:pos])
            if event is not None:
                events.append(event)
        if pos < end:
            buf += memoryview(data)[pos:]
        return events

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> Event | None:
        if self._block_stream:
            if ftype != CONTINUATION or sid != self._block_stream:
                raise ProtocolError(
                    ErrorCode.PROTOCOL_ERROR, "header block interrupted before END_HEADERS"
                )
            return self._continue(flags, payload)
        if ftype == DATA:
            if sid == 0:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
            flow_len = len(payload)
            if flags & FLAG_PADDED:
                payload = _unpad(payload)
            return DataFrame(sid, payload, bool(flags & FLAG_END_STREAM), flow_len)
        if ftype == HEADERS:
            return self._headers(flags, sid, payload)
        if ftype == CONTINUATION:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        if ftype == SETTINGS:
            return _settings(flags, sid, payload)
        if ftype == WINDOW_UPDATE:
            if len(payload) != 4:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE length is not 4")
            return WindowUpdateFrame(sid, _U32.unpack(payload)[0] & MAX_WINDOW)
        if ftype == PING:
            if sid != 0:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "PING length is not 8")
            return PingFrame(bool(flags & FLAG_ACK), payload)
        if ftype == RST_STREAM:
            if sid == 0:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
            if len(payload) != 4:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM length is not 4")
            return ResetFrame(sid, _RST.unpack(payload)[0])
        if ftype == GOAWAY:
            if sid != 0:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY shorter than 8")
            last, code = _GOAWAY.unpack_from(payload)
            return GoAwayFrame(last & MAX_STREAM_ID, code, payload[8:128])
        if ftype == PRIORITY:
            if sid == 0:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                return StreamError(sid, ErrorCode.FRAME_SIZE_ERROR)
            if _U32.unpack_from(payload)[0] & MAX_STREAM_ID == sid:
                return StreamError(sid, ErrorCode.PROTOCOL_ERROR)
            return IgnoredFrame(ftype, sid)
        if ftype == PUSH_PROMISE:
            # Both ends of every connection we hold send SETTINGS_ENABLE_PUSH=0.
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE is disabled")
        return IgnoredFrame(ftype, sid)

    def _headers(self, flags: int, sid: int, payload: bytes) -> Event | None:
        if sid == 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & FLAG_PADDED:
            payload = _unpad(payload)
        if flags & FLAG_PRIORITY:
            # Priority is deprecated (RFC 9113 5.3.2) and ignored; only its length counts.
            if len(payload) < 5:
                raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS priority truncated")
            payload = payload[5:]
        if flags & FLAG_END_HEADERS:  # a whole block in one frame: no assembly
            if len(payload) > self._max_block:
                raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
            return HeaderBlock(sid, payload, bool(flags & FLAG_END_STREAM))
        self._begin(sid, flags, payload)
        return None

    def _begin(self, sid: int, flags: int, fragment: bytes) -> None:
        if len(fragment) > self._max_block:
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        self._block_stream = sid
        self._block_end = bool(flags & FLAG_END_STREAM)
        self._block = [fragment]
        self._block_len = len(fragment)
        self._block_frames = 1

    def _continue(self, flags: int, fragment: bytes) -> Event | None:
        self._block_frames += 1
        self._block_len += len(fragment)
        if self._block_frames > self._max_cont:
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "too many CONTINUATION frames")
        if self._block_len > self._max_block:
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        self._block.append(fragment)
        if flags & FLAG_END_HEADERS:
            return self._finish()
        return None

    def _finish(self) -> HeaderBlock:
        block = HeaderBlock(self._block_stream, b"".join(self._block), self._block_end)
        self._block_stream = 0
        self._block = []
        return block


def _unpad(payload: bytes) -> bytes:
    if not payload:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "padded frame without a pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1 : len(payload) - pad]


def _settings(flags: int, sid: int, payload: bytes) -> SettingsFrame:
    if sid != 0:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
    if flags & FLAG_ACK:
        if payload:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
        return SettingsFrame(True, ())
    if len(payload) % 6:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
    pairs = []
    for off in range(0, len(payload), 6):
        ident, value = _SETTING.unpack_from(payload, off)
        if ident == Setting.ENABLE_PUSH and value > 1:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "ENABLE_PUSH is not 0 or 1")
        if ident == Setting.INITIAL_WINDOW_SIZE and value > MAX_WINDOW:
            raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE too large")
        if ident == Setting.MAX_FRAME_SIZE and not (
            DEFAULT_MAX_FRAME_SIZE <= value <= MAX_FRAME_SIZE_LIMIT
        ):
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
        pairs.append((ident, value))
    return SettingsFrame(False, tuple(pairs))


# -- encoding -----------------------------------------------------------------------------


def _head(length: int, ftype: int, flags: int, sid: int) -> bytes:
    return _HEADER.pack(length >> 16, length & 0xFFFF, ftype, flags, sid)


def data_frame(sid: int, data: bytes, end_stream: bool) -> bytes:
    n = len(data)  # _head, inline (per message)
    flags = FLAG_END_STREAM if end_stream else 0
    return _HEADER.pack(n >> 16, n & 0xFFFF, DATA, flags, sid) + data


def headers_frames(sid: int, block: bytes, end_stream: bool, max_frame_size: int) -> bytes:
    """HEADERS (+ CONTINUATION frames when the block exceeds the peer's frame size)."""
    flags = FLAG_END_STREAM if end_stream else 0
    n = len(block)
    if n <= max_frame_size:  # _head, inline (per block)
        return _HEADER.pack(n >> 16, n & 0xFFFF, HEADERS, flags | FLAG_END_HEADERS, sid) + block
    parts = [block[i : i + max_frame_size] for i in range(0, len(block), max_frame_size)]
    out = [_head(len(parts[0]), HEADERS, flags, sid), parts[0]]
    for i, part in enumerate(parts[1:], start=2):
        last = FLAG_END_HEADERS if i == len(parts) else 0
        out += [_head(len(part), CONTINUATION, last, sid), part]
    return b"".join(out)


def settings_frame(settings: dict[Setting, int] | None = None, *, ack: bool = False) -> bytes:
    payload = b"".join(_SETTING.pack(k, v) for k, v in (settings or {}).items())
    return _head(len(payload), SETTINGS, FLAG_ACK if ack else 0, 0) + payload


def window_update_frame(sid: int, increment: int) -> bytes:
    return _head(4, WINDOW_UPDATE, 0, sid) + _U32.pack(increment)


def rst_frame(sid: int, code: int) -> bytes:
    return _head(4, RST_STREAM, 0, sid) + _RST.pack(code)


def ping_frame(data: bytes, *, ack: bool = False) -> bytes:
    return _head(8, PING, FLAG_ACK if ack else 0, 0) + data


def goaway_frame(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    payload = _GOAWAY.pack(last_stream_id, code) + debug[:256]
    return _head(len(payload), GOAWAY, 0, 0) + payload
