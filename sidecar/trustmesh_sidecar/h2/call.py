"""One forwarded call: the caller's stream (`down`) joined to a stream to the upstream.

Message bytes are relayed as they arrive, never parsed, except that the 5-byte gRPC
length prefixes are read as they pass (`MessageMeter`) to enforce the message limit.
Headers are re-encoded per connection; the router's header list replaces the
caller's metadata, and the transport fields the bytes depend on (content-type,
grpc-encoding) are carried over.

Invariants:
* `observer.finished` runs exactly once, whatever ends the call: the upstream's
  status, a reset from either side, a lost connection, the deadline (checked in slots
  of 50 ms, one loop timer per slot: `deadlines.py`), the message
  limit or `abort()` (revocation).
* Once the call has ended, both streams are closed or closing and unlinked from it;
  bytes that still arrive are credited and dropped by the connection.
* A stream the upstream never processed (RST_STREAM REFUSED_STREAM, or above a
  GOAWAY's last stream id; RFC 9113 8.7) is opened again on another connection, with
  the request bytes kept for it, if they fit `H2Config.retry_buffer_bytes` and no
  response has begun; at most `H2Config.max_attempts` streams per call.
* A dialled connection that is full (the peer's MAX_CONCURRENT_STREAMS) is waited on
  for a free stream slot, never exceeded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable

from trustmesh.errors import Code, format_details
from trustmesh_sidecar.engine import Forward, Headers
from trustmesh_sidecar.h2 import grpc_wire as wire
from trustmesh_sidecar.h2.connection import CONNECTION_LOST, H2Connection
from trustmesh_sidecar.h2.deadlines import Deadlines
from trustmesh_sidecar.h2.frames import ErrorCode
from trustmesh_sidecar.h2.hpack_cache import RawHeaders, SplitBlock
from trustmesh_sidecar.h2.streams import Block, Fields, Stream

__all__ = ["Call", "Control", "MessageMeter", "reject", "trailers_only"]

log = logging.getLogger(__name__)

# Finds or dials a connection to the upstream: the engine's pool.
Connect = Callable[[Forward], "H2Connection | Awaitable[H2Connection]"]


class MessageMeter:
    """Follows gRPC length prefixes through a byte stream without buffering messages."""

    __slots__ = ("head", "limit", "remaining")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.remaining = 0  # body bytes of the current message still to come
        self.head = b""  # a prefix split across frames

    def feed(self, data: bytes) -> int | None:
        """None, or the length of a message over the limit that starts in `data`."""
        n = len(data)
        if not self.remaining and not self.head and n >= 5:
            length = int.from_bytes(data[1:5], "big")
            if length == n - 5:  # the common case: exactly one whole message
                return length if length > self.limit else None
        i = 0
        while i < n:
            if self.remaining:
                take = min(self.remaining, n - i)
                self.remaining -= take
                i += take
                continue
            need = 5 - len(self.head)
            self.head += data[i : i + need]
            i += need
            if len(self.head) == 5:
                length = int.from_bytes(self.head[1:5], "big")
                self.head = b""
                self.remaining = length
                if length > self.limit:
                    return length
        return None


# The fields that open a request upstream, by what they hold: the same few on call
# after call, so each is one tuple (its block then encoded once per table state).
# Bounded; paths longer than _HEAD_MAX_PATH are not remembered.
_HEADS: dict[tuple[bytes, str, str, bytes], tuple[tuple[bytes, bytes], ...]] = {}
_HEADS_MAX = 256
_HEAD_MAX_PATH = 256


def _request_head(
    scheme: bytes, path: str, authority: str, content_type: bytes
) -> tuple[tuple[bytes, bytes], ...]:
    key = (scheme, path, authority, content_type)
    head = _HEADS.get(key)
    if head is None:
        head = (
            (b":method", b"POST"),
            (b":scheme", scheme),
            (b":path", path.encode("ascii")),
            (b":authority", authority.encode("latin-1")),
            (b"content-type", content_type),
            (b"te", b"trailers"),
        )
        if len(path) <= _HEAD_MAX_PATH:
            if len(_HEADS) >= _HEADS_MAX:
                _HEADS.clear()
            _HEADS[key] = head
    return head


def trailers_only(
    code: Code, details: str, metadata: Headers = (), details_bin: bytes | None = None
) -> Fields:
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        *wire.status_fields(code, details, metadata, details_bin),
    ]


def reject(stream: Stream, code: Code, details: str) -> None:
    """Answer a call we won't forward; its request bytes are then dropped."""
    stream.handler = None
    stream.send_headers(trailers_only(code, details), True)
    if not stream.remote_done:
        stream.send_reset(ErrorCode.NO_ERROR)


