"""An operator's connection to the registry: mTLS with the operator SVID.

Used by the CLI and the demo. Errors come back as `MeshError`s with the registry's
reason code; nothing above this sees a `grpc.RpcError`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import grpc

from trustmesh.channels import MeshChannels
from trustmesh.client_config import ClientConfig
from trustmesh.errors import (
    ConfigError,
    MeshError,
    PeerAuthenticationError,
    RegistryUnavailableError,
    parse_details,
)
from trustmesh.spiffe_id import SpiffeId
from trustmesh.v1 import registry_pb2_grpc as rgrpc
from trustmesh.x509svid import BundleSet, TrustBundle, X509Svid

__all__ = ["OperatorClient"]

T = TypeVar("T")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e


class OperatorClient:
    def __init__(
        self,
        svid: X509Svid,
        bundles: BundleSet,
        registry: str,
        registry_id: SpiffeId,
        *,
        config: ClientConfig | None = None,
    ) -> None:
        if svid.not_after <= datetime.now(UTC):
            raise ConfigError(
                f"the operator credential expired at {svid.not_after:%Y-%m-%d %H:%M}Z; "
                "ask an operator for a new one"
            )
        self.svid = svid
        self.bundles = bundles
        self.registry = registry
        self.registry_id = registry_id
        self.config = config

    @classmethod
    def from_config(cls, path: Path, *, registry: str | None = None) -> OperatorClient:
        cfg = ClientConfig.load(path)
        svid = X509Svid.from_pem(_read(cfg.certificate), _read(cfg.key))
        bundles = BundleSet().with_bundle(
            TrustBundle.from_pem(cfg.registry_id.trust_domain, _read(cfg.bundle))
        )
        return cls(svid, bundles, registry or cfg.registry, cfg.registry_id, config=cfg)

    @classmethod
    def from_pem(cls, credentials: Path, bundle: Path, registry: str) -> OperatorClient:
        pem = _read(credentials)
        svid = X509Svid.from_pem(pem, pem)
        td = svid.spiffe_id.trust_domain
        bundles = BundleSet().with_bundle(TrustBundle.from_pem(td, _read(bundle)))
        return cls(svid, bundles, registry, SpiffeId.parse(f"spiffe://{td}/trustmesh/registry"))

    async def call(self, fn: Callable[[rgrpc.RegistryStub], Awaitable[T]]) -> T:
        channels = MeshChannels(lambda: (self.svid, self.bundles))
        try:
            stub = rgrpc.RegistryStub(await channels.get(self.registry, self.registry_id))
            try:
                return await fn(stub)
            except grpc.aio.AioRpcError as e:
                explained = channels.explain(self.registry, self.registry_id)
                if explained:
                    raise PeerAuthenticationError(
                        f"registry at {self.registry}: {explained}"
                    ) from e
                raise _from_rpc(e, self.registry) from e
        finally:
            await channels.close()


def _from_rpc(e: grpc.aio.AioRpcError, registry: str) -> MeshError:
    parsed = parse_details(e.details() or "")
    if parsed is not None:
        return MeshError(parsed[1], reason=parsed[0])
    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return RegistryUnavailableError(f"cannot reach the registry at {registry}: {e.details()}")
    return MeshError(f"{e.code().name}: {e.details()}")
