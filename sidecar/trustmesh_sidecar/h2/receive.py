"""How a connection reacts to each frame: stream state, flow control, floods.

A mixin of `H2Connection`, kept apart so each file holds one concern: this one reads
frames, `connection.py` owns the transport, the writes and the lifecycle. Every
check here that fails is a `ProtocolError` (connection error: GOAWAY) or a stream
reset of its own, as RFC 9113 assigns it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from trustmesh_sidecar.h2 import frames as f
from trustmesh_sidecar.h2.config import H2Config
from trustmesh_sidecar.h2.frames import ErrorCode, ProtocolError, Setting
from trustmesh_sidecar.h2.hpack_cache import HeaderDecoder, HeaderEncoder, HeaderError, RawHeaders
from trustmesh_sidecar.h2.streams import Stream

__all__ = ["DRAIN_PING", "Bucket", "FrameReceiver"]

log = logging.getLogger("trustmesh_sidecar.h2.connection")

DRAIN_PING = b"tm-drain"


class Bucket:
    __slots__ = ("burst", "last", "level", "rate")

    def __init__(self, burst: int, rate: float, now: float) -> None:
        self.burst, self.rate, self.level, self.last = burst, rate, float(burst), now

    def take(self, now: float) -> bool:
        self.level = min(self.burst, self.level + (now - self.last) * self.rate) - 1
        self.last = now
        return self.level >= 0


class FrameReceiver:
    """Frame handlers over the state that `H2Connection.__init__` sets up."""

    config: H2Config
    client: bool
    closed: bool
    draining: bool
    peer_address: str
    streams: dict[int, Stream]
    send_window: int
    peer_max_frame: int
    peer_max_streams: int
    _loop: asyncio.AbstractEventLoop
    _hdec: HeaderDecoder
    _henc: HeaderEncoder
    _next_id: int
    _last_peer_id: int
    _got_settings: bool
    _settings_unacked: int
    settled: asyncio.Future[None]
    _peer_initial_window: int
    _recv_window: int
    _goaway_last: int
    _peer_goaway: bool
    _resets: Bucket
    _control: Bucket

    # Provided by H2Connection (declared here so this mixin type-checks on its own).
    _write: Callable[[bytes], None]
    _abandon: Callable[..., None]  # (stream, code, reason, *, send=False)
    credit: Callable[[Stream | None, int], None]
    stream_closed: Callable[[Stream], None]
    _flush_blocked: Callable[[], None]
    _final_goaway: Callable[[], None]
    _close_if_idle: Callable[[], None]
    _wake: Callable[[], None]  # slot waiters (H2Connection.when_open)
    _accept_stream: Callable[[int, RawHeaders, int, bool], None]

    # -- frames in ----------------------------------------------------------------------

    def _dispatch(self, ev: f.Event) -> None:
        if not self._got_settings and (not isinstance(ev, f.SettingsFrame) or ev.ack):
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "first frame is not SETTINGS")
        if isinstance(ev, f.DataFrame):
            self._on_data(ev)
        elif isinstance(ev, f.HeaderBlock):
            self._on_headers(ev)
        elif isinstance(ev, f.WindowUpdateFrame):
            self._on_window_update(ev)
        elif isinstance(ev, f.SettingsFrame):
            self._calm(self._control)
            if ev.ack:
                self._settings_unacked = max(0, self._settings_unacked - 1)
            else:
                self._on_settings(ev)
        elif isinstance(ev, f.PingFrame):
            if ev.ack:
                if ev.data == DRAIN_PING:
                    self._final_goaway()
            else:
                self._calm(self._control)
                self._write(f.ping_frame(ev.data, ack=True))
        elif isinstance(ev, f.ResetFrame):
            self._on_reset(ev)
        elif isinstance(ev, f.GoAwayFrame):
            self._on_goaway(ev)
        elif isinstance(ev, f.StreamError):
            self._calm(self._control)
            stream = self.streams.get(ev.stream_id)
            if stream is not None:
                self._abandon(stream, ev.code, f"stream error {ev.code.name}", send=True)
        else:
            self._calm(self._control)

    def _calm(self, bucket: Bucket) -> None:
        if not bucket.take(self._loop.time()):
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "too many frames")

    def _idle(self, sid: int) -> bool:
        """A stream id never used yet (frames on it other than HEADERS are errors)."""
        if (sid % 2 == 1) == self.client:
            return sid >= self._next_id
        return sid > self._last_peer_id

    def _on_headers(self, ev: f.HeaderBlock) -> None:
        try:  # always decode: the HPACK table must stay in step even for refused streams
            headers, size = self._hdec.decode(ev.block)
        except HeaderError as e:
            raise ProtocolError(ErrorCode.COMPRESSION_ERROR, str(e)) from e
        sid = ev.stream_id
        stream = self.streams.get(sid)
        if stream is None:
            if self.client or sid % 2 == 0:
                if self._idle(sid):
                    raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "HEADERS on an idle stream")
                return  # a stream we already closed
            if sid <= self._last_peer_id:
                return  # closed: trailers that crossed our RST_STREAM
            self._last_peer_id = sid
            if not ev.block and not ev.end_stream:
                self._calm(self._control)
            if sid > self._goaway_last or len(self.streams) >= self.config.max_concurrent_streams:
                self._write(f.rst_frame(sid, ErrorCode.REFUSED_STREAM))
                return
            self._accept_stream(sid, headers, size, ev.end_stream)
            return
        if stream.remote_done:
            self._abandon(stream, ErrorCode.STREAM_CLOSED, "HEADERS after END_STREAM", send=True)
            return
        stream.remote_done = ev.end_stream
        if stream.handler is not None:
            stream.handler.on_headers(stream, headers, size, ev.end_stream)
        if stream.closed:
            self.stream_closed(stream)

    def _on_data(self, ev: f.DataFrame) -> None:
        n = ev.flow_len
        if n > self._recv_window:
            raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self._recv_window -= n
        if not ev.data and not ev.end_stream:
            self._calm(self._control)
        stream = self.streams.get(ev.stream_id)
        if stream is None or stream.remote_done:
            if stream is None and self._idle(ev.stream_id):
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "DATA on an idle stream")
            self.credit(None, n)
            if stream is not None:
                self._abandon(stream, ErrorCode.STREAM_CLOSED, "DATA after END_STREAM", send=True)
            return
        if n > stream.recv_window:
            self.credit(None, n)
            self._abandon(stream, ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the window", send=True)
            return
        stream.recv_window -= n
        if n > len(ev.data):
            self.credit(stream, n - len(ev.data))  # padding: consumed on arrival
        stream.remote_done = ev.end_stream
        if stream.handler is not None:
            stream.handler.on_data(stream, ev.data, ev.end_stream)
        else:
            self.credit(stream, len(ev.data))
        if stream.closed:
            self.stream_closed(stream)

    def _on_window_update(self, ev: f.WindowUpdateFrame) -> None:
        if ev.stream_id == 0:
            if ev.increment == 0:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += ev.increment
            if self.send_window > f.MAX_WINDOW:
                raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "connection window overflow")
            self._flush_blocked()
            return
        stream = self.streams.get(ev.stream_id)
        if stream is None:
            if self._idle(ev.stream_id):
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return
        if ev.increment == 0:
            self._abandon(stream, ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0", send=True)
            return
        stream.send_window += ev.increment
        if stream.send_window > f.MAX_WINDOW:
            self._abandon(stream, ErrorCode.FLOW_CONTROL_ERROR, "window overflow", send=True)
            return
        stream.flush()

    def _on_settings(self, ev: f.SettingsFrame) -> None:
        if not self._got_settings:
            self._got_settings = True
        for ident, value in ev.settings:
            if ident == Setting.HEADER_TABLE_SIZE:
                self._henc.set_table_size(value)
            elif ident == Setting.MAX_CONCURRENT_STREAMS:
                self.peer_max_streams = value
            elif ident == Setting.MAX_FRAME_SIZE:
                self.peer_max_frame = value
            elif ident == Setting.INITIAL_WINDOW_SIZE:
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > f.MAX_WINDOW:
                        raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "window overflow")
        self._write(f.settings_frame(ack=True))
        for stream in list(self.streams.values()):
            stream.flush()
        if not self.settled.done():
            self.settled.set_result(None)
        self._wake()  # the peer may have raised MAX_CONCURRENT_STREAMS

    def _on_reset(self, ev: f.ResetFrame) -> None:
        self._calm(self._resets)
        stream = self.streams.get(ev.stream_id)
        if stream is None:
            if self._idle(ev.stream_id):
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            return
        self._abandon(stream, ev.code, f"reset by the peer ({_name(ev.code)})")

    def _on_goaway(self, ev: f.GoAwayFrame) -> None:
        self.draining = True
        self._peer_goaway = True
        if ev.code != ErrorCode.NO_ERROR:
            log.info("h2 %s: GOAWAY %s %r", self.peer_address, _name(ev.code), ev.debug[:64])
        if self.client:
            # Streams above last_stream_id were never processed (RFC 9113 6.8): the
            # code tells their calls that a retry on a new connection is safe.
            for sid, stream in list(self.streams.items()):
                if sid > ev.last_stream_id:
                    self._abandon(stream, ErrorCode.REFUSED_STREAM, "refused by GOAWAY")
            self._wake()
        self._close_if_idle()


def _name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"0x{code:x}"
