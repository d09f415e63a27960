"""The reconciler: the pure core over recorded API objects and watch events, then the
loop (`Reconciler`) with an in-memory registry and a source that replays the recordings.
recorded/README.md says what the recordings are.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from k8s_support import HERE

from trustmesh.errors import ConfigError, ManifestError, NotFoundError
from trustmesh.k8s.reconcile_loop import Reconciler, _Event, _Listed
from trustmesh.k8s.reconciler import (
    PLURALS,
    DesiredState,
    Plan,
    WatchExpiredError,
    from_api_object,
    plan,
)
from trustmesh.manifest import parse_resource, to_document, validate_batch
from trustmesh.resources import Agent, AgentBlueprint, Kind

LISTS = json.loads((HERE / "recorded" / "cr-list-responses.json").read_text())
EVENTS = [
    json.loads(line)
    for line in (HERE / "recorded" / "cr-watch-agents.jsonl").read_text().splitlines()
]
Key = tuple[Kind, str]


def listed(kinds: tuple[Kind, ...] = tuple(Kind)) -> DesiredState:
    state = DesiredState()
    for kind in kinds:
        body = LISTS[PLURALS[kind]]
        state = state.with_listing(kind, body["items"], body["metadata"]["resourceVersion"])
    return state


def registry_holding(state: DesiredState) -> dict[Kind, dict[str, Any]]:
    """What the registry returns after applying `state` (Agents carry a status)."""
    out: dict[Kind, dict[str, Any]] = {k: {} for k in Kind}
    for (kind, name), cr in state.resources.items():
        assert cr.document is not None
        doc = dict(cr.document)
        if kind is Kind.AGENT:
            doc["status"] = {
                "state": "Active",
                "disabledReason": "",
                "endpoints": ["10.1.2.3:15443"],
            }
        out[kind][name] = doc
    return out


def names(p: Plan) -> list[str]:
    return [str(a) for a in p.actions]


def test_a_recorded_object_becomes_its_apply_document() -> None:
    (obj,) = [o for o in LISTS["agents"]["items"] if o["metadata"]["name"] == "planner"]
    cr = from_api_object(obj)
    assert (cr.key, cr.resource_version, cr.problem) == ((Kind.AGENT, "planner"), "1004", "")
    assert cr.document == {
        "apiVersion": "trustmesh.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": "planner"},  # no uid, labels, annotations or managedFields
        "spec": obj["spec"],
    }


def test_initial_listing_applies_everything_in_dependency_order() -> None:
    p = plan(listed(), {k: {} for k in Kind})
    assert names(p) == [
        "apply AgentBlueprint/example-orchestrator",
        "apply AgentBlueprint/example-planner",
        "apply Agent/orchestrator",
        "apply Agent/planner",
        "apply AccessPolicy/example-orchestrator-plans",
        "apply DelegationPolicy/example-planner-accepts-orchestrator",
    ]
    assert p.invalid == ()
    # Applied, nothing more to do, even though the registry adds a status to agents.
    assert plan(listed(), registry_holding(listed())) == Plan()


BAD_TOOL = (
    (Kind.AGENT, "tool"),
    "Agent/tool: spec.spiffeId: Invalid SPIFFE ID 'spiffe://example.org/ns/trustmesh-examples/../sa/tool': "
    "path segments '.' and '..' are not allowed",
)


@pytest.mark.parametrize(
    ("events", "actions", "invalid"),
    [
        pytest.param(1, ["apply Agent/tool"], [], id="added"),
        pytest.param(2, ["apply Agent/planner", "apply Agent/tool"], [], id="modified"),
        pytest.param(3, ["apply Agent/planner"], [BAD_TOOL], id="modified-to-invalid"),
        pytest.param(
            4, ["apply Agent/planner", "delete Agent/orchestrator"], [BAD_TOOL], id="deleted"
        ),
        pytest.param(
            5, ["apply Agent/planner", "delete Agent/orchestrator"], [BAD_TOOL], id="bookmark"
        ),
    ],
)
def test_recorded_watch_events(events: int, actions: list[str], invalid: list[Any]) -> None:
    start = listed()
    state = start
    for event in EVENTS[:events]:
        state = state.with_event(Kind.AGENT, event)
    p = plan(state, registry_holding(start))
    assert names(p) == actions
    assert list(p.invalid) == invalid
    assert (
        state.resource_versions[Kind.AGENT] == ["1050", "1051", "1052", "1053", "1060"][events - 1]
    )


def test_watch_expiry_and_errors() -> None:
    with pytest.raises(WatchExpiredError, match=r"too old resource version: 1042 \(1061\)"):
        listed().with_event(Kind.AGENT, EVENTS[5])
    forbidden = {
        "type": "ERROR",
        "object": {"kind": "Status", "code": 403, "message": "agents is forbidden"},
    }
    with pytest.raises(ManifestError, match="watch error: agents is forbidden"):
        listed().with_event(Kind.AGENT, forbidden)
    with pytest.raises(ManifestError, match="unknown watch event type 'RENAMED'"):
        listed().with_event(Kind.AGENT, {"type": "RENAMED", "object": EVENTS[0]["object"]})


def manual_agent() -> dict[str, Any]:
    return {
        "apiVersion": "trustmesh.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": "manual"},
        "spec": {
            "spiffeId": "spiffe://example.org/manual",
            "blueprint": "example-planner",
            "sponsor": "ops",
        },
    }


def test_only_listed_kinds_are_deleted_from() -> None:
    observed = registry_holding(listed())
    partial = listed((Kind.AGENT_BLUEPRINT,))  # agents not listed yet: don't touch them
    assert names(plan(partial, observed, prune=True)) == []


@pytest.mark.parametrize(("prune", "actions"), [(False, []), (True, ["delete Agent/manual"])])
def test_prune_decides_about_what_was_applied_by_hand(prune: bool, actions: list[str]) -> None:
    observed = registry_holding(listed())
    observed[Kind.AGENT]["manual"] = manual_agent()
    assert names(plan(listed(), observed, prune=prune)) == actions


def test_a_kind_the_registry_cannot_list() -> None:
    state = listed()
    observed: dict[Kind, Mapping[str, Any] | None] = {
        **registry_holding(state),
        Kind.DELEGATION_POLICY: None,
    }
    # Unknown: apply (the registry answers "unchanged")...
    assert names(plan(state, observed)) == [
        "apply DelegationPolicy/example-planner-accepts-orchestrator"
    ]
    # ...and delete only what this reconciler saw as a CR.
    (obj,) = LISTS["delegationpolicies"]["items"]
    gone = state.with_event(Kind.DELEGATION_POLICY, {"type": "DELETED", "object": obj})
    assert names(plan(gone, observed)) == [
        "delete DelegationPolicy/example-planner-accepts-orchestrator"
    ]
    assert (
        names(plan(gone.forget((Kind.DELEGATION_POLICY, obj["metadata"]["name"])), observed)) == []
    )


def test_an_invalid_edit_keeps_the_last_good_version() -> None:
    start = listed()
    broken = copy.deepcopy(LISTS["agents"]["items"][1])
    broken["spec"]["blueprint"] = "Not A Name"
    state = start.with_event(Kind.AGENT, {"type": "MODIFIED", "object": broken})
    p = plan(state, registry_holding(start), prune=True)
    assert p.actions == ()  # neither re-applied nor deleted
    assert [k for k, _ in p.invalid] == [(Kind.AGENT, broken["metadata"]["name"])]


# -- the loop --------------------------------------------------------------------------


class MemoryRegistry:
    """Applies with the registry's own parser and checks; refuses what it would refuse."""

    def __init__(self) -> None:
        self.docs: dict[Key, dict[str, Any]] = {}

    async def get(self, kind: Kind) -> dict[str, Any] | None:
        return {name: doc for (k, name), doc in self.docs.items() if k is kind}

    async def apply(self, key: Key, document: Mapping[str, Any]) -> str:
        res = parse_resource(dict(document), f"k8s:{key[0].value}/{key[1]}")
        blueprints = {n for (k, n) in self.docs if k is Kind.AGENT_BLUEPRINT}
        validate_batch([res], blueprints)
        if isinstance(res, Agent):
            for (k, n), doc in self.docs.items():
                if (
                    k is Kind.AGENT
                    and n != res.name
                    and doc["spec"]["spiffeId"] == str(res.spiffe_id)
                ):
                    raise ManifestError(
                        f"k8s:Agent/{res.name}", "spec.spiffeId", f"also Agent {n!r}"
                    )
        old = self.docs.get(key)
        self.docs[key] = to_document(res)
        verb = "created" if old is None else "unchanged" if old == self.docs[key] else "configured"
        return f"{key[0].value}/{key[1]} {verb}"

    async def delete(self, key: Key) -> None:
        if key not in self.docs:
            raise NotFoundError(f"{key[0].value}/{key[1]} not found")
        if key[0] is Kind.AGENT_BLUEPRINT:
            users = [
                n
                for (k, n), d in self.docs.items()
                if k is Kind.AGENT and d["spec"]["blueprint"] == key[1]
            ]
            if users:
                raise ConfigError(f"AgentBlueprint/{key[1]} is used by agents: {', '.join(users)}")
        del self.docs[key]


