"""OpenTelemetry helpers: span attribute names, W3C propagation over header lists, setup.

Library code only uses the OpenTelemetry API (a no-op until an SDK is installed).
`configure_tracing()` installs the SDK for a process: OTLP/gRPC when the standard
`OTEL_*` variables ask for it, or a given exporter (tests use the in-memory one).
Spans never carry keys, tokens or message payloads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry import baggage, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter, Setter, TextMapPropagator
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import Decision as SamplingDecision
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "ATTR",
    "configure_tracing",
    "extract_context",
    "inject_context",
    "otlp_requested",
    "span_seen",
    "split_method",
    "start_call_span",
    "start_span",
    "trace_id_of",
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


# The propagators OpenTelemetry installs by default (OTEL_PROPAGATORS unset):
# W3C trace context, then W3C baggage. With them, the work per call is known and the
# common cases below take a shorter path to the same result.
_DEFAULT_PROPAGATORS = (TraceContextTextMapPropagator, W3CBaggagePropagator)
_PROPAGATION_FIELDS = frozenset({"traceparent", "tracestate", "baggage"})
# (the global propagator last looked at, its trace context propagator if default)
_default_seen: list[tuple[TextMapPropagator | None, TraceContextTextMapPropagator | None]] = [
    (None, None)
]


def _default_tracecontext() -> TraceContextTextMapPropagator | None:
    """The trace context propagator, when the global one is the default composite."""
    textmap = propagate.get_global_textmap()
    seen, found = _default_seen[0]
    if textmap is seen:
        return found
    found = None
    inner = getattr(textmap, "_propagators", None)
    if (
        type(textmap) is CompositePropagator
        and isinstance(inner, list | tuple)
        and tuple(type(p) for p in inner) == _DEFAULT_PROPAGATORS
    ):
        found = inner[0]
    _default_seen[0] = (textmap, found)
    return found


def extract_context(headers: Headers) -> Context:
    tracecontext = _default_tracecontext()
    if tracecontext is not None:
        # Default propagators: with no tracestate or baggage header, only the
        # traceparent header counts (or none: an empty context, as they would give).
        traceparent: tuple[tuple[str, str | bytes], ...] = ()
        for header in headers:
            if header[0] in _PROPAGATION_FIELDS:
                if header[0] != "traceparent" or traceparent:
                    return propagate.extract(headers, getter=_GETTER)
                traceparent = (header,)
        if not traceparent:
            return Context()
        return tracecontext.extract(traceparent, getter=_GETTER)
    return propagate.extract(headers, getter=_GETTER)


def inject_context(
    headers: Iterable[tuple[str, str | bytes]], span: trace.Span
) -> list[tuple[str, str | bytes]]:
    """Headers with any incoming trace context replaced by `span`'s; for a span that
    takes no part in the trace (an invalid one, see `start_call_span`), the headers
    as they are."""
    if not span.get_span_context().is_valid:
        return list(headers)
    out = [(k, v) for k, v in headers if k not in _TRACE_KEYS]
    if _default_tracecontext() is not None and not baggage.get_all():
        # Default propagators and no baggage: what TraceContextTextMapPropagator.inject
        # writes, without building a context to carry the span.
        span_context = span.get_span_context()
        if span_context != trace.INVALID_SPAN_CONTEXT:
            out.append(
                (
                    "traceparent",
                    f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}"
                    f"-{span_context.trace_flags:02x}",
                )
            )
            if span_context.trace_state:
                out.append(("tracestate", span_context.trace_state.to_header()))
        return out
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span), setter=_SETTER)
    out.extend(carrier.items())
    return out


def span_seen(tracer: trace.Tracer) -> bool:
    """Whether anything can see the spans `tracer` records.

    False only for an SDK tracer whose provider has no span processor, which is what
    `configure_tracing` installs when there is nowhere to export to. Read per span, so
    a processor added later takes effect at once.
    """
    if not isinstance(tracer, sdk_trace.Tracer):
        return True
    processors = getattr(tracer.span_processor, "_span_processors", None)
    return not isinstance(processors, tuple) or bool(processors)


def start_span(
    tracer: trace.Tracer,
    name: str,
    *,
    kind: trace.SpanKind,
    context: Context | None,
    attributes: Mapping[str, Any],
    start_time: int | None = None,
) -> trace.Span:
    """`tracer.start_span`, except when no one can see the span (`span_seen` is False).

    Then the span is a non-recording one that carries what the SDK would have given
    the recorded span: the parent's trace ID (or a new one from the tracer's ID
    generator), a new span ID and the tracer's sampling decision. The trace context
    that goes on to the next hop is the same; building the span's record, which no
    processor would read, is skipped.
    """
    if span_seen(tracer):
        return tracer.start_span(
            name, kind=kind, context=context, attributes=attributes, start_time=start_time
        )
    assert isinstance(tracer, sdk_trace.Tracer)
    enabled = getattr(tracer, "_is_enabled", None)
    if enabled is not None and not enabled():
        return tracer.start_span(name, kind=kind, context=context, attributes=attributes)
    return _unseen_span(tracer, name, kind, context, attributes)


_RANDOM_TRACE_ID = int(getattr(trace.TraceFlags, "RANDOM_TRACE_ID", 0))


def _unseen_span(
    tracer: sdk_trace.Tracer,
    name: str,
    kind: trace.SpanKind,
    context: Context | None,
    attributes: Mapping[str, Any],
) -> trace.Span:
    """The IDs and flags of `Tracer.start_span` (opentelemetry-sdk), without the record."""
    parent = trace.get_current_span(context).get_span_context()
    ids = tracer.id_generator
    if parent is None or not parent.is_valid:
        trace_id = ids.generate_trace_id()
        is_random = getattr(ids, "is_trace_id_random", None)
        random_trace_id = bool(is_random()) if is_random is not None else False
    else:
        trace_id = parent.trace_id
        random_trace_id = bool(parent.trace_flags & _RANDOM_TRACE_ID)
    sampling = tracer.sampler.should_sample(context, trace_id, name, kind, attributes, ())
    sampled = sampling.decision is SamplingDecision.RECORD_AND_SAMPLE
    flags = trace.TraceFlags.SAMPLED if sampled else trace.TraceFlags.DEFAULT
    if random_trace_id:
        flags |= _RANDOM_TRACE_ID
    span_context = trace.SpanContext(
        trace_id,
        ids.generate_span_id(),
        is_remote=False,
        trace_flags=trace.TraceFlags(flags),
        trace_state=sampling.trace_state,
    )
    return trace.NonRecordingSpan(span_context)


# A version-00 traceparent in its plain form (`trace_id_of` reads only this form).
_PLAIN_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def start_call_span(
    tracer: trace.Tracer,
    name: str,
    *,
    kind: trace.SpanKind,
    headers: Headers,
    attributes: Mapping[str, Any],
    start_time: int | None = None,
) -> trace.Span:
    """A call's span, child of the trace context in the call's `headers`.

    When nothing can see this process's spans (`span_seen` is False: no span
    processor, which is what `configure_tracing` installs with nowhere to export to),
    the sidecar takes no part in the trace: the span is `trace.INVALID_SPAN`, and
    `inject_context` then passes the call's own trace headers on untouched. The apps'
    traces stay connected across the mesh (a span ID made here would be the parent of
    the next app's span, but would never be exported), and a call costs no IDs.
    """
    if not span_seen(tracer):
        return trace.INVALID_SPAN
    return start_span(
        tracer,
        name,
        kind=kind,
        context=extract_context(headers),
        attributes=attributes,
        start_time=start_time,
    )


def trace_id_of(span: trace.Span, headers: Headers) -> int:
    """The call's W3C trace ID: its span's, or for a span that takes no part in the
    trace (see `start_call_span`), that of the plain version-00 traceparent the call
    carries; 0 if none."""
    context = span.get_span_context()
    if context.is_valid:
        return context.trace_id
    for key, value in headers:
        if key == "traceparent":
            match = _PLAIN_TRACEPARENT.fullmatch(value) if isinstance(value, str) else None
            return int(match.group(1), 16) if match is not None else 0
    return 0


def _enabled() -> bool:
    return True


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
