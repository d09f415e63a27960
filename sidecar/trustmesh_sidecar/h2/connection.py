"""One HTTP/2 connection (either role) as an asyncio protocol.

The connection owns what spans streams: the preface and SETTINGS exchange, HPACK
state, connection-level flow control, the stream table, GOAWAY, and the defences of
protocol code on the attack surface:

* frame size, header block size and CONTINUATION count (`FrameDecoder`), header-list
  size (hard limit: connection error; soft limit: left to the stream's handler);
* SETTINGS_MAX_CONCURRENT_STREAMS enforced with REFUSED_STREAM;
* rapid reset and control-frame floods, as token buckets: GOAWAY ENHANCE_YOUR_CALM;
* strict flow control both ways, and a cap on bytes held for a peer that won't read;
* a preface timeout, a SETTINGS-acknowledgement timeout (GOAWAY SETTINGS_TIMEOUT,
  RFC 9113 6.5.3), and a maximum age after which a server drains with a double
  GOAWAY (RFC 9113 6.8) so clients re-handshake with rotated credentials.

Client role: `settled` resolves with the peer's first SETTINGS, so no stream opens
before the peer's SETTINGS_MAX_CONCURRENT_STREAMS is known; a caller that finds the
connection full waits for a slot with `when_open`.

A peer's protocol error closes only its connection. Any other exception raised while
handling its bytes is logged and closes that connection too; it never reaches the
listener.
"""

from __future__ import annotations

import asyncio
import logging
import random
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from trustmesh_sidecar.h2 import frames as f
from trustmesh_sidecar.h2.config import H2Config
from trustmesh_sidecar.h2.frames import ErrorCode, ProtocolError, Setting
from trustmesh_sidecar.h2.hpack_cache import HeaderDecoder, HeaderEncoder, RawHeaders
from trustmesh_sidecar.h2.receive import DRAIN_PING, Bucket, FrameReceiver
from trustmesh_sidecar.h2.streams import Block, Stream, StreamHandler

__all__ = ["CONNECTION_LOST", "H2Connection", "RequestHandler"]

log = logging.getLogger(__name__)

_DEFAULT_WINDOW = 65_535
# The code `StreamHandler.on_reset` gets when the connection itself went away.
CONNECTION_LOST = -1

# Server role: called with each new stream's request headers; sets stream.handler.
RequestHandler = Callable[["H2Connection", Stream, RawHeaders, int, bool], None]


class _WriteBatch:
    """Writes one connection's received bytes cause on other connections (a request
    relayed upstream, a response relayed downstream) are flushed when that
    `data_received` returns, in the same loop iteration, instead of through one
    `call_soon` per connection. One per event loop."""

    __slots__ = ("active", "dirty")

    def __init__(self) -> None:
        self.active = False
        self.dirty: list[H2Connection] = []

    def flush(self) -> None:
        dirty = self.dirty
        while dirty:
            conn = dirty.pop()
            try:
                conn._flush_out()
            except Exception:
                log.exception("h2 %s: write failed", conn.peer_address)
                conn.abort()


_BATCHES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _WriteBatch] = (
    weakref.WeakKeyDictionary()
)


def _batch_of(loop: asyncio.AbstractEventLoop) -> _WriteBatch:
    batch = _BATCHES.get(loop)
    if batch is None:
        batch = _BATCHES[loop] = _WriteBatch()
    return batch


