"""The CR reconciler's core, with no I/O: custom resources and watch events in, plans out.

The cluster holds TrustMesh resources as cluster-scoped custom resources
(`trustmesh.dev/v1alpha1`: AgentBlueprint, Agent, AccessPolicy, DelegationPolicy),
whose `spec` is exactly what `trustmesh apply` takes. The reconciler makes the
registry hold them.

* `DesiredState` is what the cluster wants: built from list responses
  (`with_listing`) and watch events (`with_event`, the API server's own event JSON).
* `plan(state, observed, prune=...)` compares it with what the registry holds and
  returns the `Apply`/`Delete` actions: applies in dependency order (blueprints,
  agents, policies), then deletes in the reverse order. It is level-triggered: the
  loop calls it again after every change and on a timer, so a failed action is simply
  planned again, and a change that needs two steps (an ID moving between agents)
  converges over two passes.

Safety invariants:
* A CR whose spec does not validate (`trustmesh.manifest.parse_resource`) is reported
  in `Plan.invalid` and neither applied nor deleted: the registry keeps the last good
  version (fail static), exactly as if the bad edit had not been made.
* Nothing of a kind is deleted before that kind has been listed once, so a reconciler
  that is starting never mistakes "not listed yet" for "deleted".
* Without `prune`, only resources this reconciler has seen as CRs are deleted: what an
  operator applied by hand with `trustmesh apply` is left alone. With `prune`, the
  cluster is the source of truth for every kind the registry can list.
* Operator state (`trustmesh agent disable`) is not part of a resource, so re-applying
  a CR never revives a disabled agent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from trustmesh.errors import ManifestError
from trustmesh.manifest import parse_resource, to_document
from trustmesh.resources import API_VERSION, Kind

__all__ = [
    "APPLY_ORDER",
    "GROUP",
    "PLURALS",
    "VERSION",
    "Apply",
    "CustomResource",
    "Delete",
    "DesiredState",
    "Key",
    "Plan",
    "WatchExpiredError",
    "from_api_object",
    "plan",
]

GROUP, VERSION = API_VERSION.split("/")
APPLY_ORDER = (Kind.AGENT_BLUEPRINT, Kind.AGENT, Kind.ACCESS_POLICY, Kind.DELEGATION_POLICY)
PLURALS: Mapping[Kind, str] = MappingProxyType(
    {
        Kind.AGENT_BLUEPRINT: "agentblueprints",
        Kind.AGENT: "agents",
        Kind.ACCESS_POLICY: "accesspolicies",
        Kind.DELEGATION_POLICY: "delegationpolicies",
    }
)
_HTTP_GONE = 410

Key = tuple[Kind, str]
Document = Mapping[str, Any]


class WatchExpiredError(Exception):
    """The watch's resourceVersion is too old (410 Gone): list the kind again."""


@dataclass(frozen=True, slots=True)
class CustomResource:
    """One CR as the registry would see it: the checked document, or why it has none."""

    key: Key
    resource_version: str
    document: Document | None  # the normalised `trustmesh apply` document
    problem: str = ""

    @property
    def valid(self) -> bool:
        return self.document is not None


def _kind_name(obj: Mapping[str, Any]) -> Key:
    if obj.get("apiVersion") != API_VERSION:
        raise ManifestError(
            "k8s", "apiVersion", f"expected {API_VERSION!r}, got {obj.get('apiVersion')!r}"
        )
    raw_kind = obj.get("kind")
    if raw_kind not in {k.value for k in Kind}:
        raise ManifestError("k8s", "kind", f"unknown kind {raw_kind!r}")
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ManifestError(f"k8s:{raw_kind}", "metadata.name", "is required")
    return Kind(raw_kind), name


def from_api_object(obj: Mapping[str, Any]) -> CustomResource:
    """A CR as the API server returns it; raises `ManifestError` only if it can't be keyed."""
    kind, name = _kind_name(obj)
    meta = obj["metadata"]
    version = str(meta.get("resourceVersion", ""))
    # Only the spec travels: labels, annotations, status and the rest are Kubernetes'.
    doc = {
        "apiVersion": API_VERSION,
        "kind": kind.value,
        "metadata": {"name": name},
        "spec": obj.get("spec"),
    }
    try:
        resource = parse_resource(doc, f"{kind.value}/{name}")
    except ManifestError as e:
        return CustomResource((kind, name), version, None, e.message)
    return CustomResource((kind, name), version, MappingProxyType(to_document(resource)))


