"""The routers' per-call shortcuts keep their meaning: a decision from the current
snapshot on every call, audit lines, spans when someone records them, and the same
trace context whether or not anyone does."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from trustmesh import telemetry
from trustmesh.errors import Code
from trustmesh.spiffe_id import SpiffeId
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.v1 import resources_pb2 as pb
from trustmesh.x509svid import BundleSet, TrustBundle
from trustmesh_sidecar import headers as hdr
from trustmesh_sidecar.engine import CallStart, Forward, Reject
from trustmesh_sidecar.routing import InboundRouter, OutboundRouter
from trustmesh_sidecar.state import SidecarState

from certs import NOW, der, issue, make_ca

TD = "spiffe://example.org/agents/"
METHOD = "/bench.Echo/Unary"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def sid(name: str) -> SpiffeId:
    return SpiffeId.parse(TD + name)


def put_agent(name: str, *, disabled: bool = False, expires: datetime | None = None) -> rpb.Change:
    return rpb.Change(
        put_agent=pb.Agent(
            name=name,
            spiffe_id=TD + name,
            blueprint="bench",
            sponsor="ops@example.org",
            expires_at=int(expires.timestamp()) if expires else 0,
            state=pb.AGENT_STATE_DISABLED if disabled else pb.AGENT_STATE_ACTIVE,
            disabled_reason="revoked" if disabled else "",
        )
    )


def full_snapshot() -> rpb.SnapshotUpdate:
    return rpb.SnapshotUpdate(
        epoch="e",
        revision=1,
        full=True,
        changes=[
            rpb.Change(
                put_blueprint=pb.AgentBlueprint(name="bench", allowed_methods=["/bench.Echo/*"])
            ),
            put_agent("client"),
            put_agent("server", expires=NOW + timedelta(minutes=10)),
            rpb.Change(
                put_policy=pb.AccessPolicy(
                    name="bench",
                    callers=[pb.Selector(name="client")],
                    callees=[pb.Selector(name="server")],
                    methods=["/bench.Echo/*"],
                )
            ),
            rpb.Change(
                put_endpoint=pb.Endpoint(
                    spiffe_id=TD + "server", instance_id="i1", address="127.0.0.1:7001"
                )
            ),
        ],
    )


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


class Control:
    def __init__(self) -> None:
        self.aborted: list[tuple[Code, str]] = []

    def abort(self, code: Code, details: str) -> None:
        self.aborted.append((code, details))


class Side:
    """One sidecar's state on a snapshot every test changes by deltas."""

    def __init__(self, me: str, clock: Clock) -> None:
        self.ca = make_ca()
        svid = issue(self.ca, sid(me))
        bundles = BundleSet.of(TrustBundle(self.ca.trust_domain, (self.ca.cert,)))
        self.state = SidecarState(sid(me), svid, bundles, clock=clock)
        assert self.state.snapshot.apply(full_snapshot())
        self.state.snapshot_applied()
        self.revision = 1

    def apply(self, *changes: rpb.Change) -> None:
        update = rpb.SnapshotUpdate(
            epoch="e", revision=self.revision + 1, base_revision=self.revision, changes=changes
        )
        assert self.state.snapshot.apply(update)
        self.revision += 1
        self.state.snapshot_applied()


@pytest.fixture
def audit_lines() -> Iterator[list[dict[str, object]]]:
    lines: list[dict[str, object]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(record.getMessage()))

    logger = logging.getLogger("trustmesh.audit")
    handler = Collect()
    saved = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


def outbound_call(target: str = "server", *extra: tuple[str, str]) -> CallStart:
    headers = (("content-type", "application/grpc"), ("trustmesh-target", target), *extra)
    return CallStart(METHOD, headers, "local", (), None)


def test_outbound_decides_every_call_against_the_current_snapshot() -> None:
    clock = Clock()
    side = Side("client", clock)
    router = OutboundRouter(side.state, TracerProvider().get_tracer("t"), lambda _u: None)
    first = router.route(outbound_call(), Control())
    assert isinstance(first, Forward) and first.upstream.expected_id == sid("server")
    second = router.route(outbound_call(), Control())
    assert isinstance(second, Forward) and second.upstream is first.upstream
    side.apply(put_agent("server", disabled=True))
    denied = router.route(outbound_call(), Control())
    assert isinstance(denied, Reject) and "agent_disabled" in denied.details
    side.apply(put_agent("server", expires=NOW + timedelta(minutes=10)))
    assert isinstance(router.route(outbound_call(), Control()), Forward)
    clock.now = NOW + timedelta(minutes=10)  # the target expires, no update needed
    expired = router.route(outbound_call(), Control())
    assert isinstance(expired, Reject) and "agent_expired" in expired.details


