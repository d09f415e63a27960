"""One error hierarchy for the whole mesh.

Three families, kept apart because callers handle them differently:

* `PeerError`: the remote side did something wrong (bad certificate, denied call,
  bad token). Safe to report to that peer.
* `LocalError`: this process can't do its job right now (no SVID yet, registry away).
* `ConfigError`: an operator's input is wrong (flags, files, YAML). Fix and retry.

Every error carries a `Code` (our mirror of the gRPC status codes, so that nothing in
the trust core imports grpc) and a stable `reason` code. `trustmesh.grpc_status` is
the one place where these become `grpc.StatusCode`s. Messages never contain keys,
tokens or other secrets.
"""

from __future__ import annotations

import enum

__all__ = [
    "AccessDeniedError",
    "BootstrapError",
    "Code",
    "ConfigError",
    "CredentialError",
    "InvalidSpiffeIdError",
    "LimitExceededError",
    "LocalError",
    "ManifestError",
    "MeshError",
    "NotFoundError",
    "PeerAuthenticationError",
    "PeerError",
    "RegistryUnavailableError",
]

DETAILS_PREFIX = "trustmesh"


class Code(enum.Enum):
    """gRPC status codes by name; mapped to `grpc.StatusCode` in `trustmesh.grpc_status`."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


def format_details(reason: str, message: str) -> str:
    """The gRPC status details: the stable reason code first, then the human text."""
    return f"{DETAILS_PREFIX}: {reason}: {message}"


def parse_details(details: str) -> tuple[str, str] | None:
    """Inverse of `format_details`; None for details that TrustMesh didn't write."""
    prefix = DETAILS_PREFIX + ": "
    if not details.startswith(prefix):
        return None
    reason, _, message = details[len(prefix) :].partition(": ")
    return reason, message


class MeshError(Exception):
    code: Code = Code.INTERNAL
    reason: str = "internal"

    def __init__(self, message: str, *, reason: str | None = None, code: Code | None = None):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        if code is not None:
            self.code = code

    def details(self) -> str:
        return format_details(self.reason, self.message)


# -- peer faults --------------------------------------------------------------------


class PeerError(MeshError):
    code = Code.PERMISSION_DENIED
    reason = "peer_error"


class PeerAuthenticationError(PeerError):
    """The peer's certificate chain or identity did not verify."""

    code = Code.UNAUTHENTICATED
    reason = "peer_unauthenticated"


class AccessDeniedError(PeerError):
    """A policy decision denied the call; `reason` is the decision's reason code."""

    code = Code.PERMISSION_DENIED
    reason = "denied"


class BootstrapError(PeerError):
    code = Code.PERMISSION_DENIED
    reason = "join_token_invalid"


class LimitExceededError(PeerError):
    code = Code.RESOURCE_EXHAUSTED
    reason = "limit_exceeded"


class NotFoundError(PeerError):
    code = Code.NOT_FOUND
    reason = "not_found"


# -- local faults -------------------------------------------------------------------


class LocalError(MeshError):
    code = Code.UNAVAILABLE
    reason = "unavailable"


class CredentialError(LocalError):
    reason = "no_credentials"


class RegistryUnavailableError(LocalError):
    reason = "registry_unavailable"


# -- operator input -----------------------------------------------------------------


class ConfigError(MeshError):
    code = Code.INVALID_ARGUMENT
    reason = "invalid_config"


class InvalidSpiffeIdError(ConfigError, ValueError):
    reason = "invalid_spiffe_id"


class ManifestError(ConfigError):
    """A resource document is wrong. The message names the source and the field."""

    reason = "invalid_manifest"

    def __init__(self, source: str, field: str, problem: str):
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {problem}")
        self.source = source
        self.field = field
        self.problem = problem
