"""The sidecar's in-memory view of the registry, kept current by `SnapshotUpdate`s.

Invariants:
* A delta applies only on top of the exact state it was computed from (same epoch,
  `base_revision == revision`) and only after a full snapshot; otherwise `apply`
  returns False and the caller resyncs. A full snapshot replaces everything.
* An update is decoded and validated completely before anything changes: a
  malformed record raises `InvalidSnapshotError` and leaves the snapshot as it was.
* Every index is maintained incrementally: applying a change costs O(size of the
  change), and every read is a dict lookup. Nothing here iterates over all agents
  or all policies after an update has been applied.
* `generation` grows by one on every successful apply; caches key on it.
* DelegationPolicies are indexed by their callee selectors (so a callee finds the
  policies naming it without looking at the others) and by the agents that could
  forward a chain under them (`can_delegate_onward`, the sign-only-when-needed rule
  of docs/delegation.md).

Not thread-safe: one owner applies updates and serves reads (e.g. one event loop).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, Protocol, TypeVar

from trustmesh.delegation_policy import DelegationPolicy
from trustmesh.errors import InvalidSpiffeIdError, PeerError
from trustmesh.resources import (
    AccessPolicy,
    AgentBlueprint,
    AgentView,
    Attributes,
    InvalidResourceError,
    Selector,
    SelectorKind,
)
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.v1 import registry_pb2
from trustmesh.v1 import resources_pb2 as pb
from trustmesh.wire import (
    Pool,
    agent_from_pb,
    blueprint_from_pb,
    delegation_policy_from_pb,
    policy_from_pb,
)

__all__ = ["InvalidSnapshotError", "Snapshot"]


class InvalidSnapshotError(PeerError):
    """The registry sent a record that does not validate; the snapshot is unchanged."""

    reason = "invalid_snapshot"


class _Named(Protocol):
    @property
    def name(self) -> str: ...


_P = TypeVar("_P", bound=_Named)


class _SelectorIndex(Generic[_P]):
    """The policies (Access- or DelegationPolicy) by the selectors on one side of each.

    SPIFFE ID, name and blueprint selectors are filed in one dict per kind, keyed by
    the value (an ID by its interned text). An attribute selector is filed under one
    of its (key, value) pairs, the first in sorted order; its other pairs are checked
    on lookup.

    A value named by one policy maps to the policy itself; one named by several maps
    to a dict of them by name. At 100,000 agents nearly every entry is of the first
    kind, and a decision then reads the policy without a container in between and
    without a second lookup by name: fewer cold cache lines, which is what a
    decision's cost at that size is made of.
    """

    __slots__ = ("by_attr", "by_blueprint", "by_id", "by_name")

    def __init__(self) -> None:
        self.by_id: dict[str, _P | dict[str, _P]] = {}
        self.by_name: dict[str, _P | dict[str, _P]] = {}
        self.by_blueprint: dict[str, _P | dict[str, _P]] = {}
        self.by_attr: dict[tuple[str, str], dict[str, tuple[_P, set[Attributes]]]] = {}

    def _filed(self, kind: SelectorKind) -> dict[str, _P | dict[str, _P]]:
        if kind is SelectorKind.SPIFFE_ID:
            return self.by_id
        if kind is SelectorKind.NAME:
            return self.by_name
        return self.by_blueprint

    def add(self, policy: _P, selectors: Iterable[Selector]) -> None:
        for s in selectors:
            if isinstance(s.value, Attributes):
                anchor = min(s.value.items())
                filed = self.by_attr.setdefault(anchor, {})
                filed.setdefault(policy.name, (policy, set()))[1].add(s.value)
                continue
            index, key = self._filed(s.kind), _key(s.value)
            held = index.get(key)
            if held is None:
                index[key] = policy
            elif isinstance(held, dict):
                held[policy.name] = policy
            elif held.name != policy.name:
                index[key] = {held.name: held, policy.name: policy}

    def remove(self, policy: _P, selectors: Iterable[Selector]) -> None:
        for s in selectors:
            if isinstance(s.value, Attributes):
                anchor = min(s.value.items())
                attr_filed = self.by_attr.get(anchor)
                if attr_filed is not None:
                    attr_filed.pop(policy.name, None)
                    if not attr_filed:
                        del self.by_attr[anchor]
                continue
            index, key = self._filed(s.kind), _key(s.value)
            held = index.get(key)
            if held is None:
                continue
            if not isinstance(held, dict):
                if held.name == policy.name:
                    del index[key]
                continue
            held.pop(policy.name, None)
            if len(held) == 1:
                index[key] = next(iter(held.values()))

    def lookup(self, agent: AgentView) -> dict[str, _P]:
        """The policies with a selector on this side that matches `agent`, by name."""
        found: dict[str, _P] = {}
        for held in (
            self.by_id.get(agent.spiffe_id.text),
            self.by_name.get(agent.name),
            self.by_blueprint.get(agent.blueprint),
        ):
            if held is None:
                continue
            if isinstance(held, dict):
                found.update(held)
            else:
                found[held.name] = held
        if self.by_attr:
            attrs = agent.attributes
            for pair in attrs.items():
                attr_filed = self.by_attr.get(pair)
                if attr_filed is None:
                    continue
                for name, (policy, matches) in attr_filed.items():
                    if name not in found and any(m.within(attrs) for m in matches):
                        found[name] = policy
        return found


def _key(value: SpiffeId | str) -> str:
    """The index key of a non-attribute selector value."""
    return value.text if isinstance(value, SpiffeId) else value


class _State:
    """The records and their indexes; `Snapshot` swaps in a fresh one on a full update."""

    def __init__(self) -> None:
        self.agents_by_name: dict[str, AgentView] = {}
        # Keyed by SpiffeId.text (interned): C-level probes, usually matched by identity.
        self.agents_by_id: dict[str, AgentView] = {}
        self.blueprints: dict[str, AgentBlueprint] = {}
        self.policies: dict[str, AccessPolicy] = {}
        self.endpoints: dict[str, dict[str, pb.Endpoint]] = {}  # by SpiffeId.text
        self.endpoint_count = 0
        self.bundles: dict[str, tuple[bytes, ...]] = {}
        self.callers: _SelectorIndex[AccessPolicy] = _SelectorIndex()
        self.callees: _SelectorIndex[AccessPolicy] = _SelectorIndex()
        self.delegation_policies: dict[str, DelegationPolicy] = {}
        self.delegation_callees: _SelectorIndex[DelegationPolicy] = _SelectorIndex()
        # Who may forward a chain: by selector, and the policies that let anyone.
        self.forwarders: _SelectorIndex[DelegationPolicy] = _SelectorIndex()
        self.anyone_forwards: set[str] = set()

    def put_agent(self, agent: AgentView) -> None:
        self.delete_agent(agent.name)
        self.agents_by_name[agent.name] = agent
        self.agents_by_id[agent.spiffe_id.text] = agent

    def delete_agent(self, name: str) -> None:
        old = self.agents_by_name.pop(name, None)
        # Only drop the ID entry if it is still this agent's (another may have taken it).
        if old is not None and self.agents_by_id.get(old.spiffe_id.text) is old:
            del self.agents_by_id[old.spiffe_id.text]

    def put_blueprint(self, blueprint: AgentBlueprint) -> None:
        self.blueprints[blueprint.name] = blueprint

    def delete_blueprint(self, name: str) -> None:
        self.blueprints.pop(name, None)

    def put_policy(self, policy: AccessPolicy) -> None:
        self.delete_policy(policy.name)
        self.policies[policy.name] = policy
        self.callers.add(policy, policy.callers)
        self.callees.add(policy, policy.callees)

    def delete_policy(self, name: str) -> None:
        old = self.policies.pop(name, None)
        if old is not None:
            self.callers.remove(old, old.callers)
            self.callees.remove(old, old.callees)

    def put_delegation_policy(self, policy: DelegationPolicy) -> None:
        self.delete_delegation_policy(policy.name)
        self.delegation_policies[policy.name] = policy
        self.delegation_callees.add(policy, policy.callees)
        anyone, selectors = policy.forwarders()
        self.forwarders.add(policy, selectors)
        if anyone:
            self.anyone_forwards.add(policy.name)

    def delete_delegation_policy(self, name: str) -> None:
        old = self.delegation_policies.pop(name, None)
        if old is not None:
            self.delegation_callees.remove(old, old.callees)
            self.forwarders.remove(old, old.forwarders()[1])
            self.anyone_forwards.discard(name)

    def put_endpoint(self, spiffe_id: SpiffeId, endpoint: pb.Endpoint) -> None:
        instances = self.endpoints.setdefault(spiffe_id.text, {})
        if endpoint.instance_id not in instances:
            self.endpoint_count += 1
        instances[endpoint.instance_id] = endpoint

    def delete_endpoint(self, spiffe_id: SpiffeId, instance_id: str) -> None:
        instances = self.endpoints.get(spiffe_id.text)
        if instances is not None and instances.pop(instance_id, None) is not None:
            self.endpoint_count -= 1
            if not instances:
                del self.endpoints[spiffe_id.text]

    def put_bundle(self, trust_domain: str, authorities: tuple[bytes, ...]) -> None:
        self.bundles[trust_domain] = authorities


_Op = Callable[[_State], None]
_ONWARD_MAX = 4096


def _endpoint(msg: pb.Endpoint) -> tuple[SpiffeId, pb.Endpoint]:
    if not msg.instance_id:
        raise InvalidResourceError("instance_id", "must not be empty")
    copy = pb.Endpoint()
    copy.CopyFrom(msg)  # our own copy: the caller's message may be reused
    return SpiffeId.parse(msg.spiffe_id), copy


def _decode(change: registry_pb2.Change, pool: Pool) -> _Op:
    """Validate one change and return the step that applies it."""
    which = change.WhichOneof("change")
    if which == "put_agent":
        agent = agent_from_pb(change.put_agent, pool)
        return lambda st: st.put_agent(agent)
    if which == "delete_agent":
        name = change.delete_agent
        return lambda st: st.delete_agent(name)
    if which == "put_blueprint":
        blueprint = blueprint_from_pb(change.put_blueprint)
        return lambda st: st.put_blueprint(blueprint)
    if which == "delete_blueprint":
        bp_name = change.delete_blueprint
        return lambda st: st.delete_blueprint(bp_name)
    if which == "put_policy":
        policy = policy_from_pb(change.put_policy, pool)
        return lambda st: st.put_policy(policy)
    if which == "delete_policy":
        policy_name = change.delete_policy
        return lambda st: st.delete_policy(policy_name)
    if which == "put_delegation_policy":
        delegation = delegation_policy_from_pb(change.put_delegation_policy)
        return lambda st: st.put_delegation_policy(delegation)
    if which == "delete_delegation_policy":
        delegation_name = change.delete_delegation_policy
        return lambda st: st.delete_delegation_policy(delegation_name)
    if which == "put_endpoint":
        ep_id, endpoint = _endpoint(change.put_endpoint)
        return lambda st: st.put_endpoint(ep_id, endpoint)
    if which == "delete_endpoint":
        del_id = SpiffeId.parse(change.delete_endpoint.spiffe_id)
        instance = change.delete_endpoint.instance_id
        return lambda st: st.delete_endpoint(del_id, instance)
    if which == "put_bundle":
        td = TrustDomain.parse(change.put_bundle.trust_domain).name
        authorities = tuple(change.put_bundle.x509_authorities)
        return lambda st: st.put_bundle(td, authorities)
    raise InvalidResourceError("change", "no change field is set")


def _decode_all(update: registry_pb2.SnapshotUpdate) -> list[_Op]:
    ops: list[_Op] = []
    pool: Pool = {}
    for i, change in enumerate(update.changes):
        try:
            ops.append(_decode(change, pool))
        except (InvalidResourceError, InvalidSpiffeIdError) as e:
            raise InvalidSnapshotError(
                f"the registry sent an invalid change #{i + 1} "
                f"({change.WhichOneof('change')}) at revision {update.revision}: {e.message}"
            ) from e
    return ops


class Snapshot:
    """Agents, blueprints, policies, endpoints and bundles, with O(1) lookups."""

    def __init__(self) -> None:
        self._state = _State()
        self._epoch = ""
        self._revision = 0
        self._generation = 0
        self._ready = False
        # can_delegate_onward answers for this generation: id(agent) -> (agent, answer)
        self._onward: dict[int, tuple[AgentView, bool]] = {}
        self._onward_generation = -1

    # -- updates ------------------------------------------------------------------

    def apply(self, update: registry_pb2.SnapshotUpdate) -> bool:
        """Apply a full snapshot or a delta; False when a delta doesn't fit (resync).

        Raises `InvalidSnapshotError` for a malformed record, changing nothing.
        """
        if update.full:
            ops = _decode_all(update)
            fresh = _State()
            for op in ops:
                op(fresh)
            self._state = fresh
            self._epoch = update.epoch
            self._ready = True
        else:
            if (
                not self._ready
                or update.epoch != self._epoch
                or update.base_revision != self._revision
                or update.revision < update.base_revision
            ):
                return False
            for op in _decode_all(update):
                op(self._state)
        self._revision = update.revision
        self._generation += 1
        return True

    # -- reads --------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once a full snapshot has been applied."""
        return self._ready

    @property
    def epoch(self) -> str:
        return self._epoch

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def generation(self) -> int:
        return self._generation

    def agent_by_id(self, spiffe_id: SpiffeId) -> AgentView | None:
        return self._state.agents_by_id.get(spiffe_id.text)

    def agent_by_name(self, name: str) -> AgentView | None:
        return self._state.agents_by_name.get(name)

    def blueprint(self, name: str) -> AgentBlueprint | None:
        return self._state.blueprints.get(name)

    def policy(self, name: str) -> AccessPolicy | None:
        return self._state.policies.get(name)

    def endpoints(self, spiffe_id: SpiffeId) -> tuple[pb.Endpoint, ...]:
        """The live instances of an agent; treat the messages as read-only."""
        instances = self._state.endpoints.get(spiffe_id.text)
        return tuple(instances.values()) if instances else ()

    def bundles(self) -> dict[str, tuple[bytes, ...]]:
        """Trust domain name -> DER X.509 authorities."""
        return dict(self._state.bundles)

    def counts(self) -> dict[str, int]:
        st = self._state
        return {
            "agents": len(st.agents_by_name),
            "blueprints": len(st.blueprints),
            "policies": len(st.policies),
            "endpoints": st.endpoint_count,
            "bundles": len(st.bundles),
        }

    def candidate_policies(self, caller: AgentView, callee: AgentView) -> list[AccessPolicy]:
        """Policies with a caller selector matching `caller` and a callee selector
        matching `callee`, by name. Costs O(policies naming either agent), found
        through the selector indexes; methods are not checked here.
        """
        st = self._state
        callers = st.callers.lookup(caller)
        if not callers:
            return []
        callees = st.callees.lookup(callee)
        return [callers[n] for n in sorted(callers.keys() & callees.keys())]

    def delegation_policy(self, name: str) -> DelegationPolicy | None:
        return self._state.delegation_policies.get(name)

    def delegation_policies_for(self, callee: AgentView) -> list[DelegationPolicy]:
        """DelegationPolicies with a callee selector matching `callee`, by name; found
        through the callee index, so the cost is O(policies naming the callee)."""
        st = self._state
        found = st.delegation_callees.lookup(callee)
        return [found[n] for n in sorted(found)]

    def can_delegate_onward(self, agent: AgentView) -> bool:
        """True when some DelegationPolicy could accept a chain in which `agent` issues
        a hop after the first: only then must the hop addressed to it be signed."""
        if self._onward_generation != self._generation:
            self._onward.clear()
            self._onward_generation = self._generation
        found = self._onward.get(id(agent))
        if found is not None and found[0] is agent:
            return found[1]
        st = self._state
        answer = bool(st.anyone_forwards) or bool(st.forwarders.lookup(agent))
        # Memoized per generation (every applied update starts afresh), keyed by the
        # view itself: a sidecar asks about the same few agents call after call.
        if len(self._onward) >= _ONWARD_MAX:
            self._onward.clear()
        self._onward[id(agent)] = (agent, answer)
        return answer
