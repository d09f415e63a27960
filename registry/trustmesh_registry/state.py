"""The registry's authoritative in-memory state, its change log and its watchers.

Every write goes to the store first, then to memory, then out to watchers as one
`SnapshotUpdate` stamped (epoch, revision). The epoch is new at every start, so a
registry restored from an older backup is never mistaken for a stale one: sidecars
see a new epoch and take the full snapshot. A write's cost is O(change): only the
changed records are sent, and watchers apply them to their indexes incrementally.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from trustmesh import wire
from trustmesh.delegation_policy import DelegationPolicy
from trustmesh.errors import ConfigError, ManifestError, NotFoundError
from trustmesh.manifest import parse_resource, to_document, validate_batch
from trustmesh.resources import AccessPolicy, Agent, AgentBlueprint
from trustmesh.spiffe_id import SpiffeId
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.v1 import resources_pb2 as pb
from trustmesh_registry.full_snapshot import Records, agent_pb
from trustmesh_registry.full_snapshot import build as build_full
from trustmesh_registry.store import OperatorState, Store

__all__ = ["KINDS", "RegistryState", "Watcher"]

log = logging.getLogger(__name__)


def _serialized(records: Records) -> tuple[int, list[pb.TrustBundle], bytes]:
    return records.revision, records.bundles, build_full(records).SerializeToString()


Resource = Agent | AgentBlueprint | AccessPolicy | DelegationPolicy
KINDS = {
    "AgentBlueprint": AgentBlueprint,
    "Agent": Agent,
    "AccessPolicy": AccessPolicy,
    "DelegationPolicy": DelegationPolicy,
}
_ALIASES = {k.lower(): k for k in KINDS} | {
    "agents": "Agent",
    "blueprint": "AgentBlueprint",
    "blueprints": "AgentBlueprint",
    "agentblueprints": "AgentBlueprint",
    "policy": "AccessPolicy",
    "policies": "AccessPolicy",
    "accesspolicies": "AccessPolicy",
    "delegationpolicies": "DelegationPolicy",
    "delegations": "DelegationPolicy",
    "delegation": "DelegationPolicy",
}


def canonical_kind(kind: str) -> str:
    found = _ALIASES.get(kind.lower())
    if found is None:
        raise ConfigError(f"unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return found


def kind_of(resource: Resource) -> str:
    return type(resource).__name__


class Watcher:
    """One watch stream's queue. Dropped (and resynced by the sidecar) if it lags."""

    def __init__(self, limit: int = 4096) -> None:
        self.queue: asyncio.Queue[rpb.SnapshotUpdate | None] = asyncio.Queue(limit)

    def offer(self, update: rpb.SnapshotUpdate) -> bool:
        try:
            self.queue.put_nowait(update)
        except asyncio.QueueFull:
            return False
        return True


@dataclass(frozen=True)
class ApplyResult:
    applied: list[str]
    revision: int


