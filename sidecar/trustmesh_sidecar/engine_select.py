"""Choose the forwarding engine by name (`SidecarConfig.engine`).

| name   | engine                                  | ADR  |
|--------|-----------------------------------------|------|
| `grpc` | `GrpcEngine`, grpc.aio + the TLS bridge  | 0006 |
| `h2`   | `H2Engine`, HTTP/2 frames on Python ssl | 0009 |

Both implement `trustmesh_sidecar.engine.Engine` and take the same arguments; each
engine's module is imported only when it is chosen. The default is `h2`: about half
the latency and three times the throughput of `grpc` (ADR 0009, `python -m
bench.grpc_floor`), with the same behaviour under the same integration suite.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from trustmesh.errors import ConfigError
from trustmesh.limits import DEFAULT_LIMITS, Limits
from trustmesh.x509svid import BundleSet, X509Svid

if TYPE_CHECKING:
    from trustmesh_sidecar.grpc_engine import GrpcEngine
    from trustmesh_sidecar.h2.engine import H2Engine

__all__ = ["DEFAULT_ENGINE", "ENGINES", "build"]

ENGINES = ("grpc", "h2")
DEFAULT_ENGINE = "h2"


def build(
    name: str,
    svid: X509Svid,
    bundles: BundleSet,
    *,
    limits: Limits = DEFAULT_LIMITS,
    bridge_dir: Path | None = None,
) -> GrpcEngine | H2Engine:
    """The engine called `name`, built for this SVID and these bundles."""
    if name == "grpc":
        from trustmesh_sidecar.grpc_engine import GrpcEngine

        return GrpcEngine(svid, bundles, limits=limits, bridge_dir=bridge_dir)
    if name == "h2":
        from trustmesh_sidecar.h2.engine import H2Engine

        return H2Engine(svid, bundles, limits=limits, bridge_dir=bridge_dir)
    raise ConfigError(f"unknown engine {name!r}: choose one of {', '.join(ENGINES)}")
