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
    "TRANSPORT",
    "USER_TOKEN",
    "Reserved",
    "bearer_token",
    "for_app",
    "for_peer",
    "kept",
    "read",
    "strip_reserved",
    "value_of",
]

PREFIX = "trustmesh-"
TARGET = "trustmesh-target"
CALLER = "trustmesh-caller"
DELEGATION = "trustmesh-delegation-bin"
USER_TOKEN = "trustmesh-user-token"  # noqa: S105 (a header name)

# Set by grpc itself; forwarding them as metadata would be rejected or wrong. (The h2
# engine never makes them metadata in the first place: `grpc_wire`.)
TRANSPORT = frozenset(
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
    return key.startswith(":") or key in TRANSPORT


AUTHORIZATION = "authorization"

# What a key (as received, any case) is to the sidecar: a key it forwards (`_OTHER`),
# `authorization` (read, and forwarded unless the sidecar verified it), or one it
# drops: a reserved key it reads, or any other `trustmesh-*` or transport key.
# Memoized, since the same few keys arrive on every call; bounded, since keys are the
# caller's choice (past the bound the answer is computed without being remembered).
_OTHER, _AUTHORIZATION, _DROP, _TARGET, _DELEGATION, _USER_TOKEN = range(6)
_READ = {TARGET: _TARGET, DELEGATION: _DELEGATION, USER_TOKEN: _USER_TOKEN}
_KINDS: dict[str, int] = {}
_KINDS_MAX = 1024


def _kind(key: str) -> int:
    kind = _KINDS.get(key)
    if kind is None:
        low = key.lower()
        kind = _READ.get(low)
        if kind is None and low == AUTHORIZATION:
            kind = _AUTHORIZATION
        elif kind is None:
            kind = _DROP if low.startswith(PREFIX) or _is_transport(low) else _OTHER
        if len(_KINDS) < _KINDS_MAX:
            _KINDS[key] = kind
    return kind


def _dropped(key: str) -> bool:
    return _kind(key) >= _DROP


class Reserved:
    """A call's headers read in one pass: the first value of each reserved key the
    sidecar reads (matched in any case, as `value_of` does), and what `strip_reserved`
    keeps, in order."""

    __slots__ = ("authorization", "delegation", "kept", "target", "user_token")

    def __init__(self) -> None:
        self.target: str | bytes | None = None
        self.delegation: str | bytes | None = None
        self.user_token: str | bytes | None = None
        self.authorization: str | bytes | None = None
        self.kept: list[Header] = []

    def bearer_token(self) -> str | None:
        """As `bearer_token`: the token of an `authorization: Bearer ...` header."""
        return _bearer(self.authorization)


def read(headers: Iterable[Header]) -> Reserved:
    """A call's headers in one pass (`Reserved`)."""
    out = Reserved()
    kept = out.kept
    kinds = _KINDS
    for header in headers:
        key = header[0]
        kind = kinds.get(key)
        if kind is None:
            kind = _kind(key)
        if kind == _OTHER:
            kept.append(header)
        elif kind == _DROP:
            continue
        elif kind == _TARGET:
            if out.target is None:
                out.target = header[1]
        elif kind == _DELEGATION:
            if out.delegation is None:
                out.delegation = header[1]
        elif kind == _USER_TOKEN:
            if out.user_token is None:
                out.user_token = header[1]
        else:  # authorization: read, and forwarded unless the sidecar verified it
            kept.append(header)
            if out.authorization is None:
                out.authorization = header[1]
    return out


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


def for_peer(agent: Reserved, chain: bytes | None, *, drop_authorization: bool) -> list[Header]:
    """Headers from the agent (`read`), as sent on to the callee's sidecar, with our
    chain. `agent.kept` becomes part of the result."""
    out = agent.kept
    if drop_authorization:  # the bearer token was ours to verify; it stops here
        out = [(k, v) for k, v in out if k.lower() != AUTHORIZATION]
    if chain is not None:
        out.append((DELEGATION, chain))
    return out


def for_app(peer: Reserved, caller: str, chain: Iterable[Header] = ()) -> list[Header]:
    """Headers from a peer (`read`), as handed to the local app, with the verified
    chain. `peer.kept` becomes part of the result."""
    out = peer.kept
    out.append((CALLER, caller))
    out.extend(chain)
    return out


def _bearer(value: str | bytes | None) -> str | None:
    if isinstance(value, str) and value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None


def bearer_token(headers: Iterable[Header]) -> str | None:
    """The token of an `authorization: Bearer ...` header, if there is one."""
    return _bearer(value_of(headers, AUTHORIZATION))
