"""The one place where TrustMesh errors become gRPC status codes, and back."""

from __future__ import annotations

import grpc

from trustmesh.errors import Code, MeshError

__all__ = ["from_grpc", "status_of", "to_grpc"]

_TO_GRPC: dict[Code, grpc.StatusCode] = {c: grpc.StatusCode[c.name] for c in Code}
_FROM_GRPC: dict[grpc.StatusCode, Code] = {v: k for k, v in _TO_GRPC.items()}


def to_grpc(code: Code) -> grpc.StatusCode:
    return _TO_GRPC[code]


def from_grpc(code: grpc.StatusCode) -> Code:
    return _FROM_GRPC.get(code, Code.UNKNOWN)


def status_of(error: MeshError) -> tuple[grpc.StatusCode, str]:
    return _TO_GRPC[error.code], error.details()