async def test_sync_once_executes_the_plan() -> None:
    registry = MemoryRegistry()
    rec = Reconciler(source=None, registry=registry)  # type: ignore[arg-type]
    for kind in Kind:
        body = LISTS[PLURALS[kind]]
        rec.feed(_Listed(kind, body["items"], "1042"))
    result = await rec.sync_once()
    assert result.failed == ()
    assert len(result.done) == 6 and all(line.endswith(" created") for line in result.done)
    for event in EVENTS[:4]:
        rec.feed(_Event(Kind.AGENT, event))
    result = await rec.sync_once()
    assert result.done == ("Agent/planner configured", "Agent/orchestrator deleted")
    assert registry.docs[(Kind.AGENT, "planner")]["spec"]["sponsor"] == "new-owner@example.org"
    assert (Kind.AGENT, "tool") not in registry.docs  # invalid: reported, not applied
    assert (Kind.AGENT, "orchestrator") not in rec.state.managed  # deleted and forgotten
    assert (await rec.sync_once()).plan.actions == ()


class ReplaySource:
    """Lists and watches from the recordings; after a 410 the agents list is the new state."""

    def __init__(self) -> None:
        self.lists: dict[Kind, int] = {k: 0 for k in Kind}
        self.stopped = threading.Event()
        self.lock = threading.Lock()

    def list(self, kind: Kind) -> tuple[list[dict[str, Any]], str]:
        with self.lock:
            self.lists[kind] += 1
            again = self.lists[kind] > 1
        items = copy.deepcopy(LISTS[PLURALS[kind]]["items"])
        if kind is Kind.AGENT and again:
            items = [EVENTS[1]["object"], EVENTS[2]["object"]]  # planner modified, tool invalid
            return items, "1061"
        return items, "1042"

    def watch(self, kind: Kind, resource_version: str) -> Iterator[dict[str, Any]]:
        if kind is Kind.AGENT and resource_version == "1042":
            yield from EVENTS[:5]
            raise WatchExpiredError(EVENTS[5]["object"]["message"])
        self.stopped.wait(0.2)  # a watch that times out with nothing to say

    def stop(self) -> None:
        self.stopped.set()


