"""The floor of any Python proxy pair here: an asyncio byte relay, with TLS between.

A relay process accepts TCP connections and copies bytes to and from one upstream
connection per accepted one: no HTTP/2, no gRPC, no policy, nothing parsed. Role
"outer" listens in plaintext and dials upstream over mutual TLS (asyncio's `ssl`
transport, as the sidecar's frame-level engine uses); "inner" listens with mutual
TLS and dials upstream in plaintext. The client's HTTP/2 connection then runs end
to end through the pair, so what it costs over a direct call is only what two Python
event loops take to wake up, read, (de)crypt and write, four times per call.
`bench.grpc_floor` runs it as the `relay-tls` path.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import cast

__all__ = ["relay"]


class _Pipe(asyncio.Protocol):
    """One side of a relayed connection; `peer` is the other side's transport."""

    def __init__(self, on_made: Callable[[_Pipe], None] | None = None) -> None:
        self.on_made = on_made
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check: uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        if self.on_made is not None:
            self.on_made(self)

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)
        else:
            self.peer.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()

    def attach(self, peer: asyncio.Transport) -> None:
        self.peer = peer
        for data in self.early:
            peer.write(data)
        self.early.clear()


def _contexts(tls_dir: Path, role: str) -> ssl.SSLContext:
    if role == "outer":
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls_dir / "ca.pem")
        ctx.check_hostname = False  # the bench's own CA; the certificate is still verified
    else:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls_dir / "ca.pem")
        ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(tls_dir / f"{role}.pem", tls_dir / f"{role}.key")
    ctx.set_alpn_protocols(["h2"])
    return ctx


async def relay(listen: str, upstream: str, tls_dir: Path, role: str) -> None:
    """Serve until stdin closes; prints `listening HOST:PORT` once ready."""
    loop = asyncio.get_running_loop()
    ctx = _contexts(tls_dir, role)
    dialing: set[asyncio.Task[None]] = set()
    up_host, up_port = upstream.rsplit(":", 1)

    async def dial(down: _Pipe) -> None:
        up = _Pipe()
        try:
            await loop.create_connection(
                lambda: up, up_host, int(up_port), ssl=ctx if role == "outer" else None
            )
        except OSError:
            if down.transport is not None:
                down.transport.close()
            return
        assert up.transport is not None and down.transport is not None
        up.attach(down.transport)
        down.attach(up.transport)

    def accepted() -> _Pipe:
        # connection_made comes after the TLS handshake on the inner side; dial then.
        def made(down: _Pipe) -> None:
            task = loop.create_task(dial(down))
            dialing.add(task)
            task.add_done_callback(dialing.discard)

        return _Pipe(made)

    host, port = listen.rsplit(":", 1)
    server = await loop.create_server(
        accepted, host, int(port), ssl=ctx if role == "inner" else None
    )
    bound = server.sockets[0].getsockname()
    print(f"listening {bound[0]}:{bound[1]}", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until EOF
    server.close()
