"""Every bound of the frame-level engine, in one frozen value derived from `Limits`."""

from __future__ import annotations

from dataclasses import dataclass

from trustmesh.limits import Limits

__all__ = ["H2Config"]


@dataclass(frozen=True, slots=True)
class H2Config:
    # Per call (from Limits): the soft header-list limit answered with RESOURCE_EXHAUSTED,
    # the gRPC message limit, and SETTINGS_MAX_CONCURRENT_STREAMS.
    max_header_list_bytes: int = 16 * 1024
    max_message_bytes: int = 4 * 1024 * 1024
    max_concurrent_streams: int = 256
    # Past these a header block is a connection error: the HPACK state can't be trusted.
    max_header_block_bytes: int = 256 * 1024
    max_continuation_frames: int = 32
    # Frames we accept (our SETTINGS_MAX_FRAME_SIZE; the RFC default).
    max_frame_size: int = 16_384
    # Receive windows we grant: per stream, and per connection (bounds the bytes a
    # connection can make us hold for a slow reader on the other side).
    stream_window: int = 1 << 20
    connection_window: int = 4 << 20
    # Rapid reset (CVE-2023-44487): RST_STREAMs from the peer, as a token bucket.
    reset_burst: int = 200
    reset_rate: float = 100.0
    # PING, SETTINGS, PRIORITY, empty DATA and unknown frames, as a token bucket.
    control_burst: int = 1000
    control_rate: float = 500.0
    # Seconds to finish the TLS handshake, and then to send the preface and SETTINGS;
    # and for the peer to acknowledge our SETTINGS (else GOAWAY SETTINGS_TIMEOUT).
    handshake_timeout_s: float = 10.0
    preface_timeout_s: float = 10.0
    settings_ack_timeout_s: float = 10.0
    # Request bytes a call keeps to replay them on a new stream if the upstream
    # refuses the first (REFUSED_STREAM, or above a GOAWAY's last stream id), and how
    # many streams a call may try. Past the buffer the call is not retried.
    retry_buffer_bytes: int = 16 * 1024
    max_attempts: int = 3
    # Server side: after this age, GOAWAY; streams then get the grace to finish.
    max_connection_age_s: float = 300.0
    max_connection_age_grace_s: float = 600.0
    # Unsent bytes we hold for a peer that stopped reading, before dropping it.
    max_write_buffer: int = 32 << 20

    @classmethod
    def from_limits(cls, limits: Limits) -> H2Config:
        return cls(
            max_header_list_bytes=limits.max_metadata_bytes,
            max_message_bytes=limits.max_message_bytes,
            max_concurrent_streams=limits.max_concurrent_streams,
            max_header_block_bytes=max(256 * 1024, 4 * limits.max_metadata_bytes),
            max_connection_age_s=limits.max_connection_age_s,
            max_connection_age_grace_s=limits.max_connection_age_grace_s,
        )