@dataclass(frozen=True, slots=True)
class DesiredState:
    resources: Mapping[Key, CustomResource] = field(default_factory=lambda: MappingProxyType({}))
    listed: frozenset[Kind] = frozenset()
    managed: frozenset[Key] = frozenset()  # every key seen as a CR (deletable without prune)
    resource_versions: Mapping[Kind, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def ready(self) -> bool:
        """Every kind has been listed at least once."""
        return self.listed >= set(APPLY_ORDER)

    def with_listing(
        self, kind: Kind, objects: Iterable[Mapping[str, Any]], resource_version: str
    ) -> DesiredState:
        """Replace everything of `kind` with a full list response's items."""
        fresh = {}
        for obj in objects:
            cr = from_api_object({"apiVersion": API_VERSION, "kind": kind.value, **obj})
            fresh[cr.key] = cr
        kept = {k: v for k, v in self.resources.items() if k[0] is not kind}
        return replace(
            self,
            resources=MappingProxyType({**kept, **fresh}),
            listed=self.listed | {kind},
            managed=self.managed | set(fresh),
            resource_versions=MappingProxyType({**self.resource_versions, kind: resource_version}),
        )

    def with_event(self, kind: Kind, event: Mapping[str, Any]) -> DesiredState:
        """Apply one watch event (`{"type": ..., "object": {...}}` as the API server sends it)."""
        etype, obj = event.get("type"), event.get("object")
        if not isinstance(obj, Mapping):
            raise ManifestError("k8s:watch", "object", f"a {etype} event without an object")
        if etype == "ERROR":
            if obj.get("code") == _HTTP_GONE:
                raise WatchExpiredError(str(obj.get("message", "resource version too old")))
            raise ManifestError("k8s:watch", "", f"watch error: {obj.get('message', obj)}")
        meta = obj.get("metadata")
        version = str(meta.get("resourceVersion", "")) if isinstance(meta, Mapping) else ""
        version = version or self.resource_versions.get(kind, "")
        versions = MappingProxyType({**self.resource_versions, kind: version})
        if etype == "BOOKMARK":
            return replace(self, resource_versions=versions)
        if etype in ("ADDED", "MODIFIED"):
            cr = from_api_object({"apiVersion": API_VERSION, "kind": kind.value, **obj})
            return replace(
                self,
                resources=MappingProxyType({**self.resources, cr.key: cr}),
                managed=self.managed | {cr.key},
                resource_versions=versions,
            )
        if etype == "DELETED":
            key = _kind_name({"apiVersion": API_VERSION, "kind": kind.value, **obj})
            rest = {k: v for k, v in self.resources.items() if k != key}
            return replace(self, resources=MappingProxyType(rest), resource_versions=versions)
        raise ManifestError("k8s:watch", "type", f"unknown watch event type {etype!r}")

    def forget(self, key: Key) -> DesiredState:
        """`key` is gone from the registry too: stop managing it."""
        return replace(self, managed=self.managed - {key})


@dataclass(frozen=True, slots=True)
class Apply:
    key: Key
    document: Document

    def __str__(self) -> str:
        return f"apply {self.key[0].value}/{self.key[1]}"


@dataclass(frozen=True, slots=True)
class Delete:
    key: Key

    def __str__(self) -> str:
        return f"delete {self.key[0].value}/{self.key[1]}"


Action = Apply | Delete


@dataclass(frozen=True, slots=True)
class Plan:
    actions: tuple[Action, ...] = ()
    invalid: tuple[tuple[Key, str], ...] = ()  # (key, problem) for CRs that don't validate


def _comparable(doc: Mapping[str, Any]) -> dict[str, Any]:
    # The registry adds `status` (operator state, endpoints) to what it returns.
    return {k: doc.get(k) for k in ("apiVersion", "kind", "metadata", "spec")}


def plan(
    state: DesiredState,
    observed: Mapping[Kind, Mapping[str, Document] | None],
    *,
    prune: bool = False,
) -> Plan:
    """The actions that make the registry match `state`.

    `observed[kind]` maps names to the registry's documents, or is None when the
    registry could not list that kind (then every desired resource of it is applied,
    which the registry answers with "unchanged", and only managed keys are deleted).
    """
    applies: list[Action] = []
    deletes: list[Action] = []
    invalid: list[tuple[Key, str]] = []
    for kind in APPLY_ORDER:
        have = observed.get(kind)
        wanted = sorted((k, cr) for k, cr in state.resources.items() if k[0] is kind)
        for key, cr in wanted:
            if cr.document is None:
                invalid.append((key, cr.problem))
            elif (
                have is None
                or key[1] not in have
                or _comparable(have[key[1]]) != _comparable(cr.document)
            ):
                applies.append(Apply(key, cr.document))
    for kind in reversed(APPLY_ORDER):
        if kind not in state.listed:
            continue
        have = observed.get(kind)
        if have is None:
            gone = {k for k in state.managed if k[0] is kind} - set(state.resources)
        else:
            gone = {(kind, name) for name in have} - set(state.resources)
            if not prune:
                gone &= state.managed
        deletes += [Delete(k) for k in sorted(gone)]
    return Plan(tuple(applies + deletes), tuple(invalid))
