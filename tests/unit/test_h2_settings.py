"""SETTINGS acknowledgement (RFC 9113 6.5.3): a peer that never acknowledges our
SETTINGS gets GOAWAY(SETTINGS_TIMEOUT) and the connection closes, in either role; one
that does keeps its connection. Over an in-memory transport, with a short timeout."""

from __future__ import annotations

import asyncio

import pytest
from h2_memory import MemoryTransport

from trustmesh_sidecar.h2 import frames as f
from trustmesh_sidecar.h2.config import H2Config
from trustmesh_sidecar.h2.connection import H2Connection
from trustmesh_sidecar.h2.frames import ErrorCode

TIMEOUT = 0.05


def goaway_codes(out: bytes, *, client: bool) -> list[int]:
    events = f.FrameDecoder(expect_preface=client).feed(out)  # a client's bytes start with it
    return [ev.code for ev in events if isinstance(ev, f.GoAwayFrame)]


def peer_settings(*, ack: bool) -> bytes:
    data = f.settings_frame({})
    return data + f.settings_frame(ack=True) if ack else data


@pytest.mark.parametrize("client", [True, False], ids=["client", "server"])
@pytest.mark.parametrize("ack", [False, True], ids=["never-acked", "acked"])
async def test_unacknowledged_settings_close_the_connection(client: bool, ack: bool) -> None:
    conn = H2Connection(
        H2Config(settings_ack_timeout_s=TIMEOUT), client=client, on_request=lambda *a: None
    )
    transport = MemoryTransport()
    conn.connection_made(transport)
    conn.data_received((b"" if client else f.PREFACE) + peer_settings(ack=ack))
    await asyncio.sleep(TIMEOUT * 3)
    await asyncio.sleep(0)  # the flush of what the timer wrote
    codes = goaway_codes(bytes(transport.out), client=client)
    if ack:
        assert codes == []
        assert not conn.closed and not transport.closing
    else:
        assert codes == [ErrorCode.SETTINGS_TIMEOUT]
        assert conn.closed and transport.closing


async def test_a_late_ack_is_in_time_until_the_timer_fires() -> None:
    conn = H2Connection(H2Config(settings_ack_timeout_s=TIMEOUT * 2), client=True)
    transport = MemoryTransport()
    conn.connection_made(transport)
    conn.data_received(peer_settings(ack=False))
    await asyncio.sleep(TIMEOUT)
    conn.data_received(f.settings_frame(ack=True))
    await asyncio.sleep(TIMEOUT * 3)
    assert goaway_codes(bytes(transport.out), client=True) == []
    assert not conn.closed
