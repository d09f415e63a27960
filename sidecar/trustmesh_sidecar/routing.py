"""Per-call decisions of the sidecar, above the engine seam (no grpc here).

`OutboundRouter` serves the local agent: it resolves `trustmesh-target` from the
snapshot and forwards to one of the target's live instances over mTLS, expecting the
target's exact SPIFFE ID. `InboundRouter` serves peers: it takes the caller's ID from
the verified chain (against the bundle of that ID's own trust domain), authorizes
the call, and forwards to the app with `trustmesh-caller` set.

Both emit one span per call, allowed or denied, and one audit record per decision.
Open inbound calls are kept so that a revocation ends streams already open.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from time import time_ns
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from trustmesh.authz import Target, authorize, resolve_target
from trustmesh.decision import Decision, Reason
from trustmesh.delegation import needs_signed_hop
from trustmesh.errors import Code, PeerAuthenticationError, format_details, parse_details
from trustmesh.limits import DEFAULT_LIMITS, Limits
from trustmesh.resources import is_grpc_method
from trustmesh.snapshot import Snapshot
from trustmesh.spiffe_id import SpiffeId
from trustmesh.telemetry import ATTR, inject_context, span_seen, split_method, start_call_span
from trustmesh_sidecar import chains
from trustmesh_sidecar import headers as hdr
from trustmesh_sidecar.audit import DEFAULT_FLUSH_INTERVAL, Audit
from trustmesh_sidecar.callers import Callers
from trustmesh_sidecar.engine import (
    CallControl,
    CallStart,
    Forward,
    Headers,
    Reject,
    Upstream,
)
from trustmesh_sidecar.state import SidecarState

__all__ = ["InboundRouter", "OutboundRouter"]


class _SpanObserver:
    """Ends the call's span with the final status; frees the in-flight slot."""

    __slots__ = ("_done", "_on_end", "_span")

    def __init__(self, span: trace.Span, on_end: Callable[[], None] | None = None) -> None:
        self._span = span
        self._on_end = on_end
        self._done = False

    def response_headers(self, headers: Headers) -> Headers:
        return hdr.kept(headers)

    def finished(self, code: Code, details: str) -> None:
        if self._done:
            return
        self._done = True
        span = self._span
        if not span.is_recording():  # no span (tracing off) or one sampled out
            pass
        elif code is Code.OK:
            span.set_attribute(ATTR.RPC_STATUS, code.value)
        else:
            attrs: dict[str, Any] = {ATTR.RPC_STATUS: code.value}
            parsed = parse_details(details)
            if parsed is not None:
                # A TrustMesh denial further along (or a revocation): record its reason.
                attrs[ATTR.DECISION] = "deny"
                attrs[ATTR.REASON] = parsed[0]
            span.set_attributes(attrs)
            span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"[:256]))
        span.end()
        self._ended()

    def _ended(self) -> None:
        if self._on_end is not None:
            self._on_end()


class _InboundCall(_SpanObserver):
    """An open inbound call: its observer, and what revalidation needs to re-decide it."""

    __slots__ = ("caller", "chain", "control", "key", "method", "open_calls", "started")

    def __init__(
        self,
        span: trace.Span,
        open_calls: dict[int, _InboundCall],
        key: int,
        caller: SpiffeId,
        method: str,
        control: CallControl,
        chain: bytes | None,
        started: datetime,
    ) -> None:
        super().__init__(span)
        self.open_calls = open_calls
        self.key = key
        self.caller = caller
        self.method = method
        self.control = control
        self.chain = chain
        self.started = started

    def _ended(self) -> None:
        self.open_calls.pop(self.key, None)