def test_inbound_revocation_and_audit_lines(audit_lines: list[dict[str, object]]) -> None:
    clock = Clock()
    side = Side("server", clock)
    router = InboundRouter(side.state, "127.0.0.1:9", TracerProvider().get_tracer("t"))
    chain = der(*issue(side.ca, sid("client")).cert_chain)
    call = CallStart(METHOD, (("traceparent", TRACEPARENT),), "ipv4:127.0.0.1:1", chain, None)
    allowed = router.route(call, Control())
    assert isinstance(allowed, Forward)
    assert hdr.value_of(allowed.headers, hdr.CALLER) == TD + "client"
    allowed.observer.finished(Code.OK, "")
    side.apply(put_agent("client", disabled=True))
    denied = router.route(call, Control())
    assert isinstance(denied, Reject) and "agent_disabled" in denied.details
    # Outside an event loop the lines are written at once, one per decision.
    assert [(a["side"], a["decision"], a["reason"]) for a in audit_lines] == [
        ("inbound", "allow", "allowed"),
        ("inbound", "deny", "agent_disabled"),
    ]
    assert audit_lines[0]["caller"] == TD + "client" and audit_lines[0]["policy"] == "bench"


def test_audit_lines_in_a_loop_are_written_right_after_the_callback(
    audit_lines: list[dict[str, object]],
) -> None:
    side = Side("client", Clock())
    router = OutboundRouter(side.state, TracerProvider().get_tracer("t"), lambda _u: None)

    async def calls() -> list[int]:
        seen = []
        for target in ("nobody", "server", "nobody"):
            router.route(outbound_call(target), Control())
            seen.append(len(audit_lines))
        await asyncio.sleep(0)
        seen.append(len(audit_lines))
        return seen

    # Two denials (an unknown target); allowed outbound calls are not audited here.
    assert asyncio.run(calls()) == [0, 0, 0, 2]
    assert [a["reason"] for a in audit_lines] == ["unknown_target", "unknown_target"]
    # A batch left behind by a loop that stopped is written by the next decision.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.sleep(0))

        async def one() -> None:
            router.route(outbound_call("nobody"), Control())

        loop.run_until_complete(one())
    finally:
        loop.close()
    assert len(audit_lines) == 3


def test_spans_are_recorded_when_a_processor_is_installed_later() -> None:
    side = Side("client", Clock())
    provider = TracerProvider()
    router = OutboundRouter(side.state, provider.get_tracer("t"), lambda _u: None)
    call = outbound_call("server", ("traceparent", TRACEPARENT))
    unseen = router.route(call, Control())
    assert isinstance(unseen, Forward)
    # Nothing sees this sidecar's spans: it takes no part in the trace, and the app's
    # own trace context goes on as it came.
    assert hdr.value_of(unseen.headers, "traceparent") == TRACEPARENT
    assert not unseen.observer._span.get_span_context().is_valid  # type: ignore[attr-defined]

    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    seen = router.route(call, Control())
    assert isinstance(seen, Forward)
    seen.observer.finished(Code.OK, "")
    (span,) = exporter.get_finished_spans()
    assert span.kind is trace.SpanKind.CLIENT
    attrs = dict(span.attributes or {})
    assert attrs["trustmesh.decision"] == "allow" and attrs["trustmesh.callee.spiffe_id"] == (
        TD + "server"
    )
    assert attrs["rpc.service"] == "bench.Echo" and attrs["server.address"] == "127.0.0.1:7001"
    assert span.context is not None and span.parent is not None
    assert f"{span.context.trace_id:032x}" == TRACEPARENT.split("-")[1]


@pytest.mark.parametrize(
    "headers",
    [
        (),
        (("a", "b"),),
        (("traceparent", TRACEPARENT),),
        (("traceparent", TRACEPARENT), ("tracestate", "k=v")),
        (("traceparent", TRACEPARENT), ("baggage", "k=v")),
        (("traceparent", "garbage"),),
        (("traceparent", TRACEPARENT.encode()),),
        (("Traceparent", TRACEPARENT),),
        (("traceparent", TRACEPARENT), ("traceparent", TRACEPARENT.replace("4bf9", "1111"))),
    ],
)
def test_trace_context_shortcuts_match_the_propagators(
    headers: tuple[tuple[str, str], ...],
) -> None:
    fast = telemetry.extract_context(headers)
    full = propagate.extract(headers, getter=telemetry._GETTER)
    fast_parent = trace.get_current_span(fast).get_span_context()
    assert fast_parent == trace.get_current_span(full).get_span_context()
    assert baggage.get_all(fast) == baggage.get_all(full)
    span = TracerProvider().get_tracer("t").start_span("s", context=fast)
    incoming = (("k", "v"), ("traceparent", "old"), ("tracestate", "old=1"))
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    expected = [("k", "v"), *carrier.items()]
    assert telemetry.inject_context(incoming, span) == expected


