"""Authorization decisions, computed locally from a `Snapshot`. Pure: no I/O, no clock.

`authorize(caller, callee, method, snapshot, now=...)` checks, in this order, and
returns the first denial as a `Decision`:

1. the snapshot is ready (`no_snapshot`);
2. the caller is a registered agent (`agent_not_registered`), is not disabled
   (`agent_disabled`, with the operator's reason) and has not expired at `now`
   (`agent_expired`: `now >= expiresAt`);
3. the same three for the callee (the message says "callee");
4. the method is a well-formed gRPC path (`bad_method`);
5. the method is within the CALLEE's blueprint `allowedMethods` (`method_not_in_blueprint`);
6. some AccessPolicy has a caller selector matching the caller, a callee selector
   matching the callee and a method pattern matching the method (`no_matching_policy`).

How blueprints and policies combine: a blueprint's `allowedMethods` is a ceiling on
what instances of that blueprint serve; it grants nothing by itself. A call is
allowed only if the method is within the callee's blueprint allowedMethods AND an
AccessPolicy allows it. A policy naming methods beyond the ceiling does not widen
it, and an empty policy set denies everything. The caller's blueprint does not
limit what it may call. An allowed decision names the matching policy (the first by
name when several match).

Cost and caching: records are found by dict lookups and policies through the
snapshot's selector indexes, so a decision never iterates over all agents or all
policies. Steps 4-6 depend only on the snapshot, so their result is memoized per
(caller, callee, method) in a bounded cache tied to `snapshot.generation`; any
applied update invalidates it. Steps 1-3 are evaluated on every call, so a cached
allow never outlives a disable or an `expiresAt`.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from datetime import UTC, datetime

from trustmesh.decision import Decision, Reason
from trustmesh.errors import InvalidSpiffeIdError
from trustmesh.limits import DEFAULT_LIMITS
from trustmesh.resources import AgentView, is_grpc_method
from trustmesh.snapshot import Snapshot
from trustmesh.spiffe_id import SpiffeId
from trustmesh.v1 import resources_pb2 as pb

__all__ = ["DecisionCache", "Target", "authorize", "decision_cache", "resolve_target"]


class DecisionCache:
    """A bounded map from (caller, callee, method) to the snapshot-only part of a decision.

    Entries belong to one snapshot generation; a lookup at another generation empties
    the cache. When full, the oldest entry goes.
    """

    def __init__(self, max_entries: int = DEFAULT_LIMITS.decision_cache):
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._generation = -1
        # OrderedDict: evicting the oldest is O(1). A plain dict's next(iter()) walks
        # the slots its earlier deletions left empty, which grows as it churns.
        self._entries: OrderedDict[Hashable, Decision] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, generation: int, key: Hashable) -> Decision | None:
        with self._lock:
            if generation != self._generation:
                self._entries.clear()
                self._generation = generation
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
            return found

    def put(self, generation: int, key: Hashable, decision: Decision) -> None:
        with self._lock:
            if generation != self._generation:
                return  # computed against a snapshot that has moved on
            if key not in self._entries and len(self._entries) >= self.max_entries:
                self._entries.popitem(last=False)
            self._entries[key] = decision

    def __len__(self) -> int:
        return len(self._entries)


_CACHES: weakref.WeakKeyDictionary[Snapshot, DecisionCache] = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def decision_cache(snapshot: Snapshot) -> DecisionCache:
    """The decision cache that `authorize` uses for this snapshot."""
    cache = _CACHES.get(snapshot)
    if cache is None:
        with _CACHES_LOCK:
            cache = _CACHES.setdefault(snapshot, DecisionCache())
    return cache


def _when(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _check_agent(
    role: str, spiffe_id: SpiffeId, agent: AgentView | None, now: datetime, context: str
) -> Decision | None:
    """A denial if the agent is unknown, disabled or expired; None if it may take part."""
    if agent is None:
        return Decision.deny(
            Reason.AGENT_NOT_REGISTERED, f"{role} '{spiffe_id}' is not a registered agent{context}"
        )
    if agent.disabled:
        why = f": {agent.disabled_reason}" if agent.disabled_reason else ""
        return Decision.deny(
            Reason.AGENT_DISABLED,
            f"{role} '{spiffe_id}' (agent {agent.name!r}) is disabled{why}{context}",
        )
    if agent.expires_at is not None and agent.expired(now):
        return Decision.deny(
            Reason.AGENT_EXPIRED,
            f"{role} '{spiffe_id}' (agent {agent.name!r}) expired at "
            f"{_when(agent.expires_at)}{context}",
        )
    return None


def _require_aware(now: datetime) -> None:
    if now.utcoffset() is None:
        raise ValueError("now must be a datetime with a timezone")


def _snapshot_decision(
    caller: AgentView, callee: AgentView, method: str, snapshot: Snapshot
) -> Decision:
    """Steps 4-6: depend on the snapshot and the request only, never on `now`."""
    call = f"{method} from '{caller.spiffe_id}' to '{callee.spiffe_id}'"
    if not is_grpc_method(method):
        return Decision.deny(
            Reason.BAD_METHOD,
            f"{method!r} is not a gRPC method path (/package.Service/Method): "
            f"call from '{caller.spiffe_id}' to '{callee.spiffe_id}'",
        )
    blueprint = snapshot.blueprint(callee.blueprint)
    if blueprint is None:
        return Decision.deny(
            Reason.METHOD_NOT_IN_BLUEPRINT,
            f"callee's blueprint {callee.blueprint!r} is not registered, so it serves no "
            f"methods: {call}",
        )
    if not blueprint.allows_method(method):
        return Decision.deny(
            Reason.METHOD_NOT_IN_BLUEPRINT,
            f"{method} is not in the allowedMethods of callee's blueprint "
            f"{blueprint.name!r}: {call}",
        )
    # The candidates' selectors match by construction of the indexes (a property test
    # holds them to a scan of every policy), so only their methods are left to check.
    for policy in snapshot.candidate_policies(caller, callee):
        if policy.allows_method(method):
            return Decision.allow(policy.name, f"AccessPolicy {policy.name!r} allows {call}")
    return Decision.deny(Reason.NO_MATCHING_POLICY, f"no AccessPolicy allows {call}")


def authorize(
    caller: SpiffeId, callee: SpiffeId, method: str, snapshot: Snapshot, *, now: datetime
) -> Decision:
    """Decide whether `caller` may call `method` on `callee` (see the module docstring)."""
    _require_aware(now)
    if not snapshot.ready:
        return Decision.deny(Reason.NO_SNAPSHOT, "no registry snapshot yet; denying all calls")
    caller_view = snapshot.agent_by_id(caller)
    callee_view = snapshot.agent_by_id(callee)
    if not (_active(caller_view, now) and _active(callee_view, now)):
        context = f" (call {method} from '{caller}' to '{callee}')"
        denied = _check_agent("caller", caller, caller_view, now, context)
        if denied is None:
            denied = _check_agent("callee", callee, callee_view, now, context)
        assert denied is not None  # one of the two is not active
        return denied
    assert caller_view is not None and callee_view is not None  # both active
    cache = decision_cache(snapshot)
    # The views' interned ID texts: C-level hashing, comparisons by identity.
    key = (caller_view.spiffe_id.text, callee_view.spiffe_id.text, method)
    generation = snapshot.generation
    decision = cache.get(generation, key)
    if decision is None:
        decision = _snapshot_decision(caller_view, callee_view, method, snapshot)
        cache.put(generation, key, decision)
    return decision


def _active(agent: AgentView | None, now: datetime) -> bool:
    """Registered, not disabled, not expired: what `_check_agent` lets through."""
    return (
        agent is not None
        and not agent.disabled
        and (agent.expires_at is None or not agent.expired(now))
    )


@dataclass(frozen=True, slots=True)
class Target:
    """Where an outbound call goes: the agent and its live instances."""

    agent: AgentView
    endpoints: tuple[pb.Endpoint, ...]


def resolve_target(target: str, snapshot: Snapshot, *, now: datetime) -> Decision | Target:
    """Find the agent an outbound call names (agent name or SPIFFE ID) and its endpoints.

    Returns a denial (`missing_target`, `no_snapshot`, `unknown_target`,
    `agent_disabled`, `agent_expired`, `no_endpoint`) or the `Target`.
    """
    _require_aware(now)
    if not target.strip():
        return Decision.deny(
            Reason.MISSING_TARGET, "no target agent given (an agent name or a SPIFFE ID)"
        )
    if not snapshot.ready:
        return Decision.deny(Reason.NO_SNAPSHOT, "no registry snapshot yet; cannot resolve")
    if target.startswith("spiffe://"):
        try:
            spiffe_id = SpiffeId.parse(target)
        except InvalidSpiffeIdError as e:
            return Decision.deny(Reason.UNKNOWN_TARGET, f"unknown target: {e.message}")
        agent = snapshot.agent_by_id(spiffe_id)
    else:
        agent = snapshot.agent_by_name(target)
    if agent is None:
        return Decision.deny(
            Reason.UNKNOWN_TARGET,
            f"unknown target {target[:256]!r}: no registered agent has this name or SPIFFE ID",
        )
    denied = _check_agent("target", agent.spiffe_id, agent, now, "")
    if denied is not None:
        return denied
    endpoints = snapshot.endpoints(agent.spiffe_id)
    if not endpoints:
        return Decision.deny(
            Reason.NO_ENDPOINT,
            f"target {agent.name!r} ('{agent.spiffe_id}') has no live instance",
        )
    return Target(agent, endpoints)