class _Spans:
    """Starts one router's spans: name and rpc.* attributes are worked out once per
    method (bounded), and every attribute known when the span starts is given at once."""

    __slots__ = ("_kind", "_methods", "_side", "_tracer")

    _MAX_METHODS = 1024

    def __init__(self, tracer: trace.Tracer, kind: SpanKind, side: str) -> None:
        self._tracer = tracer
        self._kind = kind
        self._side = side
        self._methods: dict[str, tuple[str, dict[str, Any]]] = {}

    def _per_method(self, path: str) -> tuple[str, dict[str, Any]]:
        found = self._methods.get(path)
        if found is None:
            service, method = split_method(path)
            found = (
                path.lstrip("/") or "unknown",
                {
                    ATTR.RPC_SYSTEM: "grpc",
                    ATTR.RPC_SERVICE: service,
                    ATTR.RPC_METHOD: method,
                    ATTR.SIDE: self._side,
                },
            )
            if len(self._methods) < self._MAX_METHODS:
                self._methods[path] = found
        return found

    @property
    def seen(self) -> bool:
        """Whether anyone records the spans (read per call: see `span_seen`)."""
        return span_seen(self._tracer)

    def start(self, call: CallStart, start_time: int, attributes: dict[str, Any]) -> trace.Span:
        """The call's span, started at `start_time` (ns) with these attributes too."""
        if not span_seen(self._tracer):  # no one records spans: none, and no attributes
            return trace.INVALID_SPAN
        name, base = self._per_method(call.method)
        attributes.update(base)
        attributes[ATTR.PEER_ADDRESS] = call.peer_address
        return start_call_span(
            self._tracer,
            name,
            kind=self._kind,
            headers=call.headers,
            attributes=attributes,
            start_time=start_time,
        )


def _deny(
    spans: _Spans,
    call: CallStart,
    start_time: int,
    attributes: dict[str, Any],
    decision: Decision,
    state: SidecarState,
) -> Reject:
    """A refused call's span (started and ended here) and its status."""
    state.counters.denied += 1
    details = format_details(decision.reason.value, decision.message)
    code = decision.code
    attributes[ATTR.DECISION] = "deny"
    attributes[ATTR.REASON] = decision.reason.value
    attributes[ATTR.RPC_STATUS] = code.value
    span = spans.start(call, start_time, attributes)
    span.set_status(Status(StatusCode.ERROR, details[:256]))
    span.end()
    return Reject(code, details)


def _end_denied(span: trace.Span, decision: Decision, state: SidecarState) -> Reject:
    """As `_deny`, for a call whose span is already started."""
    state.counters.denied += 1
    details = format_details(decision.reason.value, decision.message)
    code = decision.code
    span.set_attributes(
        {
            ATTR.DECISION: "deny",
            ATTR.REASON: decision.reason.value,
            ATTR.RPC_STATUS: code.value,
        }
    )
    span.set_status(Status(StatusCode.ERROR, details[:256]))
    span.end()
    return Reject(code, details)