async def test_run_converges_and_relists_after_410() -> None:
    registry, source = MemoryRegistry(), ReplaySource()
    rec = Reconciler(source, registry, resync=0.1, debounce=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(rec.run(stop))

    def converged() -> bool:
        planner = registry.docs.get((Kind.AGENT, "planner"), {})
        return (
            source.lists[Kind.AGENT] >= 2
            and planner.get("spec", {}).get("sponsor") == "new-owner@example.org"
            and (Kind.AGENT, "orchestrator") not in registry.docs
        )

    for _ in range(100):
        if converged():
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert converged()
    assert {k for k in registry.docs if k[0] is not Kind.AGENT} == {
        (Kind.AGENT_BLUEPRINT, "example-orchestrator"),
        (Kind.AGENT_BLUEPRINT, "example-planner"),
        (Kind.ACCESS_POLICY, "example-orchestrator-plans"),
        (Kind.DELEGATION_POLICY, "example-planner-accepts-orchestrator"),
    }
    # `tool` may have been applied while it was still valid; never in its invalid form.
    tool = registry.docs.get((Kind.AGENT, "tool"))
    assert tool is None or tool["spec"]["spiffeId"].endswith("/sa/tool")
    assert isinstance(
        parse_resource(registry.docs[(Kind.AGENT_BLUEPRINT, "example-planner")], "x"),
        AgentBlueprint,
    )
