"""Reserved metadata: what the sidecar accepts, drops and sets (pure functions).

| direction              | keys kept                                                     |
|------------------------|---------------------------------------------------------------|
| from the agent         | trustmesh-target, trustmesh-delegation-bin, trustmesh-user-token |
| from a peer            | trustmesh-delegation-bin                                      |
| set for the app        | trustmesh-caller, trustmesh-delegation-bin, trustmesh-origin, trustmesh-chain |

Every other `trustmesh-*` key, in any letter case, is dropped, and so are the HTTP/2
and gRPC transport headers that grpc sets itself. The delegation keys are never
passed through as received: the outbound sidecar replaces the agent's chain with the
one it extended and signed, and the inbound sidecar hands the app only a chain it
verified. A user token that the sidecar verified goes no further than that sidecar.
"""

from __future__ import annotations

from collections.abc import Iterable

from trustmesh_sidecar.engine import Header, Headers

__all__ = [
    "CALLER",
    "DELEGATION",
    "TARGET",
    "USER_TOKEN",
    "bearer_token",
    "for_app",
    "for_peer",
    "kept",
    "strip_reserved",
    "value_of",
]

PREFIX = "trustmesh-"
TARGET = "trustmesh-target"
CALLER = "trustmesh-caller"
DELEGATION = "trustmesh-delegation-bin"
USER_TOKEN = "trustmesh-user-token"  # noqa: S105 (a header name)

# Set by grpc itself; forwarding them as metadata would be rejected or wrong.
_TRANSPORT = frozenset(
    {
        "content-type",
        "te",
        "user-agent",
        "host",
        "grpc-timeout",
        "grpc-encoding",
        "grpc-accept-encoding",
        "grpc-status",
        "grpc-message",
        "grpc-status-details-bin",
        "grpc-previous-rpc-attempts",
        "grpc-retry-pushback-ms",
        "grpc-tags-bin",
        "grpc-trace-bin",
        "accept-encoding",
        "content-length",
    }
)


def _is_transport(key: str) -> bool:
    return key.startswith(":") or key in _TRANSPORT


# Whether a key (as received, any case) is dropped: memoized, since the same few keys
# arrive on every call. Bounded: keys are the caller's choice, so past the bound the
# answer is computed without being remembered.
_DROPPED: dict[str, bool] = {}
_DROPPED_MAX = 1024


def _dropped(key: str) -> bool:
    dropped = _DROPPED.get(key)
    if dropped is None:
        low = key.lower()
        dropped = low.startswith(PREFIX) or _is_transport(low)
        if len(_DROPPED) < _DROPPED_MAX:
            _DROPPED[key] = dropped
    return dropped


def value_of(headers: Iterable[Header], key: str) -> str | bytes | None:
    """The first value of `key` (lower case), matching names in any case."""
    for k, v in headers:
        if k == key or k.lower() == key:
            return v
    return None


def strip_reserved(headers: Iterable[Header]) -> list[Header]:
    """Drop every trustmesh-* key (any case) and transport headers."""
    return [(k, v) for k, v in headers if not _dropped(k)]


def kept(headers: Headers) -> Headers:
    """`strip_reserved` as a tuple: `headers` itself when nothing is dropped."""
    for k, _ in headers:
        if _dropped(k):
            return tuple(strip_reserved(headers))
    return headers


AUTHORIZATION = "authorization"


def for_peer(
    agent_headers: Headers, chain: bytes | None, *, drop_authorization: bool
) -> list[Header]:
    """Headers from the agent, as sent on to the callee's sidecar, with our chain."""
    out = strip_reserved(agent_headers)
    if drop_authorization:  # the bearer token was ours to verify; it stops here
        out = [(k, v) for k, v in out if k.lower() != AUTHORIZATION]
    if chain is not None:
        out.append((DELEGATION, chain))
    return out


def for_app(peer_headers: Headers, caller: str, chain: Iterable[Header] = ()) -> list[Header]:
    """Headers from a peer, as handed to the local app, with the verified chain."""
    out = strip_reserved(peer_headers)
    out.append((CALLER, caller))
    out.extend(chain)
    return out


def bearer_token(headers: Iterable[Header]) -> str | None:
    """The token of an `authorization: Bearer ...` header, if there is one."""
    value = value_of(headers, AUTHORIZATION)
    if isinstance(value, str) and value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None