class InboundRouter:
    def __init__(
        self,
        state: SidecarState,
        app_address: str,
        tracer: trace.Tracer,
        *,
        limits: Limits = DEFAULT_LIMITS,
        audit_flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    ) -> None:
        self._state = state
        self._app = Upstream(app_address, None)
        self._tracer = tracer
        self._spans = _Spans(tracer, SpanKind.SERVER, "inbound")
        self._audit = Audit(audit_flush_interval)
        self._callers = Callers()
        self._decisions: dict[
            tuple[str, str, str], tuple[Snapshot, int, Decision, datetime | None]
        ] = {}
        self._limits = limits
        self._open: dict[int, _InboundCall] = {}
        self._ids = itertools.count()
        state.on_snapshot(self.revalidate)

    def route(self, call: CallStart, control: CallControl) -> Forward | Reject:
        started = time_ns()
        state = self._state
        spans = self._spans
        me = str(state.spiffe_id)
        now = state.now()
        try:
            caller = self._callers.verify(state.verifier, call.peer_chain, now)
        except PeerAuthenticationError as e:
            reason = (
                Reason(e.reason)
                if e.reason in Reason._value2member_map_
                else Reason.PEER_UNAUTHENTICATED
            )
            decision = Decision.deny(reason, e.message)
            self._audit("inbound", "", me, call.method, decision)
            return _deny(spans, call, started, {ATTR.CALLEE: me}, decision, state)
        caller_text = str(caller)
        attributes: dict[str, Any] = {ATTR.CALLEE: me, ATTR.CALLER: caller_text}
        decision = self._decide(caller, call.method, now)
        self._audit("inbound", caller_text, me, call.method, decision)
        if not decision.allowed:
            return _deny(spans, call, started, attributes, decision, state)
        peer = hdr.read(call.headers)
        checked = chains.inbound_chain(state, peer.delegation, caller, call.method)
        if not checked.allowed:
            self._audit("inbound", caller_text, me, call.method, checked.decision)
            return _deny(spans, call, started, attributes, checked.decision, state)
        state.counters.allowed += 1
        chain = checked.chain
        app_headers = hdr.for_app(peer, caller_text, chain.headers() if chain else ())
        if spans.seen:
            attributes[ATTR.DECISION] = "allow"
            attributes[ATTR.REASON] = decision.reason.value
            if decision.policy:
                attributes[ATTR.POLICY] = decision.policy
            span = spans.start(call, started, attributes)
            if chain is not None:
                chains.annotate(span, chain)
            headers = tuple(inject_context(app_headers, span))
        else:  # no span: the app gets the caller's trace headers as they are
            span, headers = trace.INVALID_SPAN, tuple(app_headers)
        key = next(self._ids)
        entry = self._open[key] = _InboundCall(
            span, self._open, key, caller, call.method, control, chain.data if chain else None, now
        )
        return Forward(self._app, headers, entry)

    def _decide(self, caller: SpiffeId, method: str, now: datetime) -> Decision:
        state = self._state
        if not is_grpc_method(method):
            return Decision.deny(Reason.BAD_METHOD, f"malformed method path {method[:128]!r}")
        if not state.synced:
            return Decision.deny(Reason.NO_SNAPSHOT, "the sidecar has no registry snapshot yet")
        if len(self._open) >= self._limits.max_inflight_calls:
            return Decision.deny(
                Reason.LIMIT_EXCEEDED,
                f"more than {self._limits.max_inflight_calls} calls in flight",
            )
        return self._authorize(caller, state.spiffe_id, method, state.snapshot, now)

    _MAX_DECISIONS = 4096

    def _authorize(
        self, caller: SpiffeId, me: SpiffeId, method: str, snapshot: Snapshot, now: datetime
    ) -> Decision:
        """`authorize`, memoized per (caller, callee, method) for as long as the snapshot
        stays at the same generation (any applied update moves it on: a disable, a
        policy change) and both agents stay short of their expiresAt. Decisions made
        while either agent was unknown, disabled or expired are not remembered."""
        key = (caller.text, me.text, method)  # interned strings: hashed in C, once
        generation = snapshot.generation
        found = self._decisions.get(key)
        if found is not None:
            seen, seen_generation, decision, horizon = found
            if (
                seen is snapshot
                and seen_generation == generation
                and (horizon is None or now < horizon)
            ):
                return decision
        decision = authorize(caller, me, method, snapshot, now=now)
        caller_view = snapshot.agent_by_id(caller)
        callee_view = snapshot.agent_by_id(me)
        if (
            snapshot.ready
            and caller_view is not None
            and callee_view is not None
            and not caller_view.disabled
            and not callee_view.disabled
            and not caller_view.expired(now)
            and not callee_view.expired(now)
        ):
            ends = [v.expires_at for v in (caller_view, callee_view) if v.expires_at is not None]
            if len(self._decisions) >= self._MAX_DECISIONS:
                self._decisions.clear()
            self._decisions[key] = (snapshot, generation, decision, min(ends) if ends else None)
        return decision

    def revalidate(self) -> None:
        """Re-decide every open call against the new snapshot; end the denied ones."""
        if not self._open:
            return
        state = self._state
        now = state.now()
        for key, entry in list(self._open.items()):
            decision = authorize(
                entry.caller, state.spiffe_id, entry.method, state.snapshot, now=now
            )
            if decision.allowed and entry.chain is not None:
                # A chain naming an agent disabled since is refused, open streams too.
                decision = chains.inbound_chain(
                    state, entry.chain, entry.caller, entry.method, at=entry.started
                ).decision
            if not decision.allowed:
                self._audit(
                    "inbound", str(entry.caller), str(state.spiffe_id), entry.method, decision
                )
                state.counters.denied += 1
                self._open.pop(key, None)
                entry.control.abort(
                    decision.code, format_details(decision.reason.value, decision.message)
                )

    @property
    def open_calls(self) -> int:
        return len(self._open)

    def flush_audit(self) -> None:
        """Write the audit lines still waiting (the sidecar's stop)."""
        self._audit.flush()