class RegistryState:
    def __init__(
        self,
        store: Store,
        bundles: Callable[[], Iterable[pb.TrustBundle]],
        *,
        reserved_ids: Callable[[SpiffeId], bool] = lambda _id: False,
        log_size: int = 4096,
    ) -> None:
        self._store = store
        self._bundles = bundles
        self._reserved = reserved_ids
        self.epoch = uuid.uuid4().hex
        self.revision = 0
        self._log: collections.deque[rpb.SnapshotUpdate] = collections.deque(maxlen=log_size)
        # The last full snapshot served, serialized, with its revision and the bundles
        # it holds (`full_backlog`).
        self._full: tuple[int, list[pb.TrustBundle], bytes] | None = None
        self._building: asyncio.Future[tuple[int, list[pb.TrustBundle], bytes]] | None = None
        self._watchers: set[Watcher] = set()
        self.blueprints: dict[str, AgentBlueprint] = {}
        self.agents: dict[str, Agent] = {}
        self.policies: dict[str, AccessPolicy] = {}
        self.delegation_policies: dict[str, DelegationPolicy] = {}
        self.agents_by_id: dict[SpiffeId, str] = {}
        self.endpoints: dict[tuple[str, str], pb.Endpoint] = {}
        stored = store.load()
        self.operator = dict(stored.operator)
        for (kind, name), doc in stored.documents.items():
            self._put(parse_resource(doc, f"stored {kind}/{name}"))
        # Endpoints that were live when the last registry stopped: served until their
        # sidecars reconnect, or until `expire_stale_endpoints()` after a grace period.
        self._stale: set[tuple[str, str]] = set()
        # Set while the registry shuts down: the watch streams it ends are not sidecars
        # going away, so their endpoints stay stored for the next run.
        self.closing = False
        for spiffe_id, instance_id, address in store.load_endpoints():
            key = (spiffe_id, instance_id)
            self.endpoints[key] = pb.Endpoint(
                spiffe_id=spiffe_id, instance_id=instance_id, address=address
            )
            self._stale.add(key)

    # -- reads -------------------------------------------------------------------

    def records(self) -> Records:
        """A still copy of what a full snapshot holds now (shallow: records are immutable)."""
        return Records(
            epoch=self.epoch,
            revision=self.revision,
            bundles=list(self._bundles()),
            blueprints=dict(self.blueprints),
            agents=list(self.agents.values()),
            operator=dict(self.operator),
            policies=list(self.policies.values()),
            delegation_policies=list(self.delegation_policies.values()),
            endpoints=list(self.endpoints.values()),
        )

    def full_snapshot(self) -> rpb.SnapshotUpdate:
        return build_full(self.records())

    def full_backlog(self, max_deltas: int = 256) -> tuple[list[rpb.SnapshotUpdate | bytes], int]:
        """What a watcher that needs a full snapshot is sent, and the revision it brings
        the watcher to (the current one).

        That is a full snapshot of some revision R, serialized once and shared (at
        100,000 agents building one takes about 2 s and serializing it 0.2 s; after a
        registry restart every sidecar asks for one, and each that reports an
        endpoint adds a revision), followed by the deltas after R, as a watcher
        resuming at R would get them. A new one is built when the log no longer
        holds the deltas after R, or when there are more than `max_deltas` of them, or
        when the trust bundles differ from those it holds (with SPIFFE credentials they
        can change without a revision). Builds here, on the caller's thread; the Watch
        handler uses `full_backlog_async`."""
        found = self._shared_backlog(max_deltas)
        if found is not None:
            return found
        self._full = _serialized(self.records())
        return [self._full[2]], self.revision

    async def full_backlog_async(
        self, max_deltas: int = 256
    ) -> tuple[list[rpb.SnapshotUpdate | bytes], int]:
        """`full_backlog`, with a new full snapshot built in a worker thread from a still
        copy of the records (`full_snapshot.Records`), so the event loop keeps serving.
        Watchers that arrive during a build wait for it instead of starting another."""
        while True:
            found = self._shared_backlog(max_deltas)
            if found is not None:
                return found
            if self._building is None or self._building.done():
                records = self.records()  # on the loop: the copy is consistent
                self._building = asyncio.ensure_future(asyncio.to_thread(_serialized, records))
            building = self._building
            revision, bundles, data = await asyncio.shield(building)
            if self._full is None or self._full[0] < revision:
                self._full = (revision, bundles, data)
            # The copy it waited for, with every delta since, even more than
            # `max_deltas` (a burst of writes during the build); built anew only when
            # the log no longer holds them or the bundles changed meanwhile.
            deltas = self.updates_since(self.epoch, revision)
            if deltas is not None and bundles == list(self._bundles()):
                return [data, *deltas], self.revision

    def _shared_backlog(
        self, max_deltas: int
    ) -> tuple[list[rpb.SnapshotUpdate | bytes], int] | None:
        if self._full is None:
            return None
        revision, held, data = self._full
        deltas = self.updates_since(self.epoch, revision)
        if deltas is None or len(deltas) > max_deltas or held != list(self._bundles()):
            return None
        return [data, *deltas], self.revision

    def updates_since(self, epoch: str, revision: int) -> list[rpb.SnapshotUpdate] | None:
        """The deltas after `revision`, or None when only a full snapshot will do."""
        if epoch != self.epoch or revision > self.revision:
            return None
        if revision == self.revision:
            return []
        if not self._log or self._log[0].base_revision > revision:
            return None
        return [u for u in self._log if u.base_revision >= revision]

    def find_agent(self, ref: str) -> Agent:
        name = ref
        if ref.startswith("spiffe://"):
            found = self.agents_by_id.get(SpiffeId.parse(ref))
            if found is None:
                raise NotFoundError(f"no agent with SPIFFE ID {ref}")
            name = found
        agent = self.agents.get(name)
        if agent is None:
            raise NotFoundError(f"no agent named {ref!r}")
        return agent

    def documents(self, kind: str, name: str = "") -> list[dict[str, Any]]:
        kind = canonical_kind(kind)
        tables: dict[str, dict[str, Any]] = {
            "AgentBlueprint": self.blueprints,
            "Agent": self.agents,
            "AccessPolicy": self.policies,
            "DelegationPolicy": self.delegation_policies,
        }
        table = tables[kind]
        if name and name not in table:
            raise NotFoundError(f"{kind}/{name} not found")
        out = []
        for res in [table[name]] if name else table.values():
            doc = to_document(res)
            if isinstance(res, Agent):
                op = self.operator.get(res.name, OperatorState(False))
                doc["status"] = {
                    "state": "Disabled" if op.disabled else "Active",
                    "disabledReason": op.reason,
                    "endpoints": sorted(
                        e.address
                        for (sid, _), e in self.endpoints.items()
                        if sid == str(res.spiffe_id)
                    ),
                }
            out.append(doc)
        return out

    # -- writes ------------------------------------------------------------------

    def apply(self, documents: list[tuple[str, Any]], *, dry_run: bool = False) -> ApplyResult:
        resources = [parse_resource(obj, source) for source, obj in documents]
        validate_batch(resources, set(self.blueprints), sources=[source for source, _ in documents])
        for (source, _), res in zip(documents, resources, strict=True):
            self._check_agent(source, res, resources)
        applied: list[str] = []
        puts: list[tuple[tuple[str, str], dict[str, Any]]] = []
        for res in resources:
            kind, doc = kind_of(res), to_document(res)
            old = self._get(kind, res.name)
            if old is None:
                verb = "created"
            elif to_document(old) == doc:
                verb = "unchanged"
            else:
                verb = "configured"
            applied.append(f"{kind}/{res.name} {verb}")
            if verb != "unchanged":
                puts.append(((kind, res.name), doc))
        if dry_run or not puts:
            return ApplyResult(applied, self.revision)
        self._store.write_resources(puts, [])
        changes: list[rpb.Change] = []
        changed_blueprints: set[str] = set()
        for res in resources:
            if (kind_of(res), res.name) not in {k for k, _ in puts}:
                continue
            self._put(res)
            if isinstance(res, AgentBlueprint):
                changed_blueprints.add(res.name)
                changes.append(rpb.Change(put_blueprint=wire.blueprint_to_pb(res)))
            elif isinstance(res, Agent):
                changes.append(rpb.Change(put_agent=self._agent_pb(res)))
            elif isinstance(res, AccessPolicy):
                changes.append(rpb.Change(put_policy=wire.policy_to_pb(res)))
            else:
                changes.append(rpb.Change(put_delegation_policy=wire.delegation_policy_to_pb(res)))
        if changed_blueprints:  # effective attributes of their agents may have changed
            changes += [
                rpb.Change(put_agent=self._agent_pb(a))
                for a in self.agents.values()
                if a.blueprint in changed_blueprints
            ]
        return ApplyResult(applied, self._publish(changes))

    def delete(self, kind: str, name: str) -> int:
        kind = canonical_kind(kind)
        res = self._get(kind, name)
        if res is None:
            raise NotFoundError(f"{kind}/{name} not found")
        if isinstance(res, AgentBlueprint):
            users = sorted(a.name for a in self.agents.values() if a.blueprint == name)
            if users:
                raise ConfigError(
                    f"AgentBlueprint/{name} is used by agents: {', '.join(users[:10])}"
                )
        self._store.write_resources([], [(kind, name)])
        if isinstance(res, Agent):
            del self.agents[name]
            self.agents_by_id.pop(res.spiffe_id, None)
            change = rpb.Change(delete_agent=name)
        elif isinstance(res, AgentBlueprint):
            del self.blueprints[name]
            change = rpb.Change(delete_blueprint=name)
        elif isinstance(res, AccessPolicy):
            del self.policies[name]
            change = rpb.Change(delete_policy=name)
        else:
            del self.delegation_policies[name]
            change = rpb.Change(delete_delegation_policy=name)
        return self._publish([change])

    def set_agent_state(self, ref: str, *, disabled: bool, reason: str) -> int:
        agent = self.find_agent(ref)
        state = OperatorState(disabled, reason if disabled else "")
        self._store.set_operator_state(agent.name, state)
        self.operator[agent.name] = state
        return self._publish([rpb.Change(put_agent=self._agent_pb(agent))])

    def put_endpoint(self, endpoint: pb.Endpoint) -> None:
        key = (endpoint.spiffe_id, endpoint.instance_id)
        self._stale.discard(key)
        self.endpoints[key] = endpoint
        self._store.put_endpoint(endpoint.spiffe_id, endpoint.instance_id, endpoint.address)
        self._publish([rpb.Change(put_endpoint=endpoint)])

    def delete_endpoint(self, endpoint: pb.Endpoint) -> None:
        key = (endpoint.spiffe_id, endpoint.instance_id)
        self._stale.discard(key)
        self._store.delete_endpoint(endpoint.spiffe_id, endpoint.instance_id)
        if self.endpoints.pop(key, None) is not None:
            self._publish([rpb.Change(delete_endpoint=endpoint)])

    def expire_stale_endpoints(self) -> int:
        """Drop the endpoints inherited from the last run that no sidecar re-reported."""
        stale = [self.endpoints[k] for k in self._stale if k in self.endpoints]
        self._stale.clear()
        for endpoint in stale:
            self.delete_endpoint(endpoint)
        return len(stale)

    def bundles_changed(self) -> None:
        self._publish([rpb.Change(put_bundle=b) for b in self._bundles()])

    # -- watchers ------------------------------------------------------------------

    def subscribe(self) -> Watcher:
        watcher = Watcher()
        self._watchers.add(watcher)
        return watcher

    def unsubscribe(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    @property
    def watcher_count(self) -> int:
        return len(self._watchers)

    # -- internals -------------------------------------------------------------------

    def _publish(self, changes: list[rpb.Change]) -> int:
        base = self.revision
        self.revision += 1
        update = rpb.SnapshotUpdate(
            epoch=self.epoch, revision=self.revision, base_revision=base, changes=changes
        )
        self._log.append(update)
        for watcher in list(self._watchers):
            if not watcher.offer(update):
                log.warning("dropping a watcher that fell behind; it will resync")
                self._watchers.discard(watcher)
                watcher.queue = asyncio.Queue(1)
                watcher.queue.put_nowait(None)
        return self.revision

    def _get(self, kind: str, name: str) -> Resource | None:
        if kind == "Agent":
            return self.agents.get(name)
        if kind == "AgentBlueprint":
            return self.blueprints.get(name)
        if kind == "AccessPolicy":
            return self.policies.get(name)
        return self.delegation_policies.get(name)

    def _put(self, res: Resource) -> None:
        if isinstance(res, Agent):
            old = self.agents.get(res.name)
            if old is not None:
                self.agents_by_id.pop(old.spiffe_id, None)
            self.agents[res.name] = res
            self.agents_by_id[res.spiffe_id] = res.name
        elif isinstance(res, AgentBlueprint):
            self.blueprints[res.name] = res
        elif isinstance(res, AccessPolicy):
            self.policies[res.name] = res
        else:
            self.delegation_policies[res.name] = res

    def _check_agent(self, source: str, res: Resource, batch: list[Resource]) -> None:
        if not isinstance(res, Agent):
            return
        if self._reserved(res.spiffe_id):
            raise ManifestError(
                source, "spec.spiffeId", f"{res.spiffe_id} is reserved for TrustMesh itself"
            )
        owner = self.agents_by_id.get(res.spiffe_id)
        if owner is not None and owner != res.name:
            renamed = any(
                isinstance(o, Agent) and o.name == owner and o.spiffe_id != res.spiffe_id
                for o in batch
            )
            if not renamed:
                raise ManifestError(
                    source, "spec.spiffeId", f"{res.spiffe_id} already belongs to Agent/{owner}"
                )

    def _agent_pb(self, agent: Agent) -> pb.Agent:
        return agent_pb(agent, self.blueprints, self.operator)