def test_inject_keeps_baggage_from_the_current_context() -> None:
    token = otel_context.attach(baggage.set_baggage("user", "x"))
    try:
        span = TracerProvider().get_tracer("t").start_span("s")
        headers = dict(telemetry.inject_context((), span))
    finally:
        otel_context.detach(token)
    assert headers["baggage"] == "user=x" and "traceparent" in headers


def test_unseen_spans_follow_the_sampler() -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    tracer = TracerProvider(sampler=ALWAYS_OFF).get_tracer("t")
    assert not telemetry.span_seen(tracer)
    span = telemetry.start_span(
        tracer, "s", kind=trace.SpanKind.SERVER, context=None, attributes={}
    )
    context = span.get_span_context()
    assert context.is_valid and not context.trace_flags.sampled and not span.is_recording()


def test_header_filter_keeps_the_tuple_when_nothing_is_dropped() -> None:
    kept = (("x-app", "1"), ("other-bin", b"\x00"))
    assert hdr.kept(kept) is kept
    mixed = (("x-app", "1"), ("Trustmesh-Caller", "forged"), ("grpc-status", "0"), (":path", "/"))
    assert hdr.kept(mixed) == (("x-app", "1"),)
    assert hdr.strip_reserved(mixed) == [("x-app", "1")]
    assert hdr.value_of((("Trustmesh-Target", "a"),), hdr.TARGET) == "a"


