"""One HTTP/2 stream: its flow-control windows and its ordered send queue.

Everything a stream sends (headers, DATA, trailers) goes through one queue in order,
so trailers can never overtake DATA still waiting for window, and HPACK encoding
happens when a block is written (the peer's decoder sees blocks in encoding order).

Flow control is end to end. A relayed DATA payload counts against the window of the
connection it arrived on until it has been written out on the other side; only then
is `source` (the stream it came from) credited, which sends WINDOW_UPDATEs. So a slow
reader on one side stops the writer on the other, and what the engine holds per
connection is bounded by the windows it grants (`H2Config`). Bytes dropped from a
queue are credited too, so a cancelled stream never leaks window. DATA sent again
(`credited=True`: a request replayed on a new stream after the first was refused)
was credited the first time and is never credited twice.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from trustmesh_sidecar.h2.hpack_cache import RawHeaders, SplitBlock

if TYPE_CHECKING:
    from trustmesh_sidecar.h2.connection import H2Connection

__all__ = ["Block", "Fields", "SplitBlock", "Stream", "StreamHandler"]

_HEADERS, _DATA, _RESET, _REPLAYED = 0, 1, 2, 3

Fields = list[tuple[bytes, bytes]]


# A header block to send: a list built for one call, a tuple that is sent again and
# again (its encoding is then remembered: `HeaderEncoder`), or both in a `SplitBlock`.
Block = Sequence[tuple[bytes, bytes]] | SplitBlock


class StreamHandler(Protocol):
    def on_headers(self, stream: Stream, headers: RawHeaders, size: int, end: bool) -> None: ...

    def on_data(self, stream: Stream, data: bytes, end: bool) -> None: ...

    def on_reset(self, stream: Stream, code: int, reason: str) -> None:
        """The stream ended abnormally: RST_STREAM either way, GOAWAY or connection loss."""
        ...


class Stream:
    __slots__ = (
        "conn",
        "handler",
        "id",
        "local_done",
        "outq",
        "recv_window",
        "remote_done",
        "send_window",
        "source",
        "unacked",
    )

    def __init__(
        self, conn: H2Connection, stream_id: int, send_window: int, recv_window: int
    ) -> None:
        self.conn = conn
        self.id = stream_id
        self.handler: StreamHandler | None = None
        self.send_window = send_window
        self.recv_window = recv_window
        self.unacked = 0  # bytes consumed but not yet returned by WINDOW_UPDATE
        self.outq: deque[tuple[int, object, bool]] = deque()
        self.local_done = False  # we sent END_STREAM or RST_STREAM
        self.remote_done = False  # the peer did
        # The stream whose DATA this one sends: credited as the bytes go out.
        self.source: Stream | None = None

    @property
    def closed(self) -> bool:
        return self.local_done and self.remote_done

    # -- sending ----------------------------------------------------------------------

    # With nothing queued, `send_*` write at once what `flush` would write first (the
    # common case); anything else goes through the queue.

    def send_headers(self, fields: Block, end: bool) -> None:
        conn = self.conn
        if self.local_done or conn.closed:
            return
        if self.outq:
            self.outq.append((_HEADERS, fields, end))
            return
        conn.write_headers(self.id, fields, end)
        if end:
            self._ended()

    def send_data(self, data: bytes, end: bool, *, credited: bool = False) -> None:
        conn = self.conn
        if self.local_done or conn.closed:
            if not credited:
                self._credit_source(len(data))
            return
        n = len(data)
        if (
            not self.outq
            and not conn.paused
            and n <= self.send_window
            and n <= conn.send_window
            and n <= conn.peer_max_frame
        ):
            self.send_window -= n
            conn.send_window -= n
            conn.write_data(self.id, data, end)
            if n and not credited:
                self._credit_source(n)
            if end:
                self._ended()
            return
        self.outq.append((_REPLAYED if credited else _DATA, data, end))
        if len(self.outq) == 1:
            self.flush()

    def _ended(self) -> None:
        self.local_done = True
        if self.remote_done:
            self.conn.stream_closed(self)

    def send_reset(self, code: int) -> None:
        """RST_STREAM after whatever is queued (e.g. trailers, then NO_ERROR)."""
        if self.local_done and self.remote_done:
            return
        self.outq.append((_RESET, code, True))
        if len(self.outq) == 1:
            self.flush()

    def reset_now(self, code: int) -> None:
        """RST_STREAM now, dropping what is queued."""
        if self.closed:
            return
        self.discard()
        self.conn.write_reset(self.id, code)
        self.local_done = self.remote_done = True
        self.conn.stream_closed(self)

    def flush(self) -> None:
        """Write what the windows allow, in order; stop at the first item that can't go."""
        conn = self.conn
        q = self.outq
        while q:
            kind, payload, end = q[0]
            if kind in (_DATA, _REPLAYED):
                assert isinstance(payload, bytes)
                n = len(payload)
                if n:
                    if conn.paused:
                        conn.block(self)
                        return
                    room = min(self.send_window, conn.send_window, conn.peer_max_frame)
                    if room <= 0:
                        if conn.send_window <= 0:
                            conn.block(self)
                        return  # else: resumes on this stream's WINDOW_UPDATE
                    if n > room:
                        q[0] = (kind, payload[room:], end)
                        payload, n, end = payload[:room], room, False
                    else:
                        q.popleft()
                    self.send_window -= n
                    conn.send_window -= n
                else:
                    q.popleft()
                conn.write_data(self.id, payload, end)
                if n and kind == _DATA:
                    self._credit_source(n)
            elif kind == _HEADERS:
                q.popleft()
                assert isinstance(payload, (list, tuple))
                conn.write_headers(self.id, payload, end)
            else:
                q.popleft()
                assert isinstance(payload, int)
                self.discard()
                conn.write_reset(self.id, payload)
                self.remote_done = True
            if end:
                self._ended()
                return

    def discard(self) -> None:
        """Drop everything queued, crediting the source for the DATA bytes in it."""
        dropped = sum(len(p) for k, p, _ in self.outq if k == _DATA and isinstance(p, bytes))
        self.outq.clear()
        if dropped:
            self._credit_source(dropped)

    def _credit_source(self, n: int) -> None:
        src = self.source
        if src is not None and n:
            src.conn.credit(src, n)
