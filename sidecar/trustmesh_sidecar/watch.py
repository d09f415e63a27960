"""The sidecar's watch stream to the registry.

The registry sends a full snapshot, then deltas stamped (epoch, revision). A delta
that doesn't follow what we hold (lost update, new registry epoch) makes us reconnect
and resume from our revision; the registry answers with the missing deltas or a full
snapshot. Through a registry outage the last good snapshot keeps serving (fail
static) and we reconnect with jittered exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
import random

import grpc

from trustmesh.channels import MeshChannels
from trustmesh.spiffe_id import SpiffeId
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.v1 import registry_pb2_grpc as rgrpc
from trustmesh_sidecar.state import SidecarState

__all__ = ["watch_forever"]

log = logging.getLogger(__name__)


async def watch_forever(
    state: SidecarState,
    channels: MeshChannels,
    *,
    registry: str,
    registry_id: SpiffeId,
    instance_id: str,
    advertise: str,
    max_backoff: float = 5.0,
) -> None:
    backoff = 0.1
    while True:
        try:
            stub = rgrpc.RegistryStub(await channels.get(registry, registry_id))
            snapshot = state.snapshot
            call = stub.Watch(
                rpb.WatchRequest(
                    instance_id=instance_id,
                    inbound_address=advertise,
                    epoch=snapshot.epoch,
                    revision=snapshot.revision,
                )
            )
            async for update in call:
                state.registry_connected = True
                backoff = 0.1
                if not state.snapshot.apply(update):
                    log.info(
                        "update %s/%s does not follow %s/%s; resyncing",
                        update.epoch[:8],
                        update.revision,
                        snapshot.epoch[:8],
                        snapshot.revision,
                    )
                    call.cancel()
                    break
                state.snapshot_applied()
            else:
                log.warning("registry ended the watch stream; reconnecting")
        except grpc.aio.AioRpcError as e:
            if state.registry_connected or backoff >= max_backoff:
                reason = channels.explain(registry, registry_id) or e.details()
                log.warning(
                    "registry watch failed (%s: %s); keeping the last snapshot",
                    e.code().name,
                    reason,
                )
        state.registry_connected = False
        await asyncio.sleep(backoff * (0.5 + random.random()))  # noqa: S311
        backoff = min(backoff * 2, max_backoff)