class H2Connection(FrameReceiver, asyncio.Protocol):
    def __init__(
        self,
        config: H2Config,
        *,
        client: bool,
        on_request: RequestHandler | None = None,
        on_closed: Callable[[H2Connection], None] | None = None,
        verify: Callable[[asyncio.BaseTransport], None] | None = None,
        peer_chain_of: Callable[[asyncio.BaseTransport], tuple[bytes, ...]] | None = None,
        on_open: Callable[[H2Connection], None] | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self._on_request = on_request
        self._on_closed = on_closed
        self._verify = verify
        self._peer_chain_of = peer_chain_of
        self._on_open = on_open  # called once the transport (after TLS) is up
        self.loop = self._loop = asyncio.get_running_loop()
        self.created = self._loop.time()
        self.transport: asyncio.Transport | None = None
        self.peer_address = ""
        self.peer_chain: tuple[bytes, ...] = ()
        self.error: BaseException | None = None  # why a client connection failed
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.settled: asyncio.Future[None] = self._loop.create_future()  # peer's SETTINGS
        self._settings_unacked = 0
        self._slot_waiters: deque[Callable[[], None]] = deque()
        self._decoder = f.FrameDecoder(
            expect_preface=not client,
            max_frame_size=config.max_frame_size,
            max_block_bytes=config.max_header_block_bytes,
            max_continuations=config.max_continuation_frames,
        )
        self._hdec = HeaderDecoder(hard_limit=config.max_header_block_bytes)
        self._henc = HeaderEncoder()
        self.streams: dict[int, Stream] = {}
        self._next_id = 1
        self._last_peer_id = 0
        self._got_settings = False
        # Flow control: what the peer lets us send, and what we let it send.
        self.send_window = _DEFAULT_WINDOW
        self._peer_initial_window = _DEFAULT_WINDOW
        self.peer_max_frame = f.DEFAULT_MAX_FRAME_SIZE
        self.peer_max_streams = 1 << 31
        self._recv_window = config.connection_window
        self._conn_unacked = 0
        self.paused = False
        self._blocked: dict[Stream, None] = {}
        self._out: list[bytes] = []
        self._flush_pending = False
        self._batch = _batch_of(self._loop)
        self._receiving = False
        # Lifecycle: draining = no new streams; goaway_last = highest stream we'll serve.
        self.closed = False
        self.draining = False
        self._peer_goaway = False
        self._goaway_last = f.MAX_STREAM_ID
        self._timers: list[asyncio.TimerHandle] = []
        now = self._loop.time()
        self._resets = Bucket(config.reset_burst, config.reset_rate, now)
        self._control = Bucket(config.control_burst, config.control_rate, now)

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports are not asyncio.Transport subclasses.
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            family = "ipv6" if ":" in str(peer[0]) else "ipv4"
            host = f"[{peer[0]}]" if family == "ipv6" else str(peer[0])
            self.peer_address = f"{family}:{host}:{peer[1]}"
        if self._peer_chain_of is not None:  # server role: the caller's verified chain
            try:
                self.peer_chain = self._peer_chain_of(transport)
            except Exception as e:  # left empty: the router refuses the call
                log.debug("h2 %s: no peer chain: %s", self.peer_address, e)
        if self._verify is not None:
            try:
                self._verify(transport)
            except Exception as e:
                self.error = e
                self.closed = True
                transport.abort()
                self._settle(e)
                return
        cfg = self.config
        settings = {
            Setting.ENABLE_PUSH: 0,
            Setting.MAX_CONCURRENT_STREAMS: cfg.max_concurrent_streams,
            Setting.INITIAL_WINDOW_SIZE: cfg.stream_window,
            Setting.MAX_HEADER_LIST_SIZE: cfg.max_header_list_bytes,
            # grpc core then sends `-bin` values raw rather than base64 and Huffman
            # coded, which costs Python ~400 us to decode per 2 KB (a delegation chain).
            Setting.GRPC_ALLOW_TRUE_BINARY_METADATA: 1,
        }
        if self.client:
            self._out.append(f.PREFACE)
        self._out.append(f.settings_frame(settings))
        self._out.append(f.window_update_frame(0, cfg.connection_window - _DEFAULT_WINDOW))
        self._flush_out()
        self._settings_unacked += 1
        self._later(cfg.settings_ack_timeout_s, self._settings_timeout)
        if not self.client:
            self._later(cfg.preface_timeout_s, self._preface_timeout)
            age = cfg.max_connection_age_s
            self._later(age * random.uniform(0.9, 1.0), self.drain)  # noqa: S311 (jitter)
        if not self.ready.done():
            self.ready.set_result(None)
        if self._on_open is not None:
            self._on_open(self)

    def _settle(self, error: BaseException) -> None:
        for future in (self.ready, self.settled):
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: a server connection has no one waiting

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self._receiving = True
        batch = self._batch
        outer = not batch.active
        batch.active = True
        try:
            for event in self._decoder.feed(data):
                # DATA and HEADERS straight to their handlers; `_dispatch` for the rest
                # (and for anything before the peer's SETTINGS, which it refuses).
                if type(event) is f.DataFrame and self._got_settings:
                    self._on_data(event)
                elif type(event) is f.HeaderBlock and self._got_settings:
                    self._on_headers(event)
                else:
                    self._dispatch(event)
                if self.closed:
                    break
        except ProtocolError as e:
            log.debug("h2 %s: %s", self.peer_address, e.message)
            self.close(e.code, e.message)
        except Exception:
            log.exception("h2 %s: internal error handling the peer's bytes", self.peer_address)
            self.close(ErrorCode.INTERNAL_ERROR, "internal error")
        finally:
            self._receiving = False
            if self._flush_pending:
                self._flush_out()
            if outer:
                batch.active = False
                batch.flush()

    def eof_received(self) -> bool | None:
        return False  # close the transport; streams end in connection_lost

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._flush_blocked()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for timer in self._timers:
            timer.cancel()
        self._settle(self.error or ConnectionError("connection closed"))
        reason = f"connection lost: {exc}" if exc else "connection closed"
        for stream in list(self.streams.values()):
            self._abandon(stream, CONNECTION_LOST, reason)
        self.streams.clear()
        self._blocked.clear()
        self._wake()
        if self._on_closed is not None:
            self._on_closed(self)

    # -- streams ------------------------------------------------------------------------

    @property
    def can_open(self) -> bool:
        return (
            not self.closed
            and not self.draining
            and len(self.streams) < self.peer_max_streams
            and self._next_id < f.MAX_STREAM_ID
        )

    def _accept_stream(self, sid: int, headers: RawHeaders, size: int, end: bool) -> None:
        stream = Stream(self, sid, self._peer_initial_window, self.config.stream_window)
        self.streams[sid] = stream
        stream.remote_done = end
        assert self._on_request is not None
        self._on_request(self, stream, headers, size, end)

    def when_open(self, callback: Callable[[], None]) -> None:
        """Client role, when `can_open` is false: `callback()` once a stream slot frees,
        or once the connection will take no more streams (it closed or drains)."""
        self._slot_waiters.append(callback)

    def _wake(self) -> None:
        waiters = self._slot_waiters
        while waiters and (self.can_open or self.closed or self.draining):
            waiters.popleft()()

    def open_stream(self, handler: StreamHandler) -> Stream:
        """Client role: a new stream (the caller sends its HEADERS first)."""
        sid = self._next_id
        self._next_id += 2
        stream = Stream(self, sid, self._peer_initial_window, self.config.stream_window)
        stream.handler = handler
        self.streams[sid] = stream
        return stream

    def stream_closed(self, stream: Stream) -> None:
        if self.streams.pop(stream.id, None) is not None:
            self._blocked.pop(stream, None)
            stream.source = None
            if self._slot_waiters:
                self._wake()
            self._close_if_idle()

    def _abandon(self, stream: Stream, code: int, reason: str, *, send: bool = False) -> None:
        """End a stream abnormally (RST_STREAM out if `send`) and tell its handler."""
        if send:
            stream.reset_now(code)
        else:
            stream.discard()
            stream.local_done = stream.remote_done = True
            self.stream_closed(stream)
        if stream.handler is not None:
            handler, stream.handler = stream.handler, None
            handler.on_reset(stream, code, reason)

    def block(self, stream: Stream) -> None:
        self._blocked[stream] = None

    def _flush_blocked(self) -> None:
        while self._blocked and not self.paused and self.send_window > 0:
            stream = next(iter(self._blocked))
            del self._blocked[stream]
            stream.flush()
            if stream in self._blocked:
                return

    def credit(self, stream: Stream | None, n: int) -> None:
        """`n` received bytes were consumed: return them to the peer's windows."""
        if self.closed:
            return
        self._conn_unacked += n
        if self._conn_unacked >= self.config.connection_window // 4:
            self._write(f.window_update_frame(0, self._conn_unacked))
            self._recv_window += self._conn_unacked
            self._conn_unacked = 0
        if stream is None or stream.remote_done:
            return
        stream.unacked += n
        if stream.unacked >= self.config.stream_window // 4:
            self._write(f.window_update_frame(stream.id, stream.unacked))
            stream.recv_window += stream.unacked
            stream.unacked = 0

    # -- frames out ---------------------------------------------------------------------

    def write_headers(self, sid: int, fields: Block, end: bool) -> None:
        block = self._henc.encode(fields)
        self._write(f.headers_frames(sid, block, end, self.peer_max_frame))

    def write_data(self, sid: int, data: bytes, end: bool) -> None:
        self._write(f.data_frame(sid, data, end))

    def write_reset(self, sid: int, code: int) -> None:
        self._write(f.rst_frame(sid, code))

    def _write(self, data: bytes) -> None:
        if self.closed:
            return
        self._out.append(data)
        if not self._flush_pending:
            self._flush_pending = True
            if self._receiving:
                return  # flushed as data_received returns
            batch = self._batch
            if batch.active:  # another connection's bytes caused this: flushed with them
                batch.dirty.append(self)
            else:
                self._loop.call_soon(self._flush_out)

    def _flush_out(self) -> None:
        self._flush_pending = False
        transport = self.transport
        if not self._out or transport is None or transport.is_closing():
            self._out.clear()
            return
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        transport.write(data)
        if transport.get_write_buffer_size() > self.config.max_write_buffer:
            log.warning("h2 %s: peer does not read; dropping it", self.peer_address)
            self.closed = True
            transport.abort()

    # -- lifecycle ----------------------------------------------------------------------

    def _later(self, delay: float, callback: Callable[[], Any]) -> None:
        self._timers.append(self._loop.call_later(delay, callback))

    def _settings_timeout(self) -> None:
        if self._settings_unacked and not self.closed:
            self.close(ErrorCode.SETTINGS_TIMEOUT, "SETTINGS not acknowledged in time")

    def _preface_timeout(self) -> None:
        if not self._got_settings and not self.closed:
            self.close(ErrorCode.SETTINGS_TIMEOUT, "no preface in time")

    def drain(self) -> None:
        """Stop taking new streams, let open ones finish (within the grace), then close.

        A server first sends GOAWAY(2^31-1) and a PING; the PING's ACK proves the client
        has seen it, and the final GOAWAY names the last stream we will serve.
        """
        if self.draining or self.closed:
            return
        self.draining = True
        if self.client:
            self._wake()
            self._close_if_idle()
            return
        self._write(f.goaway_frame(f.MAX_STREAM_ID, ErrorCode.NO_ERROR))
        self._write(f.ping_frame(DRAIN_PING))
        self._later(1.0, self._final_goaway)  # a client that never answers the PING
        self._later(self.config.max_connection_age_grace_s, self._grace_over)

    def _final_goaway(self) -> None:
        if self.client or self.closed or self._goaway_last != f.MAX_STREAM_ID:
            return
        self._goaway_last = self._last_peer_id
        self._write(f.goaway_frame(self._goaway_last, ErrorCode.NO_ERROR))
        self._close_if_idle()

    def _grace_over(self) -> None:
        self.close(ErrorCode.NO_ERROR, "max connection age")

    def _close_if_idle(self) -> None:
        done = self.client or self._peer_goaway or self._goaway_last != f.MAX_STREAM_ID
        if self.draining and done and not self.streams and not self.closed:
            self.close(ErrorCode.NO_ERROR, "")

    def close(self, code: ErrorCode = ErrorCode.NO_ERROR, message: str = "") -> None:
        """GOAWAY(code), then close once the buffered bytes are out."""
        if self.closed:
            return
        last = self._last_peer_id if self._goaway_last == f.MAX_STREAM_ID else self._goaway_last
        self._write(f.goaway_frame(last, code, message.encode()[:128]))
        self._flush_out()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
