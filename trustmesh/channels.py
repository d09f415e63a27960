"""gRPC client channels to SPIFFE-identified servers (the registry, peers).

A channel dials a `TlsBridge` unix socket; the bridge does the TLS and checks the
server's exact SPIFFE ID. Channels are pooled per (address, expected ID) and swapped
for new ones when the credentials change.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc

from trustmesh.grpc_tls import channel_options
from trustmesh.limits import DEFAULT_LIMITS, Limits
from trustmesh.spiffe_id import SpiffeId
from trustmesh.tls_bridge import TlsBridge
from trustmesh.x509svid import BundleSet, X509Svid

__all__ = ["MeshChannels"]


class MeshChannels:
    def __init__(
        self,
        credentials: Callable[[], tuple[X509Svid | None, BundleSet | None]],
        *,
        limits: Limits = DEFAULT_LIMITS,
        directory: Path | None = None,
        receive_bytes: int | None = None,
    ) -> None:
        self._bridge = TlsBridge(credentials, directory=directory)
        self._limits = limits
        self._receive_bytes = receive_bytes
        self._channels: dict[tuple[str, SpiffeId | None, int], grpc.aio.Channel] = {}
        self.generation = 0

    async def get(self, address: str, expected_id: SpiffeId | None) -> grpc.aio.Channel:
        key = (address, expected_id, self.generation)
        channel = self._channels.get(key)
        if channel is None:
            target = await self._bridge.target(address, expected_id)
            options = channel_options(self._limits, receive_bytes=self._receive_bytes)
            channel = grpc.aio.insecure_channel(target, options=options)
            self._channels[key] = channel
        return channel

    def explain(self, address: str, expected_id: SpiffeId | None) -> str | None:
        err = self._bridge.last_error(address, expected_id)
        return err.message if err else None

    async def rotate(self) -> None:
        """Credentials changed: new calls use new channels (new handshakes)."""
        self.generation += 1
        old = [k for k in self._channels if k[2] != self.generation]
        for k in old:
            await self._channels.pop(k).close(grace=5.0)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        await self._bridge.close()