_ALLOWED = Reason.ALLOWED.value
_NO_SPAN = trace.INVALID_SPAN


@dataclass(frozen=True, slots=True)
class _Plan:
    """Where calls to one target go, as decided at one snapshot generation."""

    snapshot: Snapshot
    generation: int
    me: SpiffeId
    horizon: datetime | None  # the earlier expiresAt of this agent and the target
    callee: SpiffeId
    callee_text: str
    routes: tuple[tuple[str, Upstream, Callable[[], tuple[Code, str] | None]], ...]
    sign: bool  # needs_signed_hop(snapshot, callee): whether our hop must be signed


class OutboundRouter:
    def __init__(
        self,
        state: SidecarState,
        tracer: trace.Tracer,
        explain: Callable[[Upstream], tuple[Code, str] | None],
        *,
        limits: Limits = DEFAULT_LIMITS,
        audit_flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    ) -> None:
        self._state = state
        self._tracer = tracer
        self._spans = _Spans(tracer, SpanKind.CLIENT, "outbound")
        self._audit = Audit(audit_flush_interval)
        self._plans: dict[str, _Plan] = {}
        self._explain = explain
        self._limits = limits
        self._rr = itertools.count()
        self._inflight = 0

    def _done(self) -> None:
        self._inflight -= 1

    def flush_audit(self) -> None:
        """Write the audit lines still waiting (the sidecar's stop)."""
        self._audit.flush()

    _MAX_PLANS = 1024

    def _planned(self, target: str) -> _Plan | None:
        """The plan made earlier for `target`, while the snapshot stays at the same
        generation (every applied update, a revocation too, moves it on) and before
        this agent's or the target's expiresAt."""
        state = self._state
        snapshot = state.snapshot
        plan = self._plans.get(target)
        if (
            plan is not None
            and plan.snapshot is snapshot
            and plan.generation == snapshot.generation
            and plan.me is state.spiffe_id
            and (plan.horizon is None or state.now() < plan.horizon)
        ):
            return plan
        return None

    def _plan(self, target: str, resolved: Target) -> _Plan:
        """Remember where calls to `target` go, as just decided."""
        state = self._state
        snapshot = state.snapshot
        me = snapshot.agent_by_id(state.spiffe_id)
        ends = [
            t for t in (me.expires_at if me else None, resolved.agent.expires_at) if t is not None
        ]
        callee = resolved.agent.spiffe_id
        routes = []
        for endpoint in resolved.endpoints:
            upstream = Upstream(endpoint.address, callee)
            routes.append((endpoint.address, upstream, self._explainer(upstream)))
        plan = _Plan(
            snapshot,
            snapshot.generation,
            state.spiffe_id,
            min(ends) if ends else None,
            callee,
            str(callee),
            tuple(routes),
            needs_signed_hop(snapshot, callee),
        )
        if len(self._plans) >= self._MAX_PLANS:
            self._plans.clear()
        self._plans[target] = plan
        return plan

    def _explainer(self, upstream: Upstream) -> Callable[[], tuple[Code, str] | None]:
        return lambda: self._explain(upstream)

    def _self_revoked(self, now: datetime) -> Decision | None:
        """A disabled or expired agent is stopped at its own sidecar too.

        (Callees enforce this anyway; refusing at the source also covers peers that
        have not yet seen the change. Whether an unregistered agent may call is left
        to the callee, which is the boundary that counts.)
        """
        state = self._state
        me = state.snapshot.agent_by_id(state.spiffe_id)
        if me is None:
            return None
        if me.disabled:
            reason = f": {me.disabled_reason}" if me.disabled_reason else ""
            return Decision.deny(
                Reason.AGENT_DISABLED, f"this agent ({me.name}) is disabled{reason}"
            )
        if me.expired(now):
            return Decision.deny(Reason.AGENT_EXPIRED, f"this agent ({me.name}) has expired")
        return None

    def route(self, call: CallStart, control: CallControl) -> Forward | Reject:
        started = time_ns()
        state = self._state
        spans = self._spans
        me = str(state.spiffe_id)
        attributes: dict[str, Any] = {ATTR.CALLER: me}
        agent = hdr.read(call.headers)
        target = agent.target
        decision: Decision | None = None
        if not isinstance(target, str) or not target:
            decision = Decision.deny(Reason.MISSING_TARGET, f"set the {hdr.TARGET} metadata")
        elif not is_grpc_method(call.method):
            decision = Decision.deny(
                Reason.BAD_METHOD, f"malformed method path {call.method[:128]!r}"
            )
        elif not state.synced:
            decision = Decision.deny(Reason.NO_SNAPSHOT, "the sidecar has no registry snapshot yet")
        elif self._inflight >= self._limits.max_inflight_calls:
            decision = Decision.deny(
                Reason.LIMIT_EXCEEDED,
                f"more than {self._limits.max_inflight_calls} calls in flight",
            )
        if decision is not None:
            self._audit("outbound", me, str(target or ""), call.method, decision)
            return _deny(spans, call, started, attributes, decision, state)
        assert isinstance(target, str)
        plan = self._planned(target)
        if plan is None:
            now = state.now()
            decision = self._self_revoked(now)
            if decision is not None:
                self._audit("outbound", me, target, call.method, decision)
                return _deny(spans, call, started, attributes, decision, state)
            attributes[ATTR.TARGET] = target[:256]
            resolved = resolve_target(target, state.snapshot, now=now)
            if isinstance(resolved, Decision):
                self._audit("outbound", me, target, call.method, resolved)
                return _deny(spans, call, started, attributes, resolved, state)
            plan = self._plan(target, resolved)
        else:
            attributes[ATTR.TARGET] = target[:256]
        callee = plan.callee
        address, upstream, explain = plan.routes[next(self._rr) % len(plan.routes)]
        # The chain's hops carry the span's trace ID, so the span starts here.
        if spans.seen:
            attributes[ATTR.CALLEE] = plan.callee_text
            span = spans.start(call, started, attributes)
        else:
            span = trace.INVALID_SPAN
        outgoing = chains.outbound_chain(
            state, agent, callee, call.method, span, headers=call.headers, sign=plan.sign
        )
        if isinstance(outgoing, Decision):
            self._audit("outbound", me, target, call.method, outgoing)
            return _end_denied(span, outgoing, state)
        if span.is_recording():
            span.set_attributes(
                {ATTR.DECISION: "allow", ATTR.REASON: _ALLOWED, "server.address": address}
            )
        state.counters.allowed += 1
        self._inflight += 1
        peer_headers = hdr.for_peer(
            agent, outgoing.chain, drop_authorization=outgoing.drop_authorization
        )
        headers = tuple(
            inject_context(peer_headers, span) if span is not _NO_SPAN else peer_headers
        )
        return Forward(upstream, headers, _SpanObserver(span, self._done), explain)
