"""OpenTelemetry helpers: span attribute names, W3C propagation over header lists, setup.

Library code only uses the OpenTelemetry API (a no-op until an SDK is installed).
`configure_tracing()` installs the SDK for a process: OTLP/gRPC when the standard
`OTEL_*` variables ask for it, or a given exporter (tests use the in-memory one).
Spans never carry keys, tokens or message payloads.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)

__all__ = [
    "ATTR",
    "configure_tracing",
    "extract_context",
    "inject_context",
    "otlp_requested",
    "split_method",
]


class ATTR:
    RPC_SYSTEM = "rpc.system"
    RPC_SERVICE = "rpc.service"
    RPC_METHOD = "rpc.method"
    RPC_STATUS = "rpc.grpc.status_code"
    PEER_ADDRESS = "network.peer.address"
    CALLER = "trustmesh.caller.spiffe_id"
    CALLEE = "trustmesh.callee.spiffe_id"
    DECISION = "trustmesh.decision"
    REASON = "trustmesh.reason"
    POLICY = "trustmesh.policy"
    SIDE = "trustmesh.side"
    TARGET = "trustmesh.target"


_TRACE_KEYS = ("traceparent", "tracestate")

Headers = Sequence[tuple[str, str | bytes]]


class _HeaderGetter(Getter[Headers]):
    def get(self, carrier: Headers, key: str) -> list[str] | None:
        values = [v for k, v in carrier if k == key and isinstance(v, str)]
        return values or None

    def keys(self, carrier: Headers) -> list[str]:
        return [k for k, _ in carrier]


class _DictSetter(Setter[dict[str, str]]):
    def set(self, carrier: dict[str, str], key: str, value: str) -> None:
        carrier[key] = value


_GETTER = _HeaderGetter()
_SETTER = _DictSetter()


def split_method(path: str) -> tuple[str, str]:
    """`/pkg.Service/Method` -> (`pkg.Service`, `Method`)."""
    _, service, method = [*path.split("/", 2), "", ""][:3]
    return service, method


def extract_context(headers: Headers) -> Context:
    return propagate.extract(headers, getter=_GETTER)


def inject_context(
    headers: Iterable[tuple[str, str | bytes]], span: trace.Span
) -> list[tuple[str, str | bytes]]:
    """Headers with any incoming trace context replaced by `span`'s."""
    out = [(k, v) for k, v in headers if k not in _TRACE_KEYS]
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span), setter=_SETTER)
    out.extend(carrier.items())
    return out


def otlp_requested() -> bool:
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "")
    if exporter:
        return "otlp" in exporter.split(",")
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure_tracing(
    service_name: str,
    *,
    exporter: SpanExporter | None = None,
    batch: bool = True,
) -> TracerProvider:
    """Install an SDK tracer provider for this process and return it."""
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    if exporter is None and otlp_requested():
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # endpoint, headers, TLS from OTEL_* variables
    if exporter is not None:
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider
