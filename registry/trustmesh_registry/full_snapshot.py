"""A full snapshot built from a still copy of the registry's records.

At 100,000 agents building and serializing a full snapshot takes seconds. The
registry takes a `Records` copy on its event loop (shallow copies of its tables: the
records in them are immutable, so this costs milliseconds) and builds from the copy
in a worker thread, so that the loop keeps serving while it does and writes that
land meanwhile cannot tear the snapshot: they reach the watcher as deltas after the
copy's revision.
"""

from __future__ import annotations

from dataclasses import dataclass

from trustmesh import wire
from trustmesh.delegation_policy import DelegationPolicy
from trustmesh.resources import AccessPolicy, Agent, AgentBlueprint
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.v1 import resources_pb2 as pb
from trustmesh_registry.store import OperatorState

__all__ = ["Records", "build"]

_ACTIVE = OperatorState(False)


@dataclass(frozen=True)
class Records:
    """What a full snapshot of one revision holds."""

    epoch: str
    revision: int
    bundles: list[pb.TrustBundle]
    blueprints: dict[str, AgentBlueprint]
    agents: list[Agent]
    operator: dict[str, OperatorState]
    policies: list[AccessPolicy]
    delegation_policies: list[DelegationPolicy]
    endpoints: list[pb.Endpoint]


def agent_pb(
    agent: Agent, blueprints: dict[str, AgentBlueprint], operator: dict[str, OperatorState]
) -> pb.Agent:
    """An agent as the registry publishes it: effective attributes, operator state."""
    op = operator.get(agent.name, _ACTIVE)
    return wire.agent_to_pb(
        agent,
        blueprints.get(agent.blueprint),
        disabled=op.disabled,
        disabled_reason=op.reason,
    )


def build(records: Records) -> rpb.SnapshotUpdate:
    """The full snapshot of `records` (pure: safe to run in another thread)."""
    changes = [rpb.Change(put_bundle=b) for b in records.bundles]
    changes += [
        rpb.Change(put_blueprint=wire.blueprint_to_pb(b)) for b in records.blueprints.values()
    ]
    changes += [
        rpb.Change(put_agent=agent_pb(a, records.blueprints, records.operator))
        for a in records.agents
    ]
    changes += [rpb.Change(put_policy=wire.policy_to_pb(p)) for p in records.policies]
    changes += [
        rpb.Change(put_delegation_policy=wire.delegation_policy_to_pb(p))
        for p in records.delegation_policies
    ]
    changes += [rpb.Change(put_endpoint=e) for e in records.endpoints]
    return rpb.SnapshotUpdate(
        epoch=records.epoch, revision=records.revision, full=True, changes=changes
    )