# Header lists a caller may send: reserved keys in any case, repeated, beside
# transport headers and the app's own; `hdr.read` must agree with the per-key scans.
READ_CASES = {
    "empty": (),
    "app-only": (("x-app", "1"), ("x-app", "2"), ("other-bin", b"\x00")),
    "target-and-transport": (
        ("content-type", "application/grpc"), ("trustmesh-target", "bob"), ("te", "trailers"),
        ("user-agent", "grpc-python"), ("grpc-timeout", "5S"), ("x-app", "1"),
    ),
    "any-case-first-wins": (
        ("TrustMesh-Target", "first"), ("trustmesh-target", "second"),
        ("Trustmesh-Delegation-Bin", b"\x01"), ("trustmesh-delegation-bin", b"\x02"),
    ),
    "forged-reserved": (("trustmesh-caller", "spiffe://evil/x"), ("TRUSTMESH-ORIGIN", "u")),
    "authorization-kept": (("Authorization", "Bearer  tok "), ("authorization", "Basic x")),
    "user-token-and-text-chain": (
        ("trustmesh-user-token", "jwt"), ("trustmesh-delegation-bin", "not-bytes"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("headers", list(READ_CASES.values()), ids=list(READ_CASES))
def test_one_pass_read_agrees_with_the_per_key_scans(
    headers: tuple[tuple[str, str | bytes], ...],
) -> None:
    got = hdr.read(headers)
    assert got.target == hdr.value_of(headers, hdr.TARGET)
    assert got.delegation == hdr.value_of(headers, hdr.DELEGATION)
    assert got.user_token == hdr.value_of(headers, hdr.USER_TOKEN)
    assert got.authorization == hdr.value_of(headers, "authorization")
    assert got.bearer_token() == hdr.bearer_token(headers)
    assert got.kept == hdr.strip_reserved(headers)
    app = hdr.for_app(hdr.read(headers), "spiffe://d/a")
    assert app == [*hdr.strip_reserved(headers), (hdr.CALLER, "spiffe://d/a")]
    peer = hdr.for_peer(hdr.read(headers), b"chain", drop_authorization=True)
    assert all(k.lower() != "authorization" for k, _ in peer)
    assert peer[-1] == (hdr.DELEGATION, b"chain")


@pytest.mark.parametrize(
    "headers",
    [
        (),
        (("traceparent", TRACEPARENT),),
        (("traceparent", TRACEPARENT[:-2] + "00"),),  # parent not sampled
        (("traceparent", " " + TRACEPARENT),),  # not plain: no trace ID read from it
        (("traceparent", TRACEPARENT), ("tracestate", "k=v"), ("baggage", "a=b")),
        (("traceparent", TRACEPARENT.encode()),),
    ],
    ids=["none", "sampled", "not-sampled", "not-plain", "with-state-and-baggage", "bytes"],
)
def test_unseen_call_spans_pass_the_trace_headers_through(
    headers: tuple[tuple[str, str | bytes], ...],
) -> None:
    tracer = TracerProvider().get_tracer("t")
    assert not telemetry.span_seen(tracer)
    span = telemetry.start_call_span(
        tracer, "s", kind=trace.SpanKind.SERVER, headers=headers, attributes={}
    )
    assert not span.get_span_context().is_valid and not span.is_recording()
    app = (("x-app", "1"), *headers)
    assert telemetry.inject_context(app, span) == list(app)
    plain = bool(headers) and isinstance(headers[0][1], str) and headers[0][1][:2] == "00"
    expected = int(TRACEPARENT.split("-")[1], 16) if plain else 0
    assert telemetry.trace_id_of(span, headers) == expected


def test_seen_call_spans_are_children_of_the_incoming_context() -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    headers = (("traceparent", TRACEPARENT),)
    span = telemetry.start_call_span(
        provider.get_tracer("t"), "s", kind=trace.SpanKind.SERVER, headers=headers, attributes={}
    )
    context = span.get_span_context()
    assert span.is_recording() and context.trace_id == int(TRACEPARENT.split("-")[1], 16)
    sent = dict(telemetry.inject_context(headers, span))["traceparent"]
    assert isinstance(sent, str) and sent.split("-")[2] == f"{context.span_id:016x}"
    assert telemetry.trace_id_of(span, ()) == context.trace_id


def test_inbound_memo_ends_with_the_callers_expiry_and_certificate() -> None:
    clock = Clock()
    side = Side("server", clock)
    side.apply(put_agent("server"), put_agent("client", expires=NOW + timedelta(minutes=30)))
    router = InboundRouter(side.state, "127.0.0.1:9", TracerProvider().get_tracer("t"))
    chain = der(*issue(side.ca, sid("client"), ttl=timedelta(minutes=45)).cert_chain)
    call = CallStart(METHOD, (), "ipv4:127.0.0.1:1", chain, None)

    def route() -> Forward | Reject:
        result = router.route(call, Control())
        if isinstance(result, Forward):
            result.observer.finished(Code.OK, "")
        return result

    assert isinstance(route(), Forward)
    clock.now = NOW + timedelta(minutes=29)
    assert isinstance(route(), Forward)
    clock.now = NOW + timedelta(minutes=30)  # the agent's expiresAt: no update needed
    expired = route()
    assert isinstance(expired, Reject) and "agent_expired" in expired.details
    side.apply(put_agent("client"))  # no expiry now; the certificate still ends at 45 min
    clock.now = NOW + timedelta(minutes=44)
    assert isinstance(route(), Forward)
    clock.now = NOW + timedelta(minutes=45, seconds=1)
    late = route()
    assert isinstance(late, Reject) and late.code is Code.UNAUTHENTICATED
    # A new bundle set (another CA) is a new verifier: the remembered caller is not used.
    clock.now = NOW + timedelta(minutes=10)
    assert isinstance(route(), Forward)
    other = make_ca()
    side.state.verifier = type(side.state.verifier)(
        BundleSet.of(TrustBundle(other.trust_domain, (other.cert,)))
    )
    untrusted = route()
    assert isinstance(untrusted, Reject) and untrusted.code is Code.UNAUTHENTICATED


def test_deferred_audit_records_carry_the_decision_time() -> None:
    import time

    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("trustmesh.audit")
    handler, saved = Collect(), logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    side = Side("client", Clock())
    router = OutboundRouter(side.state, TracerProvider().get_tracer("t"), lambda _u: None)

    async def call() -> tuple[float, float]:
        before = time.time()
        router.route(outbound_call("nobody"), Control())
        after = time.time()
        await asyncio.sleep(0.05)
        return before, after

    try:
        before, after = asyncio.run(call())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)
    (record,) = records
    assert before <= record.created <= after
    assert record.msecs == int((record.created - int(record.created)) * 1000)
    assert json.loads(record.getMessage())["reason"] == "unknown_target"


def test_outbound_plan_ends_when_this_agent_is_disabled_or_expires() -> None:
    clock = Clock()
    side = Side("client", clock)
    side.apply(put_agent("server"), put_agent("client", expires=NOW + timedelta(minutes=5)))
    router = OutboundRouter(side.state, TracerProvider().get_tracer("t"), lambda _u: None)
    assert isinstance(router.route(outbound_call(), Control()), Forward)
    clock.now = NOW + timedelta(minutes=5)
    expired = router.route(outbound_call(), Control())
    assert isinstance(expired, Reject) and "this agent (client) has expired" in expired.details
    side.apply(put_agent("client"))
    assert isinstance(router.route(outbound_call(), Control()), Forward)
    side.apply(put_agent("client", disabled=True))
    disabled = router.route(outbound_call(), Control())
    assert isinstance(disabled, Reject) and "this agent (client) is disabled" in disabled.details