class Control:
    """The CallControl a router gets before the call exists; then it forwards to the
    call, until the call ends (`Call._end` unlinks them: routers keep their control
    while the call is open, and a link left behind would make every call a reference
    cycle, garbage for the cyclic collector rather than freed when it ends)."""

    __slots__ = ("call", "status")

    def __init__(self) -> None:
        self.call: Call | None = None
        self.status: tuple[Code, str] | None = None

    def abort(self, code: Code, details: str) -> None:
        if self.call is not None:
            self.call.abort(code, details)
        elif self.status is None:
            self.status = (code, details)


class Call:
    __slots__ = (
        "_attempts",
        "_connect",
        "_control",
        "_deadlines",
        "_loop",
        "_pending",
        "_replay",
        "_replay_bytes",
        "_slot",
        "_task",
        "deadline",
        "done",
        "down",
        "fwd",
        "headers_in",
        "headers_out",
        "max_attempts",
        "max_header_bytes",
        "request",
        "request_meter",
        "response_meter",
        "retry_buffer_bytes",
        "scheme",
        "up",
    )

    def __init__(
        self,
        down: Stream,
        request: wire.Request,
        fwd: Forward,
        *,
        connect: Connect,
        deadlines: Deadlines,
        scheme: bytes,
        max_message_bytes: int,
        max_header_bytes: int,
        retry_buffer_bytes: int = 16 * 1024,
        max_attempts: int = 3,
        control: Control | None = None,
    ) -> None:
        self._loop = down.conn.loop
        self._control = control
        if control is not None:
            control.call = self
        self.down = down
        self.request = request
        self.fwd = fwd
        self._connect = connect
        self.scheme = scheme
        self.up: Stream | None = None
        # Request bytes not yet on an upstream stream: (data, end, already credited).
        self._pending: list[tuple[bytes, bool, bool]] = []
        # Every request byte so far, for a retry; None once a retry is ruled out.
        self._replay: list[tuple[bytes, bool]] | None = []
        self._replay_bytes = 0
        self._attempts = 0
        self.retry_buffer_bytes = retry_buffer_bytes
        self.max_attempts = max_attempts
        self._task: asyncio.Task[None] | None = None
        self._deadlines = deadlines
        self._slot: int | None = None  # where `deadlines` holds this call
        self.request_meter = MessageMeter(max_message_bytes)
        self.response_meter = MessageMeter(max_message_bytes)
        self.max_header_bytes = max_header_bytes
        self.headers_in = False  # the upstream's response headers arrived
        self.headers_out = False  # and went downstream
        self.done = False
        self.deadline: float | None = None
        if request.timeout is not None:
            self.deadline = self._loop.time() + request.timeout
            self._slot = deadlines.add(self.deadline, self)
        down.handler = self
        if down.remote_done:
            self._send_up(b"", True)

    def start(self) -> None:
        """Find or dial a connection to the upstream, and open the call's stream on it."""
        self._attempts += 1
        got = self._connect(self.fwd)
        if isinstance(got, H2Connection):
            self._use(got)
        else:
            self._task = self._loop.create_task(self._dial(got))

    async def _dial(self, pending: Awaitable[H2Connection]) -> None:
        try:
            conn = await pending
        except asyncio.CancelledError:
            return
        except Exception as e:
            self._unreachable(str(e))
            return
        self._use(conn)

    def _use(self, conn: H2Connection) -> None:
        if self.done:
            return
        if conn.can_open:
            self._open(conn)
        elif not (conn.closed or conn.draining):
            conn.when_open(functools.partial(self._use, conn))  # full: wait for a slot
        elif self._attempts < self.max_attempts:
            self.start()  # it went away before our stream opened: another connection
        else:
            self._unreachable("the connection closed before the call could start")

    def _send_up(self, data: bytes, end: bool) -> None:
        """Request bytes from the caller, to the upstream stream (or held for it)."""
        replay = self._replay
        if replay is not None:
            self._replay_bytes += len(data)
            if self._replay_bytes > self.retry_buffer_bytes:
                self._replay = None  # too much to keep: this call won't be retried
            else:
                replay.append((data, end))
        if self.up is not None:
            self.up.send_data(data, end)
        else:
            self._pending.append((data, end, False))

    def _retry(self) -> bool:
        """The upstream refused our stream unprocessed: open it again, replaying the
        request. False when that is not possible (the caller then gets the refusal)."""
        if self.headers_in or self._replay is None or self._attempts >= self.max_attempts:
            return False
        up, self.up = self.up, None
        if up is not None:
            up.handler = up.source = None
        self.down.source = None
        # Every byte given to the refused stream was credited when it was written or
        # dropped (and _pending is empty while a stream is open: _open took it all), so
        # the replay is sent without crediting the caller twice.
        self._pending = [(data, end, True) for data, end in self._replay]
        log.debug("retrying a refused stream to %s", self.fwd.upstream.address)
        self.start()
        return True

    def _open(self, conn: H2Connection) -> None:
        up = conn.open_stream(self)
        self.up = up
        up.source, self.down.source = self.down, up
        req = self.request
        head = _request_head(self.scheme, req.path, self.fwd.upstream.address, req.content_type)
        fields: Fields = []
        if self.deadline is not None:
            left = self.deadline - self._loop.time()
            fields.append((b"grpc-timeout", wire.format_timeout(max(left, 0.001)).encode()))
        if req.encoding is not None:
            fields.append((b"grpc-encoding", req.encoding))
        if req.accept_encoding is not None:
            fields.append((b"grpc-accept-encoding", req.accept_encoding))
        fields += wire.metadata_fields(self.fwd.headers)
        up.send_headers(SplitBlock(head, fields), False)
        pending, self._pending = self._pending, []
        for data, end, credited in pending:
            up.send_data(data, end, credited=credited)

    # -- StreamHandler --------------------------------------------------------------------

    def on_data(self, stream: Stream, data: bytes, end: bool) -> None:
        if stream is self.down:
            over = self.request_meter.feed(data)
            if over is not None:
                stream.conn.credit(stream, len(data))
                self.fail(Code.RESOURCE_EXHAUSTED, _too_large("request", over, self))
            else:
                self._send_up(data, end)
            return
        over = self.response_meter.feed(data)
        if not self.headers_out or over is not None:
            stream.conn.credit(stream, len(data))
            if over is not None:
                self.fail(Code.RESOURCE_EXHAUSTED, _too_large("response", over, self))
            else:
                self.fail(Code.INTERNAL, _details("upstream sent DATA before headers"))
            return
        self.down.send_data(data, False)
        if end:
            self.fail(Code.INTERNAL, _details("upstream ended the stream without a status"))

    def on_headers(self, stream: Stream, headers: RawHeaders, size: int, end: bool) -> None:
        if stream is self.down:  # request trailers: gRPC has none; take them as the end
            self._send_up(b"", True)
            return
        if size > self.max_header_bytes:
            self.fail(
                Code.RESOURCE_EXHAUSTED,
                format_details(
                    "limit_exceeded",
                    f"response header list of {size} bytes exceeds the limit of "
                    f"{self.max_header_bytes}",
                ),
            )
            return
        try:
            resp = wire.parse_response(headers, trailers=self.headers_in)
        except wire.Malformed as e:
            self.fail(Code.INTERNAL, _details(f"malformed response from upstream: {e}"))
            return
        if not self.headers_in:
            self.headers_in = True
            self._replay = None  # the upstream has answered: no retry from here on
            if resp.status != 200:
                self.fail(
                    wire.status_of_http(resp.status or 0),
                    _details(f"upstream answered HTTP {resp.status}"),
                )
                return
            if not end:
                metadata = self.fwd.observer.response_headers(resp.metadata)
                if metadata is resp.metadata:  # kept as it is (the usual case): shared
                    self.down.send_headers(wire.headers_out(resp), False)
                else:
                    self.down.send_headers(wire.response_fields(resp, metadata), False)
                self.headers_out = True
                return
        elif not end:
            self.fail(Code.INTERNAL, _details("upstream sent a second header block"))
            return
        self._status(resp)

    def on_reset(self, stream: Stream, code: int, reason: str) -> None:
        if self.done:
            return
        if stream is self.down:
            self.fail(Code.CANCELLED, "cancelled by the caller")
        elif code == CONNECTION_LOST:
            self._unreachable(reason)
        elif code == ErrorCode.REFUSED_STREAM and self._retry():
            return
        else:
            self.fail(wire.status_of_reset(code), _details(f"upstream stream {reason}"))

    # -- ending ---------------------------------------------------------------------------

    def _status(self, resp: wire.Response) -> None:
        """The upstream's trailers (or trailers-only answer): the call's status."""
        code = wire.grpc_code(resp.grpc_status)
        details = resp.grpc_message
        explained = False
        if code is Code.UNAVAILABLE and self.fwd.explain_unavailable is not None:
            explanation = self.fwd.explain_unavailable()
            if explanation is not None:
                code, details = explanation
                explained = True
        metadata = self.fwd.observer.response_headers(resp.metadata)
        if self.headers_out and not explained and metadata is resp.metadata:
            # Its own status, message and metadata (the usual case): shared fields.
            self._end_down(wire.trailers_out(resp))
            self._end(code, details)
            return
        if self.headers_out:
            fields = wire.status_fields(code, details, metadata, resp.details_bin)
        else:
            fields = trailers_only(code, details, metadata, resp.details_bin)
        self._end_down(fields)
        self._end(code, details)

    def _unreachable(self, why: str) -> None:
        code, details = (
            Code.UNAVAILABLE,
            format_details(
                "upstream_unavailable", f"cannot reach {self.fwd.upstream.address}: {why}"
            ),
        )
        if self.fwd.explain_unavailable is not None:
            code, details = self.fwd.explain_unavailable() or (code, details)
        self.fail(code, details)

    def expired(self) -> None:
        """`Deadlines`: the call's deadline has passed."""
        self._slot = None
        self.fail(Code.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def abort(self, code: Code, details: str) -> None:
        """CallControl: end the call now with this status (revocation)."""
        self.fail(code, details)

    def fail(self, code: Code, details: str) -> None:
        """End the call with a status of our own: the caller gets it, the upstream a reset."""
        if self.done:
            return
        self.down.discard()  # queued response bytes must not delay the status
        headers_out = self.headers_out
        self._end_down(
            wire.status_fields(code, details) if headers_out else trailers_only(code, details)
        )
        self._end(code, details)

    def _end_down(self, fields: Block) -> None:
        down = self.down
        down.handler = None
        down.send_headers(fields, True)
        if not down.remote_done:
            down.send_reset(ErrorCode.NO_ERROR)
        up = self.up
        if up is not None:
            up.handler = None
            if not up.closed:
                up.reset_now(ErrorCode.CANCEL)

    def _end(self, code: Code, details: str) -> None:
        self.done = True
        control = self._control
        if control is not None:
            control.call = self._control = None
        if self._pending:
            held = sum(len(data) for data, _, credited in self._pending if not credited)
            self._pending = []
            if held:
                self.down.conn.credit(self.down, held)
        self._replay = None
        if self._slot is not None:
            self._deadlines.remove(self._slot, self)
            self._slot = None
        if self._task is not None and not self._task.done():
            self._task.cancel()
        try:
            self.fwd.observer.finished(code, details)
        except Exception:
            log.exception("call observer failed")


def _details(message: str) -> str:
    return format_details("upstream_protocol", message)


def _too_large(what: str, size: int, call: Call) -> str:
    return format_details(
        "limit_exceeded",
        f"{what} message of {size} bytes exceeds the limit of {call.request_meter.limit}",
    )
