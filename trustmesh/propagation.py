"""Helpers for Python agents: carry the delegation chain and trace context onward.

An agent that serves a call and then calls other agents should forward the chain
its sidecar handed it (`trustmesh-delegation-bin`) and the W3C trace context, so
that its own sidecar can append a hop. These helpers do that without any hand-copied
metadata:

    server = grpc.aio.server(interceptors=[InboundContextInterceptor()])
    ...
    channel = sidecar_channel("planner")          # calls go to the local sidecar
    stub = PlannerStub(channel)                   # inside a handler: chain forwarded

For the A2A SDK (`a2a-sdk` >= 1.3), pass `grpc_channel_factory=a2a_channel_factory()`
in `ClientConfig`: it receives the agent card's URL and returns a channel to the local
sidecar, targeting the agent the URL names.

The helpers hold no keys and never see a bearer token beyond what the agent itself
puts in its metadata.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc

__all__ = [
    "CallerContext",
    "InboundContextInterceptor",
    "TargetInterceptor",
    "a2a_channel_factory",
    "current",
    "inbound",
    "sidecar_channel",
]

DELEGATION = "trustmesh-delegation-bin"
TARGET = "trustmesh-target"
_FORWARDED = (DELEGATION, "traceparent", "tracestate")
DEFAULT_OUTBOUND = "127.0.0.1:15001"


@dataclass(frozen=True)
class CallerContext:
    """What an incoming call carries that outgoing calls should carry on."""

    metadata: tuple[tuple[str, str | bytes], ...]
    caller: str | None = None
    origin: str | None = None


_current: contextvars.ContextVar[CallerContext | None] = contextvars.ContextVar(
    "trustmesh_caller_context", default=None
)


def current() -> CallerContext | None:
    return _current.get()


def _capture(metadata: Sequence[tuple[str, str | bytes]] | None) -> CallerContext:
    kept = tuple((k, v) for k, v in (metadata or ()) if k in _FORWARDED)
    values = dict(metadata or ())
    caller = values.get("trustmesh-caller")
    origin = values.get("trustmesh-origin")
    return CallerContext(
        kept,
        caller if isinstance(caller, str) else None,
        origin if isinstance(origin, str) else None,
    )


@contextlib.contextmanager
def inbound(context: grpc.aio.ServicerContext) -> Iterator[CallerContext]:
    """Inside a handler: make the incoming call's chain the one forwarded onward."""
    token = _current.set(_capture(context.invocation_metadata()))
    try:
        yield _current.get()  # type: ignore[misc]
    finally:
        _current.reset(token)


class InboundContextInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Server interceptor: every handler runs with its caller's context set."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        # Runs in the call's own task, so the variable is visible to the handler.
        _current.set(_capture(handler_call_details.invocation_metadata))
        return await continuation(handler_call_details)


def _with_metadata(
    details: grpc.aio.ClientCallDetails, target: str | None
) -> grpc.aio.ClientCallDetails:
    metadata = list(details.metadata or ())
    present = {k for k, _ in metadata}
    ctx = _current.get()
    if ctx is not None:
        metadata.extend((k, v) for k, v in ctx.metadata if k not in present)
    if target is not None and TARGET not in present:
        metadata.append((TARGET, target))
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class TargetInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.aio.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.aio.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.aio.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Client interceptor: names the target agent and forwards the caller's context."""

    def __init__(self, target: str | None) -> None:
        self._target = target

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_metadata(details, self._target), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_metadata(details, self._target), request)

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_metadata(details, self._target), requests)

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_metadata(details, self._target), requests)


def sidecar_channel(
    target: str,
    *,
    outbound: str | None = None,
    options: Sequence[tuple[str, Any]] = (("grpc.max_metadata_size", 32768),),
) -> grpc.aio.Channel:
    """A channel to the local sidecar that reaches `target` (agent name or SPIFFE ID)."""
    address = outbound or os.environ.get("TRUSTMESH_OUTBOUND", DEFAULT_OUTBOUND)
    return grpc.aio.insecure_channel(
        address, options=list(options), interceptors=[TargetInterceptor(target)]
    )


def a2a_channel_factory(
    *,
    outbound: str | None = None,
    agents: Mapping[str, str] | None = None,
) -> Callable[[str], grpc.aio.Channel]:
    """A `grpc_channel_factory` for the A2A SDK's `ClientConfig`.

    The SDK passes the agent card's URL. The target is `agents[url]` when given,
    else the URL's host name (`grpc://planner:50051` → `planner`), else the URL itself
    when it is a SPIFFE ID.
    """

    def factory(url: str) -> grpc.aio.Channel:
        if agents is not None and url in agents:
            target = agents[url]
        elif url.startswith("spiffe://"):
            target = url
        else:
            host = urlsplit(url if "://" in url else f"grpc://{url}").hostname
            if not host:
                raise ValueError(
                    f"cannot tell which agent {url!r} names; pass agents={{url: name}}"
                )
            target = host
        return sidecar_channel(target, outbound=outbound)

    return factory
